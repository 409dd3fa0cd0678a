"""Telemetry benchmark: what trace export costs, measured in one sitting. Webhook accepts/s (bench/webhook.py's
load: wrk, 32 connections) and Kafka events/s through the pipeline (bench/kafka.py's (b): the process executor,
batches of 2,000, 8 in flight), each for three daemons, alternating, ROUNDS times:

- ``before``: the tree before telemetry was added (a git worktree of --before, default the parent of the commit
  that added dispatcher/telemetry.py), run from its own files;
- ``off``: this tree, export off (the default);
- ``on``: this tree, export on, to a real OTLP/HTTP receiver (oteltap, in a process of its own);
- ``away``: this tree, export on, to a collector that is not there (a closed port): spans dropped and counted;
- ``sampled``: as ``on`` with the standard sampler variables at 1% (``parentbased_traceidratio``, 0.01).

Prints the medians and writes bench/results/telemetry.json. Needs wrk, the broker (`make services`) and git.
Run: `.venv/bin/python bench/telemetry.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.webhook import WRK_SCRIPT, daemon, free_port, save  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
KAFKA_RUN = """
import json, sys, tempfile, anyio
from bench.kafka import through_daemon
with tempfile.TemporaryDirectory() as state:
    print(json.dumps(anyio.run(through_daemon, sys.argv[1], int(sys.argv[2]), "process", 2000, state, "none", 8)))
"""


def before_commit() -> str:
    added = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H", "--",
                            "dispatcher/telemetry.py"], capture_output=True, text=True, check=True).stdout.split()
    if not added:
        raise SystemExit("no commit added dispatcher/telemetry.py: give --before")
    return f"{added[-1]}^"


VARIANTS = ("before", "off", "on", "away", "sampled")


def variants(tree: Path, collector: int) -> dict[str, tuple[Path, dict[str, str]]]:
    """Each variant's source tree and environment."""
    plain = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    on = {**plain, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector}", "OTEL_SERVICE_NAME": "eventswarm-bench"}
    return {"before": (tree, plain), "off": (ROOT, plain), "on": (ROOT, on),
            "away": (ROOT, {**on, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}),
            "sampled": (ROOT, {**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                               "OTEL_TRACES_SAMPLER_ARG": "0.01"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=200_000, help="Kafka records per run")
    parser.add_argument("--before", default="", help="the commit to compare with (default: before telemetry)")
    args = parser.parse_args()
    commit = args.before or before_commit()
    from tests.kafka import new_topic, produce

    broker = "127.0.0.1:19092"
    topic = new_topic(broker, 4, prefix="bench-otel")
    value = json.dumps({"payload": "x" * 80}).encode()
    produce(broker, topic, ((f"k{i % 1000}".encode(), value) for i in range(args.events)))
    with tempfile.TemporaryDirectory(prefix="eventswarm-otel-") as tmp:
        workdir = Path(tmp)
        tree = workdir / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)
        port = free_port()
        collector = subprocess.Popen([PYTHON, "-m", "oteltap", "--port", str(port)], stdout=subprocess.DEVNULL)
        try:
            time.sleep(1)  # (the receiver binds its port; nothing to poll before a request)
            script = workdir / "post.lua"
            script.write_text(WRK_SCRIPT)
            webhook: dict[str, list[float]] = {}
            kafka: dict[str, list[float]] = {}
            for round_ in range(args.rounds):
                for name, (source, env) in variants(tree, port).items():
                    env = {**env, "PYTHONPATH": str(source)}
                    rate, _ = daemon(script, workdir, command=[PYTHON, "-m", "dispatcher"], env=env)
                    webhook.setdefault(name, []).append(rate)
                    done = subprocess.run([PYTHON, "-c", KAFKA_RUN, topic, str(args.events)], env=env, cwd=source,
                                          capture_output=True, text=True, check=True)
                    kafka.setdefault(name, []).append(json.loads(done.stdout.splitlines()[-1])["events_per_s"])
                    print(f"round {round_ + 1} {name:7}: webhook {webhook[name][-1]:,.0f} accepts/s, "
                          f"kafka {kafka[name][-1]:,.0f} events/s", flush=True)
        finally:
            collector.terminate()
            collector.wait()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                           capture_output=True)
    result: dict[str, object] = {"before_commit": commit, "rounds": args.rounds, "kafka_events": args.events}
    for name in VARIANTS:
        result[name] = {"webhook_accepts_per_s": statistics.median(webhook[name]),
                        "kafka_events_per_s": statistics.median(kafka[name]),
                        "webhook_runs": webhook[name], "kafka_runs": kafka[name]}
    for name in VARIANTS[1:]:
        for key in ("webhook_accepts_per_s", "kafka_events_per_s"):
            ratio = result[name][key] / result["before"][key]  # type: ignore[index]
            result[name][f"{key.split('_')[0]}_vs_before"] = round(ratio, 3)  # type: ignore[index]
            print(f"{name:7} vs before, {key}: {ratio:.3f}")
    save("telemetry", result)
    print("written to bench/results/telemetry.json")


if __name__ == "__main__":
    main()
