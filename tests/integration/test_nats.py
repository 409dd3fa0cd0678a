"""The NATS JetStream source against a real nats-server (2.15, JetStream on file storage, started by the test),
with messages published by the test's own client: events and headers, acknowledgements only after settlement,
kill -9 of the daemon, the server killed mid-stream, TLS, sign-in refused, the lag."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.nats import NatsServer, add_stream, consumer_state, publish, publish_raw
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

PRINT_IDS = "grep -o '\"id\":\"[^\"]*\"' | cut -d'\"' -f4"


def config(tmp_path: Path, server: NatsServer, script: str = PRINT_IDS, **trigger: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, executor="process")
    doc["functions"]["f"] = {"command": ["sh", "-c", script], "timeout": "60s"}
    source = {"kind": "nats", "servers": [server.url], "stream": "ORDERS", "consumer": "eventswarm",
              **trigger.pop("source", {})}
    doc["triggers"]["t"] = {"function": "f", "source": source, "max_in_flight": 4,
                            "batch": {"max_events": 500, "max_wait": "50ms"},
                            "retry": {"max_attempts": 2, "initial": "20ms", "jitter": False}, **trigger}
    return doc


def seen_ids(doc: dict[str, Any]) -> list[str]:
    """Event ids the functions printed, over every succeeded invocation, oldest first."""
    ids: list[str] = []
    with opened_store(doc) as store:
        for record in reversed(store.invocations(status="succeeded", limit=100_000)):
            ids += store.logs(record.id)[0].decode().split()
    return ids


@pytest.fixture
def nats_server(tmp_path: Path) -> Any:
    with NatsServer(tmp_path / "nats") as server:
        yield server


async def test_each_message_is_an_event_with_its_subject_and_every_header_and_is_acknowledged_after(
        tmp_path: Path, nats_server: NatsServer):
    await add_stream(nats_server, "ORDERS", ["orders.>"])
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    messages = [(f"orders.{n % 3}", json.dumps({"n": n}).encode(), {"Tenant": f"t{n}", "traceparent": trace})
                for n in range(50)]
    await publish(nats_server, "ORDERS", messages)
    # A payload that is not JSON; headers a dict cannot hold: a name twice, a value that is not UTF-8 (sent as
    # the protocol spells them, over a socket of the test's own).
    await publish(nats_server, "ORDERS", [("orders.odd", b"not json", {"X": "1"})])
    await anyio.to_thread.run_sync(lambda: publish_raw(
        nats_server, "orders.odd", b"X-Twice: one\r\nX-Twice: two\r\nX-Bytes: \xff\xfe\r\n", b"{}"))
    doc = config(tmp_path, nats_server, "cat")
    async with running_daemon(doc):
        await wait_for(lambda: sum(r.batch_size for r in store_of(doc).invocations(status="succeeded")) == 52,
                       timeout=30, what="all 52 messages run")
    store = store_of(doc)
    events = []
    for record in store.invocations(status="succeeded", limit=100):
        events += json.loads(store.logs(record.id)[0])["events"]
    by_id = {e["id"]: e for e in events}
    assert sorted(by_id) == sorted(f"ORDERS/{n}" for n in range(1, 53))
    first = by_id["ORDERS/1"]
    assert (first["subject"], first["source"], first["type"], first["data"], first["stream"], first["sequence"]) == \
        ("orders.0", "nats://ORDERS", "eventswarm.nats.message", {"n": 0}, "ORDERS", 1)
    assert json.loads(first["natsheaders"]) == {"Tenant": "t0", "traceparent": trace}
    assert first["traceparent"] == trace
    odd = by_id["ORDERS/51"]
    assert base64.b64decode(odd["data_base64"]) == b"not json" and odd["dataerror"].startswith("not valid JSON")
    twice = by_id["ORDERS/52"]
    assert json.loads(twice["natsheaders"]) == {"X-Twice": ["one", "two"], "X-Bytes": {"base64": "//4="}}
    state = await consumer_state(nats_server, "ORDERS", "eventswarm")
    assert state == {"ack_floor": 52, "num_pending": 0, "num_ack_pending": 0}


async def test_nothing_is_acknowledged_while_its_batch_fails_and_a_dead_letter_is(tmp_path: Path,
                                                                                  nats_server: NatsServer):
    """A failing function: the trigger retries (the server does not deliver again meanwhile), then the events are
    dead letters, and only then acknowledged."""
    await add_stream(nats_server, "ORDERS", ["orders.>"])
    await publish(nats_server, "ORDERS", [("orders.a", b"{}", None) for _ in range(5)])
    doc = config(tmp_path, nats_server, "cat >/dev/null; exit 3",
                 retry={"max_attempts": 3, "initial": "1s", "jitter": False})
    async with running_daemon(doc):
        await wait_for(lambda: len(store_of(doc).invocations(limit=100)) >= 1, timeout=30, what="the first attempt")
        state = await consumer_state(nats_server, "ORDERS", "eventswarm")
        assert state["ack_floor"] == 0 and state["num_ack_pending"] == 5
        await wait_for(lambda: len(store_of(doc).dead_letters()) == 5, timeout=30, what="5 dead letters")
    state = await consumer_state(nats_server, "ORDERS", "eventswarm")
    assert state == {"ack_floor": 5, "num_pending": 0, "num_ack_pending": 0}
    assert all(r.attempt <= 3 for r in store_of(doc).invocations(limit=100))


def test_twenty_thousand_messages_through_two_kill_9s_all_run_and_only_what_was_in_flight_runs_again(
        tmp_path: Path, nats_server: NatsServer, daemon_process: Any):
    anyio.run(add_stream, nats_server, "ORDERS", ["orders.>"])
    anyio.run(publish, nats_server, "ORDERS", [(f"orders.{n % 7}", json.dumps({"n": n}).encode(), None)
                                               for n in range(20_000)])
    everything = {f"ORDERS/{n}" for n in range(1, 20_001)}
    # ack_wait 5s: the messages a killed daemon held are delivered again after 5 s, not a minute.
    doc = config(tmp_path, nats_server, PRINT_IDS + "; sleep 0.1", source={"ack_wait": "5s"},
                 batch={"max_events": 250, "max_wait": "50ms"})
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    for kill in range(2):
        daemon = daemon_process(doc).start()
        target = (kill + 1) * 6000
        wait_until(lambda target=target: len(set(seen_ids(doc))) >= target, timeout=120, interval=0.2,
                   what=f"{target} messages")
        daemon.kill()
        # What the server holds as acknowledged when the daemon died must never run again.
        floor = anyio.run(consumer_state, nats_server, "ORDERS", "eventswarm")["ack_floor"]
        never_again = {f"ORDERS/{n}" for n in range(1, floor + 1)}
        assert never_again <= set(seen_ids(doc))
        first_seen = len(seen_ids(doc))
        daemon = daemon_process(doc).start()
        wait_until(lambda first_seen=first_seen: len(seen_ids(doc)) > first_seen + 500, timeout=60,
                   what="progress after the restart")
        assert not (set(seen_ids(doc)[first_seen:]) & never_again), "an acknowledged message ran again"
        daemon.stop()
    daemon = daemon_process(doc).start()
    wait_until(lambda: set(seen_ids(doc)) >= everything, timeout=180, interval=0.5, what="all 20,000 messages")
    assert daemon.stop() == 0
    assert anyio.run(consumer_state, nats_server, "ORDERS", "eventswarm") == \
        {"ack_floor": 20_000, "num_pending": 0, "num_ack_pending": 0}
    ids = seen_ids(doc)
    assert set(ids) == everything
    # Runs again only what was in flight at a kill: batches running (4 lanes of 250) and those whose
    # acknowledgements had not left yet; never the whole backlog.
    duplicates = len(ids) - len(set(ids))
    interrupted = [r for r in store_of(doc).invocations(status="failed", limit=100_000)
                   if "interrupted" in (r.error or "")]
    assert len(interrupted) <= 2 * 4 and duplicates <= 2 * 2000, (duplicates, len(interrupted))
    print(f"20,000 messages, 2 kill -9s: {duplicates} ran twice, {len(interrupted)} batches interrupted")


def test_the_server_killed_mid_stream_and_started_again_loses_nothing(tmp_path: Path, nats_server: NatsServer,
                                                                      daemon_process: Any):
    """kill -9 of nats-server (JetStream on file storage) while the daemon reads: the client reconnects, the
    consumer's position is the server's, and every message runs, those published after the restart too."""
    anyio.run(add_stream, nats_server, "ORDERS", ["orders.>"])
    anyio.run(publish, nats_server, "ORDERS", [("orders.a", json.dumps({"n": n}).encode(), None) for n in range(5000)])
    doc = config(tmp_path, nats_server, PRINT_IDS + "; sleep 0.2", source={"ack_wait": "5s"},
                 batch={"max_events": 100, "max_wait": "50ms"})
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    daemon = daemon_process(doc).start()
    wait_until(lambda: len(set(seen_ids(doc))) >= 1000, timeout=60, what="1,000 messages")
    nats_server.kill()
    wait_until(lambda: "disconnected" in daemon.log.read_text(), timeout=30, what="the daemon to see it")
    nats_server.start()
    anyio.run(publish, nats_server, "ORDERS", [("orders.b", json.dumps({"n": n}).encode(), None) for n in range(1000)])
    everything = {f"ORDERS/{n}" for n in range(1, 6001)}
    wait_until(lambda: set(seen_ids(doc)) >= everything, timeout=120, interval=0.5, what="all 6,000 messages")
    wait_until(lambda: anyio.run(consumer_state, nats_server, "ORDERS", "eventswarm")["ack_floor"] == 6000,
               timeout=30, what="every message acknowledged")
    assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert "reconnected" in log and "Traceback" not in log


def test_two_replicas_share_the_durable_consumer_and_run_each_message_once_in_all(
        tmp_path: Path, nats_server: NatsServer, daemon_process: Any, postgres_database: str):
    """Two replicas of one config on one PostgreSQL state bind the same durable consumer: JetStream divides the
    messages between their pulls."""
    anyio.run(add_stream, nats_server, "ORDERS", ["orders.>"])
    docs = []
    for name in ("a", "b"):
        doc = config(tmp_path, nats_server, PRINT_IDS + "; sleep 0.05", batch={"max_events": 50, "max_wait": "20ms"},
                     source={"fetch_batch": 50})
        doc["daemon"].update({"state": postgres_database, "replica": name, "listen": f"127.0.0.1:{free_port()}"})
        docs.append(doc)
    daemons = [daemon_process(doc, name=doc["daemon"]["replica"]).start() for doc in docs]
    anyio.run(publish, nats_server, "ORDERS", [(f"orders.{n % 3}", json.dumps({"n": n}).encode(), None)
                                               for n in range(3000)])
    wait_until(lambda: len(seen_ids(docs[0])) >= 3000, timeout=60, what="3,000 messages")
    for daemon in daemons:
        assert daemon.stop() == 0
    assert sorted(seen_ids(docs[0])) == sorted(f"ORDERS/{n}" for n in range(1, 3001))  # each once, in all
    with opened_store(docs[0]) as store:
        records = store.invocations(status="succeeded", limit=10_000)
    by_replica = {name: sum(r.batch_size for r in records if r.replica == name) for name in ("a", "b")}
    assert min(by_replica.values()) > 300, by_replica  # JetStream divided them


async def test_a_token_signs_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with NatsServer(tmp_path / "nats-token", token="s3cret") as server:
        await add_stream(server, "ORDERS", ["orders.>"], token="s3cret")
        await publish(server, "ORDERS", [("orders.a", b"{}", None) for _ in range(3)], token="s3cret")
        monkeypatch.setenv("NATS_TOKEN", "s3cret")
        doc = config(tmp_path, server, source={"token_env": "NATS_TOKEN"})
        async with running_daemon(doc):
            await wait_for(lambda: len(set(seen_ids(doc))) == 3, timeout=30, what="3 messages")


async def test_an_nkey_signs_in(tmp_path: Path):
    import os

    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    with NatsServer(tmp_path / "nats-nkey", nkey=public) as server:
        await add_stream(server, "ORDERS", ["orders.>"], nkeys_seed=str(seed_file))
        await publish(server, "ORDERS", [("orders.a", b"{}", None) for _ in range(3)], nkeys_seed=str(seed_file))
        doc = config(tmp_path, server, source={"nkey_file": str(seed_file)})
        async with running_daemon(doc):
            await wait_for(lambda: len(set(seen_ids(doc))) == 3, timeout=30, what="3 messages")


@pytest.fixture
def nats_tls(tmp_path: Path, debian_tools: None) -> Any:
    certs = certificates(tmp_path / "certs")
    with NatsServer(tmp_path / "nats-tls", tls=certs, verify_clients=True) as server:
        yield server


async def test_the_source_reads_over_mutual_tls(tmp_path: Path, nats_tls: NatsServer):
    assert nats_tls.tls is not None
    await add_stream(nats_tls, "ORDERS", ["orders.>"])
    await publish(nats_tls, "ORDERS", [("orders.a", json.dumps({"n": n}).encode(), None) for n in range(20)])
    certs = nats_tls.tls
    doc = config(tmp_path, nats_tls, source={"ca_file": str(certs / "ca.pem"), "cert_file": str(certs / "client.pem"),
                                             "key_file": str(certs / "client.key")})
    async with running_daemon(doc):
        await wait_for(lambda: len(set(seen_ids(doc))) == 20, timeout=30, what="20 messages over TLS")


async def test_a_refused_sign_in_is_one_line_the_daemon_stays_up_and_the_right_password_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with NatsServer(tmp_path / "nats-auth", users={"app": "right"}) as server:
        await add_stream(server, "ORDERS", ["orders.>"], user="app", password="right")
        await publish(server, "ORDERS", [("orders.a", b"{}", None) for _ in range(5)], user="app", password="right")
        monkeypatch.setenv("NATS_USER", "app")
        monkeypatch.setenv("NATS_WRONG", "wrong")
        monkeypatch.setenv("NATS_RIGHT", "right")
        doc = config(tmp_path, server, source={"username_env": "NATS_USER", "password_env": "NATS_WRONG"})
        doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
        async with running_daemon(doc, ready=False) as daemon:
            await wait_for(lambda: daemon.triggers["t"].source_error is not None, timeout=30,
                           what="the source's error")
            error = daemon.triggers["t"].source_error
            assert "Authorization Violation" in error and "\n" not in error, error
            url = f"http://127.0.0.1:{daemon.http.port}/healthz"
            assert await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=5).status) == 200
        doc["triggers"]["t"]["source"]["password_env"] = "NATS_RIGHT"
        async with running_daemon(doc):
            await wait_for(lambda: len(set(seen_ids(doc))) == 5, timeout=30, what="5 messages")


async def test_status_shows_the_consumers_pending_count_as_lag(tmp_path: Path, nats_server: NatsServer):
    await add_stream(nats_server, "ORDERS", ["orders.>"])
    await publish(nats_server, "ORDERS", [("orders.a", b"{}", None) for _ in range(3000)])
    doc = config(tmp_path, nats_server, "cat >/dev/null; sleep 30", max_in_flight=1,
                 source={"max_in_flight": 200, "fetch_batch": 100}, batch={"max_events": 100, "max_wait": "10ms"})
    doc["daemon"]["shutdown_grace"] = "1s"
    async with running_daemon(doc) as daemon:
        await wait_for(lambda: (daemon.triggers["t"].lag or 0) >= 2700, timeout=30,
                       what="the lag (messages not yet delivered)")
        url = f"http://127.0.0.1:{daemon.http.port}/v1/status"
        status = json.loads(await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=5).read()))
        assert status["triggers"][0]["lag"] >= 2700 and status["triggers"][0]["lag_unit"] == "messages"
        assert len(daemon.triggers["t"].source.held) <= 200  # it holds no more than max_in_flight
