"""Swarm benchmark: time per batch through the swarm executor against a bare one-task service.

Prints its figures and writes them to bench/results/swarm.json. Needs the Docker engine as a
Swarm manager and the test images (`make services`). Run: `.venv/bin/python bench/swarm.py`.

Both sides run the same image and command, one at a time, ROUNDS times, alternating:
- executor: `SwarmExecutor.run` of a batch of BATCH events (Swarm config with the input, the
  job, the task polled to its end, its logs read, job, config and task container removed);
- bare: the Docker SDK's `services.create(..., mode=ServiceMode("replicated", replicas=1))` with restart
  condition none (the executor's own kind of job, docs/swarm.md), its task polled to its end at the same
  interval, its logs read, the service removed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anyio
import docker
from docker.types import RestartPolicy, ServiceMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.per_batch import against_bare  # noqa: E402
from dispatcher.config import ExecutorConfig, FunctionConfig  # noqa: E402
from dispatcher.events import new_id  # noqa: E402
from dispatcher.executors.swarm import _POLL, SwarmExecutor  # noqa: E402

IMAGE = "eventswarm/busybox:test"
COMMAND = ["sh", "-c", "cat /dev/null"]


def bare_job(client: docker.DockerClient) -> float:
    started = time.perf_counter()
    service = client.services.create(IMAGE, command=COMMAND, mode=ServiceMode("replicated", replicas=1),
                                     restart_policy=RestartPolicy(condition="none"), name=f"bench-bare-{new_id()}")
    while True:
        tasks = service.tasks()
        if tasks and tasks[0]["Status"]["State"] in ("complete", "failed", "rejected"):
            break
        time.sleep(_POLL)
    b"".join(service.logs(stdout=True, stderr=True))
    service.remove()
    return time.perf_counter() - started


async def measure(batch: int, rounds: int) -> dict[str, float]:
    client = docker.from_env()
    try:
        return await against_bare(SwarmExecutor(ExecutorConfig(kind="swarm", max_in_flight=2)),
                                  FunctionConfig(image=IMAGE, command=COMMAND, timeout="60s"), batch, rounds,
                                  lambda: bare_job(client), "bare_job")
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "swarm.json"))
    args = parser.parse_args()
    report = anyio.run(measure, args.batch, args.rounds)
    report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"swarm executor, batch of {report['batch']} ({report['input_bytes']} bytes of input): "
          f"{report['executor_median_s'] * 1000:.0f} ms vs a bare one-task service {report['bare_job_median_s'] * 1000:.0f} ms"
          f" = {report['ratio']:.2f}x (target <= 1.15x)")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
