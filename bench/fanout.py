"""Fan-out benchmark: events/s through the pipeline and the docker executor, against per-event `containers.run`.

Prints its figures and writes them to bench/results/fanout.json. Needs the Docker engine and
the test images (`make services`). Run: `make bench` or `.venv/bin/python bench/fanout.py`.

- pipeline: EVENTS events emitted into a trigger, batches of BATCH, docker executor, until every
  event is acknowledged;
- baseline: BASELINE_EVENTS bare `containers.run` calls, one per event, THREADS threads at once;
- per batch: the docker executor's time for one batch of BATCH events against a bare
  `containers.run` of the same image and command, one at a time, medians of ROUNDS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.per_batch import against_bare  # noqa: E402
from dispatcher.config import ExecutorConfig, FunctionConfig, parse  # noqa: E402
from dispatcher.daemon import Daemon  # noqa: E402
from dispatcher.events import Event  # noqa: E402
from dispatcher.executors.docker import DockerExecutor  # noqa: E402

IMAGE = "eventswarm/busybox:test"
COMMAND = ["sh", "-c", "cat >/dev/null"]


def events(count: int) -> list[Event]:
    return [Event(source="bench", type="bench.event", data={"n": i, "payload": "x" * 64}) for i in range(count)]


async def pipeline_rate(total: int, batch: int, in_flight: int, state_dir: str) -> dict[str, float]:
    doc = {
        "daemon": {"state": f"sqlite:///{state_dir}/state.db", "listen": "127.0.0.1:0"},
        "executor": {"kind": "docker", "max_in_flight": in_flight},
        "functions": {"f": {"image": IMAGE, "command": COMMAND, "timeout": "60s"}},
        "triggers": {"t": {"function": "f", "source": {"kind": "webhook", "path": "/bench"}, "ordering": "none",
                           "max_in_flight": in_flight, "buffer": total,
                           "batch": {"max_events": batch, "max_bytes": "64MiB", "max_wait": "100ms"}}},
    }
    daemon = Daemon(parse(doc))
    acked = 0
    done = anyio.Event()

    async def ack(_outcome: object) -> None:
        nonlocal acked
        acked += 1
        if acked == total:
            done.set()

    prepared = events(total)
    for event in prepared:
        event.encode()  # what a source does once per event; not part of the fan-out
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        await daemon.started.wait()
        started = time.perf_counter()
        for event in prepared:
            await daemon.triggers["t"].emit(event, ack)
        await done.wait()
        elapsed = time.perf_counter() - started
        daemon.stop()
    return {"events": total, "batch": batch, "seconds": round(elapsed, 3), "events_per_s": round(total / elapsed, 1)}


def baseline_rate(count: int, threads: int) -> dict[str, float]:
    client = docker.from_env(max_pool_size=threads + 4)

    def one(_: int) -> None:
        client.containers.run(IMAGE, COMMAND, remove=True, network_mode="none")

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    elapsed = time.perf_counter() - started
    client.close()
    return {"events": count, "threads": threads, "seconds": round(elapsed, 3), "events_per_s": round(count / elapsed, 2)}


async def per_batch(batch: int, rounds: int, state_dir: str) -> dict[str, float]:
    client = docker.from_env()

    def bare() -> float:
        started = time.perf_counter()
        client.containers.run(IMAGE, COMMAND, remove=True, network_mode="none")
        return time.perf_counter() - started

    try:
        return await against_bare(DockerExecutor(ExecutorConfig(kind="docker", max_in_flight=2), f"{state_dir}/inputs"),
                                  FunctionConfig(image=IMAGE, command=COMMAND, timeout="60s"), batch, rounds, bare,
                                  "bare_containers_run")
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--baseline-events", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fanout.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="eventswarm-bench-") as state_dir:
        pipeline = anyio.run(pipeline_rate, args.events, args.batch, args.in_flight, state_dir)
        print(f"pipeline + docker executor: {pipeline['events']} events in batches of {pipeline['batch']}: "
              f"{pipeline['events_per_s']:.0f} events/s ({pipeline['seconds']} s)")
        baseline = baseline_rate(args.baseline_events, args.threads)
        print(f"baseline containers.run per event ({baseline['threads']} threads): {baseline['events_per_s']:.2f} events/s")
        ratio = pipeline["events_per_s"] / baseline["events_per_s"]
        print(f"fan-out ratio: {ratio:.0f}x the per-event baseline")
        batch = anyio.run(per_batch, args.batch, args.rounds, state_dir)
        print(f"per batch of {batch['batch']} ({batch['input_bytes']} bytes of input): executor "
              f"{batch['executor_median_s'] * 1000:.0f} ms vs bare containers.run {batch['bare_containers_run_median_s'] * 1000:.0f} ms"
              f" = {batch['ratio']:.2f}x (target <= 1.15x)")
    report = {"pipeline": pipeline, "baseline": baseline, "ratio_vs_baseline": round(ratio, 1), "per_batch": batch,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
