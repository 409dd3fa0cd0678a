"""The MQTT source against a real broker (Debian's mosquitto 2.0, started by the test, persistence on), with
messages published by paho's own client: events and properties, PUBACKs only after settlement, kill -9 of the
daemon, two daemons on a shared subscription, TLS, a refused password."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.mqtt import Mosquitto, publish
from tests.support import (
    base_config,
    certificates,
    free_port,
    opened_store,
    running_daemon,
    store_of,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.anyio

PRINT_N = "grep -o '\"n\":[0-9]*' | cut -d: -f2"


def config(tmp_path: Path, broker: Mosquitto, script: str = PRINT_N, name: str = "", **trigger: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, executor="process")
    doc["daemon"]["state"] = f"sqlite:///{tmp_path / f'state{name}.db'}"
    doc["functions"]["f"] = {"command": ["sh", "-c", script], "timeout": "60s"}
    source = {"kind": "mqtt", "host": "127.0.0.1", "port": broker.port, "topics": ["sensors/+/temp"],
              **trigger.pop("source", {})}
    doc["triggers"]["t"] = {"function": "f", "source": source, "max_in_flight": 4, "ordering": "none",
                            "batch": {"max_events": 200, "max_wait": "50ms"},
                            "retry": {"max_attempts": 2, "initial": "20ms", "jitter": False}, **trigger}
    return doc


def seen(doc: dict[str, Any]) -> list[int]:
    """The ``n`` of every message the functions ran, over every succeeded invocation."""
    with opened_store(doc) as store:
        return [int(n) for record in store.invocations(status="succeeded", limit=100_000)
                for n in store.logs(record.id)[0].decode().split()]


def readings(first: int, count: int) -> list[tuple[str, bytes]]:
    return [(f"sensors/s{n % 5}/temp", json.dumps({"n": n}).encode()) for n in range(first, first + count)]


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    with Mosquitto(tmp_path / "mosquitto") as server:
        yield server


async def test_each_message_is_an_event_with_its_topic_and_properties_acknowledged_after_its_batch(
        tmp_path: Path, broker: Mosquitto):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = [("tenant", "a"), ("tenant", "b"), ("traceparent", trace)]
    doc = config(tmp_path, broker, "cat")
    async with running_daemon(doc) as daemon:
        await anyio.to_thread.run_sync(lambda: publish(broker, readings(0, 20), properties=properties))
        await anyio.to_thread.run_sync(lambda: publish(broker, [("sensors/s9/temp", b"not json")], qos=0))
        await wait_for(lambda: sum(r.batch_size for r in store_of(doc).invocations(status="succeeded")) == 21,
                       timeout=30, what="21 messages run")
        assert daemon.triggers["t"].source.acknowledged == 20  # (the QoS 0 one needs none)
    store = store_of(doc)
    events = [e for r in store.invocations(status="succeeded", limit=100) for e in json.loads(store.logs(r.id)[0])["events"]]
    first = next(e for e in events if e.get("data") == {"n": 0})
    assert (first["subject"], first["type"], first["source"], first["mqttqos"], first["mqttretain"]) == \
        ("sensors/s0/temp", "eventswarm.mqtt.message", f"mqtt://127.0.0.1:{broker.port}", 1, False)
    assert json.loads(first["mqttproperties"]) == {"tenant": ["a", "b"], "traceparent": trace}
    assert first["traceparent"] == trace
    odd = next(e for e in events if e["subject"] == "sensors/s9/temp")
    assert odd["mqttqos"] == 0 and odd["dataerror"].startswith("not valid JSON")
    # Acknowledged: the session the broker keeps has nothing more to send when the daemon comes back.
    async with running_daemon(doc) as daemon:
        await anyio.sleep(1)  # (nothing must come: there is no event to wait for)
        assert daemon.triggers["t"].source.acknowledged == 0
    assert sum(r.batch_size for r in store_of(doc).invocations(status="succeeded", limit=100)) == 21


def test_five_thousand_qos_1_messages_through_a_kill_9_all_run(tmp_path: Path, broker: Mosquitto,
                                                                daemon_process: Any):
    """kill -9 of the daemon with messages delivered and not acknowledged: the broker keeps them in the session
    and sends them again when the daemon comes back under the same client id; messages published meanwhile
    wait in the session too."""
    doc = config(tmp_path, broker, PRINT_N + "; sleep 0.05")
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    daemon = daemon_process(doc).start()
    publish(broker, readings(0, 2500))
    wait_until(lambda: len(set(seen(doc))) >= 1000, timeout=60, what="1,000 messages")
    daemon.kill()
    publish(broker, readings(2500, 2500))  # (while no daemon is there)
    daemon = daemon_process(doc).start()
    wait_until(lambda: set(seen(doc)) >= set(range(5000)), timeout=120, interval=0.5, what="all 5,000 messages")
    assert daemon.stop() == 0
    ran = seen(doc)
    print(f"5,000 QoS 1 messages, a kill -9: {len(ran) - len(set(ran))} ran twice")
    assert len(ran) - len(set(ran)) <= 1000 + 4 * 200  # at most what the broker had sent and not had acknowledged


def test_the_broker_restarted_mid_stream_loses_nothing(tmp_path: Path, broker: Mosquitto, daemon_process: Any):
    """mosquitto stopped while the daemon reads (it saves its sessions: kill -9 would lose what it had not
    saved, a loss of the broker's), and started again: the source reconnects to its session, and every
    message runs, those published after the restart too."""
    doc = config(tmp_path, broker, PRINT_N + "; sleep 0.05")
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    daemon = daemon_process(doc).start()
    publish(broker, readings(0, 3000))
    wait_until(lambda: len(set(seen(doc))) >= 1000, timeout=60, what="1,000 messages")
    broker.stop()
    wait_until(lambda: "MQTT at" in daemon.log.read_text(), timeout=30, what="the daemon to see it")
    broker.start()
    publish(broker, readings(3000, 500))
    wait_until(lambda: set(seen(doc)) >= set(range(3500)), timeout=120, interval=0.5, what="all 3,500 messages")
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log.read_text()


def test_two_replicas_on_a_shared_subscription_run_each_message_once_in_all(
        tmp_path: Path, broker: Mosquitto, daemon_process: Any, postgres_database: str):
    """Two replicas of one config on one PostgreSQL state: each subscribes under a client id of its own (from its
    replica name), and the broker divides the messages between them."""
    docs = []
    for name in ("a", "b"):
        doc = config(tmp_path, broker, PRINT_N, source={"topics": ["$share/workers/sensors/+/temp"]})
        doc["daemon"].update({"state": postgres_database, "replica": name, "listen": f"127.0.0.1:{free_port()}"})
        docs.append(doc)
    daemons = [daemon_process(doc, name=doc["daemon"]["replica"]).start() for doc in docs]
    for daemon in daemons:  # each has subscribed (a shared subscription divides only among its members)
        wait_until(lambda daemon=daemon: "subscribed to" in daemon.log.read_text(), timeout=30, what="subscribed")
    assert "as eventswarm-t-a" in daemons[0].log.read_text() and "as eventswarm-t-b" in daemons[1].log.read_text()
    publish(broker, readings(0, 2000))
    wait_until(lambda: len(seen(docs[0])) >= 2000, timeout=60, what="2,000 messages")
    for daemon in daemons:
        assert daemon.stop() == 0
    assert sorted(seen(docs[0])) == list(range(2000))  # each once, in all
    with opened_store(docs[0]) as store:
        records = store.invocations(status="succeeded", limit=10_000)
    by_replica = {name: sum(r.batch_size for r in records if r.replica == name) for name in ("a", "b")}
    assert min(by_replica.values()) > 200, by_replica  # the broker divided them


@pytest.fixture
def tls_broker(tmp_path: Path, debian_tools: None) -> Any:
    certs = certificates(tmp_path / "certs")
    with Mosquitto(tmp_path / "mosquitto-tls", tls=certs, verify_clients=True) as server:
        yield server


async def test_the_source_reads_over_mutual_tls(tmp_path: Path, tls_broker: Mosquitto):
    certs = tls_broker.tls
    assert certs is not None
    doc = config(tmp_path, tls_broker, source={"ca_file": str(certs / "ca.pem"), "cert_file": str(certs / "client.pem"),
                                               "key_file": str(certs / "client.key")})
    async with running_daemon(doc):
        await anyio.to_thread.run_sync(lambda: publish(tls_broker, readings(0, 20)))
        await wait_for(lambda: sorted(seen(doc)) == list(range(20)), timeout=30, what="20 messages over TLS")


async def test_a_refused_password_is_one_line_the_daemon_stays_up_and_the_right_one_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with Mosquitto(tmp_path / "mosquitto-auth", users={"app": "right"}) as server:
        monkeypatch.setenv("MQTT_USER", "app")
        monkeypatch.setenv("MQTT_WRONG", "wrong")
        monkeypatch.setenv("MQTT_RIGHT", "right")
        doc = config(tmp_path, server, source={"username_env": "MQTT_USER", "password_env": "MQTT_WRONG"})
        async with running_daemon(doc, ready=False) as daemon:
            await wait_for(lambda: daemon.triggers["t"].source_error is not None, timeout=30,
                           what="the source's error")
            error = daemon.triggers["t"].source_error
            assert "cannot connect to MQTT" in error and "password" in error and "\n" not in error, error
            url = f"http://127.0.0.1:{daemon.http.port}/healthz"
            assert await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=5).status) == 200
        doc["triggers"]["t"]["source"]["password_env"] = "MQTT_RIGHT"
        async with running_daemon(doc):
            await anyio.to_thread.run_sync(lambda: publish(server, readings(0, 5), user="app", password="right"))
            await wait_for(lambda: sorted(seen(doc)) == list(range(5)), timeout=30, what="5 messages")



async def test_a_full_pipeline_stops_the_reading_and_the_source_holds_at_most_max_in_flight(
        tmp_path: Path, broker: Mosquitto):
    """Backpressure: a slow function and 2,000 messages in the session. The broker does not keep to the Receive
    Maximum (mosquitto 2.0.11 sends them all), so the client stops reading its socket at max_in_flight held: the
    source never holds more than that (and what one read brings), and every message runs."""
    doc = config(tmp_path, broker, PRINT_N + "; sleep 0.05", source={"max_in_flight": 50}, max_in_flight=1,
                 batch={"max_events": 10, "max_wait": "10ms"})
    async with running_daemon(doc) as daemon:
        source = daemon.triggers["t"].source
        await anyio.to_thread.run_sync(lambda: publish(broker, readings(0, 600)))
        await wait_for(lambda: sorted(seen(doc)) == list(range(600)), timeout=120, what="all 600 messages")
        assert 0 < source.most_held <= 50 + 5, source.most_held
        assert source._client is not None and source._client.pauses > 0
