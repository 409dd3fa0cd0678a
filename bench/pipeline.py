"""What the source benchmarks share: one trigger's daemon, run in this process until its source's events are all
settled, timed from its first settled event (a consumer group's join, a session's start are not the pipeline);
and rounds of it against a client's own loop, with the medians and their ratio."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from dispatcher.config import parse
from dispatcher.daemon import Daemon


def trigger_doc(source: dict[str, Any], state_dir: str, *, batch: int, executor: str = "process",
                function: dict[str, Any] | None = None, in_flight: int = 4, ordering: str = "none",
                buffer: int = 20_000) -> dict[str, Any]:
    """A config of one trigger ``t`` reading ``source`` into a trivial function (``true``, unless given)."""
    return {
        "daemon": {"state": f"sqlite:///{state_dir}/{uuid.uuid4().hex}.db", "listen": "127.0.0.1:0"},
        "executor": {"kind": executor, "max_in_flight": in_flight},
        "functions": {"f": {**(function or {"command": ["true"]}), "timeout": "60s"}},
        "triggers": {"t": {"function": "f", "ordering": ordering, "max_in_flight": in_flight, "buffer": buffer,
                           "source": source,
                           "batch": {"max_events": batch, "max_bytes": "4MiB", "max_wait": "100ms"}}},
    }


async def settled(doc: dict[str, Any], total: int) -> tuple[int, float]:
    """Run the daemon of ``doc`` until ``total`` events of trigger ``t`` are settled: (events timed, seconds)."""
    daemon = Daemon(parse(doc))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        await daemon.started.wait()
        acked = daemon.metrics.events_acked.labels("t")
        while acked._value.get() < 1:  # noqa: ASYNC110 (a benchmark samples a counter)
            await anyio.sleep(0.001)
        started, first = time.perf_counter(), acked._value.get()
        while acked._value.get() < total:  # noqa: ASYNC110
            await anyio.sleep(0.005)
        elapsed = time.perf_counter() - started
        daemon.stop()
    return int(total - first), elapsed


async def against(pipeline: Callable[[], Awaitable[float]], raw: Callable[[], Awaitable[float]], rounds: int,
                  what: str) -> dict[str, Any]:
    """``rounds`` of the raw loop then the pipeline, alternating; the medians, the runs and their ratio."""
    through, baseline = [], []
    for round_ in range(rounds):
        baseline.append(await raw())
        through.append(await pipeline())
        print(f"round {round_ + 1}: pipeline {through[-1]:,.0f} events/s, {what} {baseline[-1]:,.0f} msgs/s", flush=True)
    result = {"pipeline_events_per_s": round(statistics.median(through), 1),
              "raw_msgs_per_s": round(statistics.median(baseline), 1),
              "pipeline_runs": [round(r, 1) for r in through], "raw_runs": [round(r, 1) for r in baseline]}
    result["ratio"] = round(result["pipeline_events_per_s"] / result["raw_msgs_per_s"], 3)
    print(f"pipeline / {what}: {result['ratio']:.2f}x")
    return result
