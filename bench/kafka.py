"""Kafka benchmark: events/s from a topic through the daemon, against the baselines measured in the same run.

Prints its figures and writes them to bench/results/kafka.json. Needs the broker and the Docker
engine (`make services`). Run: `.venv/bin/python bench/kafka.py`.

(a) events/s from Kafka through docker-executor containers in batches of 2,000, against the
    per-event `containers.run` rate (200 events, 8 threads);
(b) events/s from Kafka through the pipeline with the process executor running a trivial command
    per batch, against a raw aiokafka `getmany` loop reading the same topic: at batches of 2,000
    (as in (a)) and of 10,000, each the median of ROUNDS runs alternating with the raw loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio
from aiokafka import AIOKafkaConsumer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fanout import baseline_rate  # noqa: E402
from bench.pipeline import settled, trigger_doc  # noqa: E402
from dispatcher.daemon import tune_gc  # noqa: E402
from tests.kafka import new_topic, produce  # noqa: E402

BROKER = "127.0.0.1:19092"
BUFFER = 50_000
ROUNDS = 3


async def through_daemon(topic: str, total: int, executor: str, batch: int, state_dir: str,
                         ordering: str = "partition", in_flight: int = 4) -> dict[str, float]:
    function = ({"image": "eventswarm/busybox:test", "command": ["sh", "-c", "cat >/dev/null"]} if executor == "docker"
                else {"command": ["true"]})
    doc = trigger_doc({"kind": "kafka", "bootstrap_servers": [BROKER], "topics": [topic],
                       "group_id": f"bench-{uuid.uuid4().hex}"}, state_dir, batch=batch, executor=executor,
                      function=function, in_flight=in_flight, ordering=ordering, buffer=BUFFER)
    count, elapsed = await settled(doc, total)
    return {"events": int(count), "seconds": round(elapsed, 3), "events_per_s": round(count / elapsed, 1),
            "ordering": ordering, "max_in_flight": in_flight, "batch": batch, "buffer": BUFFER}


async def raw_getmany(topic: str, total: int) -> dict[str, float]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=BROKER, group_id=f"raw-{uuid.uuid4().hex}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        seen = 0
        started = 0.0
        while seen < total:
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            for records in batches.values():
                if not started and records:
                    started = time.perf_counter()
                seen += len(records)
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {"events": seen, "seconds": round(elapsed, 3), "events_per_s": round(seen / elapsed, 1)}


def main() -> None:
    tune_gc()  # as `eventswarm run` does; the raw loop below runs in this process too
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kafka.json"))
    args = parser.parse_args()
    topic = new_topic(BROKER, 4, prefix="bench")
    value = json.dumps({"payload": "x" * 80}).encode()  # about 100 bytes, as in the broker's baseline
    produce(BROKER, topic, ((f"k{i % 1000}".encode(), value) for i in range(args.events)))
    with tempfile.TemporaryDirectory(prefix="eventswarm-bench-") as state_dir:
        # No ordering between batches, 8 containers at once: the fan-out this measures.
        docker = anyio.run(through_daemon, topic, args.events, "docker", 2000, state_dir, "none", 8)
        print(f"(a) Kafka -> docker executor, batches of 2000, 8 in flight: {docker['events_per_s']:.0f} events/s")
        baseline = baseline_rate(200, 8)
        ratio_a = docker["events_per_s"] / baseline["events_per_s"]
        print(f"    per-event containers.run baseline: {baseline['events_per_s']:.2f} events/s -> {ratio_a:.0f}x (target >= 1000x)")
        process = {}
        raws = []
        for batch in (2000, 10_000):
            runs = []
            for _ in range(args.rounds):
                runs.append(anyio.run(through_daemon, topic, args.events, "process", batch, state_dir, "none", 8))
                raws.append(anyio.run(raw_getmany, topic, args.events))
            process[batch] = {**runs[0], "events_per_s": statistics.median(r["events_per_s"] for r in runs),
                              "runs_events_per_s": [r["events_per_s"] for r in runs]}
        raw = {"events": args.events, "events_per_s": statistics.median(r["events_per_s"] for r in raws),
               "runs_events_per_s": [r["events_per_s"] for r in raws]}
        print(f"(b) raw aiokafka getmany: {raw['events_per_s']:.0f} events/s (median of {len(raws)})")
        ratio_b = {}
        for batch, figures in process.items():
            ratio_b[batch] = figures["events_per_s"] / raw["events_per_s"]
            print(f"    Kafka -> pipeline -> process executor, batches of {batch}, 8 in flight: "
                  f"{figures['events_per_s']:.0f} events/s (median of {args.rounds}) -> {ratio_b[batch]:.2f}x (target >= 0.5x)")
    report = {"events": args.events, "docker": docker, "containers_run_baseline": baseline, "ratio_docker_vs_baseline": round(ratio_a, 1),
              "process": {str(b): f for b, f in process.items()}, "raw_getmany": raw,
              "ratio_process_vs_raw": {str(b): round(r, 3) for b, r in ratio_b.items()},
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
