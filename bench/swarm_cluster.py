"""Swarm benchmark on three nodes: jobs per second through the swarm executor with 8 in flight, spread over the
three nodes of scripts/swarm-cluster.sh against the same jobs held to one node, alternating in the same run.

Prints its figures and writes them to bench/results/swarm-cluster.json. Needs the cluster (`make services`, or
`bash scripts/swarm-cluster.sh`). Run: `.venv/bin/python bench/swarm_cluster.py`.

Each round runs JOBS batches of one event, 8 at a time, through `SwarmExecutor.run` against the manager over
mutual TLS: once with no placement (Swarm spreads them over the three nodes) and once with
`placement = ["node.role == manager"]` (all on one node). Two kinds of function: `true` (the cost of a job alone:
Swarm's scheduling and the manager's bookkeeping, which one node or three share alike) and `sleep 1` (a function
that waits on something: what three nodes' room gives). Then the same two functions warm (`executor.kind =
"auto"` on the manager: the pool is on the manager's engine only, docs/swarm.md), 8 containers kept idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher.config import ExecutorConfig, FunctionConfig, WarmConfig  # noqa: E402
from dispatcher.dispatch import input_document  # noqa: E402
from dispatcher.events import Event, Run, new_id  # noqa: E402
from dispatcher.executors import AutoExecutor, Invocation  # noqa: E402
from dispatcher.executors.swarm import SwarmExecutor  # noqa: E402
from tests.cluster import Cluster  # noqa: E402

IMAGE = "eventswarm/busybox:test"
IN_FLIGHT = 8


async def jobs_per_second(executor: SwarmExecutor | AutoExecutor, function: FunctionConfig, jobs: int) -> tuple[float, dict[str, int]]:
    limiter = anyio.Semaphore(IN_FLIGHT)
    nodes: dict[str, int] = {}

    async def one() -> None:
        async with limiter:
            invocation_id = new_id()
            events = [Event(source="bench", type="bench.event", data={"n": 1})]
            invocation = Invocation(id=invocation_id, trigger="bench", function_name="f", function=function,
                                    input=input_document("bench", "f", invocation_id, 1, [Run.of(events)]), env={},
                                    args=[])
            result = await executor.run(invocation)
            assert result.ok, result
            nodes[result.node or "?"] = nodes.get(result.node or "?", 0) + 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(jobs):
            tg.start_soon(one)
    return jobs / (time.perf_counter() - started), nodes


async def measure(jobs: int, rounds: int) -> dict[str, object]:
    cluster = Cluster()
    executor = SwarmExecutor(ExecutorConfig(**cluster.executor(max_in_flight=IN_FLIGHT)))
    await executor.start()
    report: dict[str, object] = {"jobs": jobs, "rounds": rounds, "in_flight": IN_FLIGHT}
    try:
        for name, command in (("true", ["true"]), ("sleep_1s", ["sleep", "1"])):
            spread: list[float] = []
            one_node: list[float] = []
            seen: dict[str, int] = {}
            for _ in range(rounds):
                rate, nodes = await jobs_per_second(executor, FunctionConfig(image=IMAGE, command=command), jobs)
                spread.append(rate)
                for node, count in nodes.items():
                    seen[node] = seen.get(node, 0) + count
                rate, _ = await jobs_per_second(
                    executor, FunctionConfig(image=IMAGE, command=command, placement=["node.role == manager"]), jobs)
                one_node.append(rate)
            report[name] = {"three_nodes_jobs_per_s": round(statistics.median(spread), 2),
                            "one_node_jobs_per_s": round(statistics.median(one_node), 2),
                            "ratio": round(statistics.median(spread) / statistics.median(one_node), 2),
                            "jobs_per_node_when_spread": seen}
        # A warm function (executor kind auto on the manager: its pool is on the manager's engine, docs/swarm.md),
        # the same `sleep 1` and `true` at 8 in flight, against the cold jobs over three nodes above.
        warm = AutoExecutor(ExecutorConfig(**cluster.executor(kind="auto", max_in_flight=IN_FLIGHT)),
                            tempfile.mkdtemp(prefix="bench-swarm-cluster-"))
        await warm.start()
        try:
            for name, command in (("true", ["true"]), ("sleep_1s", ["sleep", "1"])):
                function = FunctionConfig(image=IMAGE, command=command,
                                          warm=WarmConfig(min_idle=IN_FLIGHT, max=IN_FLIGHT))
                await warm.prepare({"f": function}, owner="bench")
                rates = [(await jobs_per_second(warm, function, jobs))[0] for _ in range(rounds)]
                figures = report[name]
                assert isinstance(figures, dict)
                figures["warm_on_the_manager_jobs_per_s"] = round(statistics.median(rates), 2)
        finally:
            await warm.close()
    finally:
        await executor.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "swarm-cluster.json"))
    args = parser.parse_args()
    report = anyio.run(measure, args.jobs, args.rounds)
    report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name in ("true", "sleep_1s"):
        figures = report[name]
        assert isinstance(figures, dict)
        print(f"{name:8}: {figures['three_nodes_jobs_per_s']:.2f} jobs/s over three nodes, "
              f"{figures['one_node_jobs_per_s']:.2f} on one = {figures['ratio']:.2f}x "
              f"({IN_FLIGHT} in flight; spread {figures['jobs_per_node_when_spread']}); warm on the manager "
              f"{figures['warm_on_the_manager_jobs_per_s']:.2f}")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
