"""MQTT benchmark: events/s from a broker through the daemon (process executor, a trivial command per batch,
batches of 1,000), against aiomqtt's own receive loop in the same run (QoS 1, paho acknowledging each message
as it hands it over): each the median of ROUNDS runs, alternating. The messages are published into a kept
session before each run (so both read a backlog, not the publisher's pace).

Starts its own mosquitto (Debian's, scripts/tools.sh). Prints its figures and writes them to
bench/results/mqtt.json. Run: `.venv/bin/python bench/mqtt.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiomqtt
import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pipeline import against, settled, trigger_doc  # noqa: E402
from bench.webhook import save  # noqa: E402
from tests.mqtt import Mosquitto, publish  # noqa: E402

ROUNDS = 3
BATCH = 1000
VALUE = json.dumps({"payload": "x" * 80}).encode()


async def subscribe_session(broker: Mosquitto, client_id: str) -> None:
    """Make the session (and its subscription) the messages are then queued in."""
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
                              clean_start=True, properties=_session()) as client:
        await client.subscribe("bench/#", qos=1)


def _session() -> object:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    properties.ReceiveMaximum = 1000
    return properties


async def through_daemon(broker: Mosquitto, total: int, state_dir: str) -> float:
    client_id = f"d{uuid.uuid4().hex[:12]}"
    await subscribe_session(broker, client_id)
    await anyio.to_thread.run_sync(lambda: publish(broker, ((f"bench/{n % 16}", VALUE) for n in range(total))))
    doc = trigger_doc({"kind": "mqtt", "host": "127.0.0.1", "port": broker.port, "topics": ["bench/#"],
                       "client_id": client_id, "max_in_flight": 1000}, state_dir, batch=BATCH)
    count, elapsed = await settled(doc, total)
    return count / elapsed


async def raw_loop(broker: Mosquitto, total: int) -> float:
    """aiomqtt's own loop over the same kind of backlog: receive until ``total``."""
    client_id = f"r{uuid.uuid4().hex[:12]}"
    await subscribe_session(broker, client_id)
    await anyio.to_thread.run_sync(lambda: publish(broker, ((f"bench/{n % 16}", VALUE) for n in range(total))))
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
                              clean_start=False, properties=_session()) as client:
        seen, started = 0, 0.0
        async for _ in client.messages:
            if not started:
                started = time.perf_counter()
            seen += 1
            if seen >= total:
                break
        return seen / (time.perf_counter() - started)


async def main(total: int) -> None:
    with tempfile.TemporaryDirectory(prefix="eventswarm-bench-mqtt-") as tmp, Mosquitto(Path(tmp) / "mqtt") as broker:
        result = await against(lambda: through_daemon(broker, total, tmp), lambda: raw_loop(broker, total),
                               ROUNDS, "raw aiomqtt loop")
    save("mqtt", {"messages": total, "batch": BATCH, "rounds": ROUNDS, "broker": "mosquitto 2.0.11 (Debian)",
                  **result})
    print("written to bench/results/mqtt.json")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    anyio.run(main, parser.parse_args().messages)
