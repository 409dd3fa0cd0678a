"""Time per batch through an executor against a bare baseline of the same image, alternating, medians of ROUNDS."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import anyio

from dispatcher.config import FunctionConfig
from dispatcher.dispatch import input_document
from dispatcher.events import Event, Run, new_id
from dispatcher.executors import Executor, Invocation


async def against_bare(executor: Executor, function: FunctionConfig, batch: int, rounds: int,
                       bare: Callable[[], float], bare_name: str) -> dict[str, float]:
    """Run ``rounds`` batches of ``batch`` events through ``executor``, each followed by one ``bare()`` run
    (which returns its own duration in seconds); returns both medians and their ratio."""
    events = [Event(source="bench", type="bench.event", data={"n": i, "payload": "x" * 64}) for i in range(batch)]
    await executor.start()
    ours, baseline = [], []
    try:
        for _ in range(rounds):
            invocation_id = new_id()
            invocation = Invocation(id=invocation_id, trigger="bench", function_name="f", function=function,
                                    input=input_document("bench", "f", invocation_id, 1, [Run.of(events)]), env={}, args=[])
            started = time.perf_counter()
            result = await executor.run(invocation)
            ours.append(time.perf_counter() - started)
            assert result.ok, result
            baseline.append(await anyio.to_thread.run_sync(bare))
    finally:
        await executor.close()
    ours_s, bare_s = statistics.median(ours), statistics.median(baseline)
    return {"batch": batch, "rounds": rounds, "input_bytes": len(invocation.input), "executor_median_s": round(ours_s, 4),
            f"{bare_name}_median_s": round(bare_s, 4), "ratio": round(ours_s / bare_s, 3)}
