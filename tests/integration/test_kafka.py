"""The Kafka source against a real broker (tansu), with records produced by an independent client."""

from __future__ import annotations

import itertools
import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from dispatcher.config import parse
from dispatcher.daemon import Daemon
from tests.kafka import committed, consume_all, new_topic, own_broker, produce, produce_undecodable
from tests.support import base_config, free_port, post, running_daemon, store_of, wait_for, wait_until

pytestmark = pytest.mark.anyio


def config(tmp_path, broker: str, topic: str, script: str = "cat", *, executor: str = "process",
           **trigger: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, executor=executor)
    if executor == "process":
        doc["functions"]["f"] = {"command": ["sh", "-c", script], "timeout": "60s"}
    else:
        doc["functions"]["f"] = {"image": "eventswarm/busybox:test", "command": ["sh", "-c", script], "timeout": "60s"}
    source = {"kind": "kafka", "bootstrap_servers": [broker], "topics": [topic], "group_id": f"g-{topic}",
              **trigger.pop("source", {})}
    doc["triggers"]["t"] = {"function": "f", "source": source, "ordering": "partition", "max_in_flight": 4,
                            "batch": {"max_events": 500, "max_wait": "50ms"},
                            "retry": {"max_attempts": 2, "initial": "20ms", "jitter": False}, **trigger}
    return doc


def seen_ids(doc) -> list[str]:
    """Event ids the functions printed (one per line), over every succeeded invocation, oldest first."""
    store = store_of(doc)
    ids: list[str] = []
    for record in reversed(store.invocations(status="succeeded", limit=100_000)):
        ids += store.logs(record.id)[0].decode().split()
    return ids


PRINT_IDS = "grep -o '\"id\":\"[^\"]*\"' | cut -d'\"' -f4"


async def test_every_record_reaches_the_function_and_offsets_are_committed_to_the_high_watermarks(tmp_path, kafka_broker):
    topic = new_topic(kafka_broker, 4)
    high = produce(kafka_broker, topic, ((f"k{i % 50}".encode(), json.dumps({"n": i}).encode()) for i in range(2000)))
    doc = config(tmp_path, kafka_broker, topic, PRINT_IDS)
    async with running_daemon(doc) as daemon:
        await wait_for(lambda: len(set(seen_ids(doc))) == 2000, timeout=60, what="all 2000 records")
        assert daemon.triggers["t"].source.fetches_payloads  # fetches came back as payloads: the fast path is on
        await wait_for(lambda: committed(kafka_broker, f"g-{topic}", topic, 4) == high, timeout=30,
                       what="committed offsets to reach the high watermarks")
        # The lag metric (high watermarks from fetches minus committable offsets) comes back to 0.
        await wait_for(lambda: daemon.triggers["t"].lag == 0, timeout=15, what="the lag to reach 0")
    expected = {f"{topic}/{p}/{o}" for p, n in high.items() for o in range(n)}
    assert set(seen_ids(doc)) == expected


CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


async def test_records_in_every_codec_a_producer_may_use_all_run_once_in_one_topic(tmp_path, kafka_broker):
    """librdkafka (confluent-kafka) compresses each batch with its codec; the broker keeps the batches as they
    came; the source reads them all, in one partition, in order, and a restart runs none of them again."""
    topic = new_topic(kafka_broker, 1)
    for codec in CODECS:
        produce(kafka_broker, topic, [(codec.encode(), json.dumps({"codec": codec, "n": n}).encode())
                                      for n in range(3)], compression=codec)
    doc = config(tmp_path, kafka_broker, topic, PRINT_IDS)
    everything = {f"{topic}/0/{offset}" for offset in range(15)}
    async with running_daemon(doc):
        await wait_for(lambda: set(seen_ids(doc)) == everything, timeout=60, what="every codec's records")
    produce(kafka_broker, topic, [(b"after", b'{"after": true}')])
    async with running_daemon(doc):
        await wait_for(lambda: f"{topic}/0/15" in seen_ids(doc), timeout=60, what="the record after the restart")
    assert sorted(seen_ids(doc)) == sorted([*everything, f"{topic}/0/15"])  # each once


async def test_records_no_library_can_decode_pause_their_partition_loudly_and_the_others_go_on(
        tmp_path, kafka_broker, caplog):
    """Partition 0: three good records, a batch that says lz4 and is not, three good records after it; partition 1:
    ten good records. Partition 1 and what comes before the bad batch all run; partition 0 stops at the bad batch,
    its offset committed up to it and no further; the error names topic, partition and offset, in one line."""
    topic = new_topic(kafka_broker, 2)
    produce(kafka_broker, topic, [(None, b'{"before": %d}' % n) for n in range(3)], partition=0)
    await anyio.to_thread.run_sync(lambda: produce_undecodable(kafka_broker, topic, 0, codec=3))
    produce(kafka_broker, topic, [(None, b'{"after": %d}' % n) for n in range(3)], partition=0)
    produce(kafka_broker, topic, [(None, b'{"other": %d}' % n) for n in range(10)], partition=1)
    doc = config(tmp_path, kafka_broker, topic, PRINT_IDS)
    expected = {f"{topic}/0/{n}" for n in range(3)} | {f"{topic}/1/{n}" for n in range(10)}
    async with running_daemon(doc, ready=False) as daemon:  # (not ready: that is the point)
        await wait_for(lambda: set(seen_ids(doc)) == expected, timeout=60, what="partition 1 and partition 0's start")
        await wait_for(lambda: committed(kafka_broker, f"g-{topic}", topic, 2) == {0: 3, 1: 10}, timeout=30,
                       what="the commits: partition 0 up to the bad batch")
        error = daemon.triggers["t"].status()["last_error"]
        assert f"the records of {topic}/0 from offset 3 cannot be decoded" in error and "lz4" in error, error
        assert not (await daemon._ready())["sources"]["t"]
    assert set(seen_ids(doc)) == expected  # nothing after the bad batch, nothing skipped
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert sum("cannot be decoded" in r.getMessage() for r in caplog.records if r.levelname == "ERROR") == 1


async def test_header_values_travel_losslessly_bytes_nulls_and_repeated_names(tmp_path, kafka_broker):
    topic = new_topic(kafka_broker, 1)
    headers = [("bin", b"\xff\xfe"), ("text", "caf\u00e9".encode()), ("null", None), ("dup", b"a"), ("dup", b"\x80")]
    produce(kafka_broker, topic, [(b"k", b'{"n": 1}')], headers=headers)
    doc = config(tmp_path, kafka_broker, topic, "cat")
    async with running_daemon(doc):
        await wait_for(lambda: store_of(doc).invocations(status="succeeded"), timeout=60, what="the record")
    store = store_of(doc)
    (event,) = json.loads(store.logs(store.invocations(status="succeeded")[0].id)[0])["events"]
    assert json.loads(event["kafkaheaders"]) == {"bin": {"base64": "//4="}, "text": "caf\u00e9", "null": None,
                                                 "dup": ["a", {"base64": "gA=="}]}


async def test_values_that_do_not_fit_the_format_arrive_as_data_base64(tmp_path, kafka_broker):
    json_topic, text_topic = new_topic(kafka_broker, 1), new_topic(kafka_broker, 1)
    produce(kafka_broker, json_topic, [(None, b"{not json"), (None, b'{"ok": 1}')])
    produce(kafka_broker, text_topic, [(None, b"\xff\xfe not utf-8"), (None, "héllo".encode())])
    doc = config(tmp_path, kafka_broker, json_topic, "cat")
    doc["triggers"]["u"] = {**doc["triggers"]["t"], "source": {**doc["triggers"]["t"]["source"], "topics": [text_topic],
                                                               "group_id": f"g-{text_topic}", "value_format": "text"}}
    async with running_daemon(doc) as daemon:
        await wait_for(lambda: sum(r.batch_size for r in store_of(doc).invocations(status="succeeded")) == 4,
                       timeout=30, what="four records")
        assert daemon.triggers["u"].ready
    events = {}
    store = store_of(doc)
    for record in store.invocations(status="succeeded"):
        for event in json.loads(store.logs(record.id)[0])["events"]:
            events[event["id"]] = event
    bad_json, good_json = events[f"{json_topic}/0/0"], events[f"{json_topic}/0/1"]
    assert bad_json["data_base64"] == "e25vdCBqc29u" and "not valid JSON" in bad_json["dataerror"]
    assert good_json["data"] == {"ok": 1}
    bad_text, good_text = events[f"{text_topic}/0/0"], events[f"{text_topic}/0/1"]
    assert "data_base64" in bad_text and "not valid UTF-8" in bad_text["dataerror"]
    assert good_text["data"] == "héllo"


async def test_a_poison_record_is_dead_lettered_to_the_store_and_the_topic_and_the_partition_moves_past_it(tmp_path, kafka_broker):
    topic, dlq = new_topic(kafka_broker, 1), new_topic(kafka_broker, 1, prefix="dlq")
    values = [json.dumps({"n": i, **({"poison": True} if i == 7 else {})}).encode() for i in range(20)]
    high = produce(kafka_broker, topic, [(b"k", v) for v in values])
    doc = config(tmp_path, kafka_broker, topic, 'if grep -q poison; then exit 1; fi',
                 source={"dead_letter_topic": dlq})
    async with running_daemon(doc):
        await wait_for(lambda: committed(kafka_broker, f"g-{topic}", topic, 1) == high, timeout=60,
                       what="the partition committed past the poison record")
    letters = store_of(doc).dead_letters()
    assert [d.event["id"] for d in letters] == [f"{topic}/0/7"]
    produced = consume_all(kafka_broker, dlq, 1)
    assert [(k, v) for k, v, _ in produced] == [(b"k", values[7])]
    succeeded = {i for r in store_of(doc).invocations(status="succeeded") for i in r.event_ids}
    assert succeeded == {f"{topic}/0/{i}" for i in range(20) if i != 7}


async def test_a_partial_failure_retries_only_the_named_records_of_a_fetch_and_commits_past_them(tmp_path, kafka_broker):
    topic = new_topic(kafka_broker, 1)
    high = produce(kafka_broker, topic, [(b"k", json.dumps({"n": i}).encode()) for i in range(300)])
    # The first try of each batch names its records whose offset ends in 3 as failed; the second try succeeds.
    script = ("if [ \"$EVENTSWARM_ATTEMPT\" = 1 ]; then "
              "ids=$(grep -o '\"id\":\"[^\"]*3\"' | cut -d'\"' -f4 | sed 's/.*/\"&\"/' | paste -sd, -); "
              "echo \"{\\\"failed\\\":[$ids]}\"; else cat >/dev/null; fi")
    doc = config(tmp_path, kafka_broker, topic, script, batch={"max_events": 64, "max_wait": "20ms"})
    async with running_daemon(doc):
        await wait_for(lambda: committed(kafka_broker, f"g-{topic}", topic, 1) == high, timeout=60,
                       what="the partition committed to its high watermark")
    records = store_of(doc).invocations(status="succeeded", limit=1000)
    retried = [i for r in records if r.attempt == 2 for i in r.event_ids]
    assert sorted(retried) == sorted(f"{topic}/0/{o}" for o in range(300) if o % 10 == 3)
    assert {i for r in records if r.attempt == 1 for i in r.event_ids} == {f"{topic}/0/{o}" for o in range(300)}
    assert not [r for r in records if r.attempt > 2] and not store_of(doc).dead_letters()


# -- through the docker executor --------------------------------------------------------------

async def test_50000_records_over_4_partitions_all_reach_containers_and_commit_to_the_high_watermarks(
        tmp_path, kafka_broker, docker_engine):
    topic = new_topic(kafka_broker, 4)
    high = produce(kafka_broker, topic, ((f"k{i % 97}".encode(), json.dumps({"n": i}).encode()) for i in range(50_000)))
    assert sum(high.values()) == 50_000
    doc = config(tmp_path, kafka_broker, topic, PRINT_IDS, executor="docker", max_in_flight=4,
                 batch={"max_events": 1000, "max_bytes": "1MiB", "max_wait": "100ms"})
    async with running_daemon(doc):
        await wait_for(lambda: len(set(seen_ids(doc))) == 50_000, timeout=300, interval=1, what="all 50,000 records")
        await wait_for(lambda: committed(kafka_broker, f"g-{topic}", topic, 4) == high, timeout=30,
                       what="committed offsets to reach the high watermarks")
    assert set(seen_ids(doc)) == {f"{topic}/{p}/{o}" for p, n in high.items() for o in range(n)}


async def test_key_ordering_keeps_each_keys_order_while_different_keys_run_concurrently(tmp_path, kafka_broker, docker_engine):
    topic = new_topic(kafka_broker, 2)
    keys = [f"key-{k}" for k in range(8)]
    produce(kafka_broker, topic, ((keys[i % 8].encode(), json.dumps({"n": i}).encode()) for i in range(800)))
    # The value arrives as produced, {"n": 7} with its space.
    script = ("input=$(cat); echo \"$input\" | grep -o '\"subject\":\"key-[0-9]*\"[^}]*\"n\": *[0-9]*' "
              "| sed 's/\"subject\":\"\\(key-[0-9]*\\)\".*\"n\": *\\([0-9]*\\)/\\1 \\2/'; sleep 0.3")
    doc = config(tmp_path, kafka_broker, topic, script, executor="docker", ordering="key", max_in_flight=4,
                 batch={"max_events": 20, "max_wait": "20ms"})
    async with running_daemon(doc):
        def pairs():
            store = store_of(doc)
            out = []
            for record in sorted(store.invocations(status="succeeded", limit=10_000), key=lambda r: r.started_at):
                out += [line.split() for line in store.logs(record.id)[0].decode().splitlines()]
            return out
        await wait_for(lambda: len(pairs()) >= 800, timeout=180, interval=0.5, what="all 800 records")
    by_key: dict[str, list[int]] = {}
    for key, n in pairs():
        by_key.setdefault(key, []).append(int(n))
    assert sorted(by_key) == keys
    for key, seen in by_key.items():
        assert seen == sorted(seen) and len(seen) == len(set(seen)) == 100, key
    # Different keys ran at the same time: some invocations' run times overlap.
    records = sorted(store_of(doc).invocations(status="succeeded", limit=10_000), key=lambda r: r.started_at)
    overlaps = sum(1 for a, b in itertools.pairwise(records) if b.started_at < a.finished_at)
    assert overlaps > 0


def test_three_kill_9s_during_a_20000_record_run_lose_nothing_and_rerun_only_uncommitted_records(
        tmp_path, kafka_broker, docker_engine, daemon_process):
    topic = new_topic(kafka_broker, 4)
    high = produce(kafka_broker, topic, ((f"k{i % 31}".encode(), json.dumps({"n": i}).encode()) for i in range(20_000)))
    doc = config(tmp_path, kafka_broker, topic, PRINT_IDS + "; sleep 0.2", executor="docker", max_in_flight=4,
                 batch={"max_events": 250, "max_wait": "50ms"})
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    seen_before_kill: set[str] = set()
    for kill in range(3):
        daemon = daemon_process(doc).start()
        target = (kill + 1) * 4000
        wait_until(lambda target=target: len(set(seen_ids(doc))) >= target, timeout=120, interval=0.2,
                   what=f"{target} records")
        daemon.kill()
        # What was committed when the daemon died must never run again.
        floor = committed(kafka_broker, f"g-{topic}", topic, 4)
        seen_before_kill = set(seen_ids(doc))
        never_again = {f"{topic}/{p}/{o}" for p, c in floor.items() for o in range(max(c, 0))}
        assert never_again <= seen_before_kill
        first_seen = len(seen_ids(doc))
        daemon = daemon_process(doc).start()
        wait_until(lambda first_seen=first_seen: len(seen_ids(doc)) > first_seen, timeout=60,
                   what="progress after the restart")
        rerun = seen_ids(doc)[first_seen:]
        assert not (set(rerun) & never_again), "a committed record ran again"
        daemon.stop()
    daemon = daemon_process(doc).start()
    everything = {f"{topic}/{p}/{o}" for p, n in high.items() for o in range(n)}
    wait_until(lambda: set(seen_ids(doc)) >= everything, timeout=300, interval=0.5, what="all 20,000 records")
    wait_until(lambda: committed(kafka_broker, f"g-{topic}", topic, 4) == high, timeout=30, what="the final commit")
    assert daemon.stop() == 0
    ids = seen_ids(doc)
    duplicates = len(ids) - len(set(ids))
    # Duplicates come only from records past the committed offsets at a kill: at most what was in
    # flight or buffered (4 lanes of 250-record batches, the buffer, the commit interval's worth).
    assert duplicates <= 3 * 12_000
    interrupted = [r for r in store_of(doc).invocations(status="failed", limit=100_000) if "interrupted" in (r.error or "")]
    assert len(interrupted) <= 3 * 4


def test_backpressure_pauses_the_consumer_and_memory_stays_flat_with_500000_records_waiting(
        tmp_path, kafka_broker, docker_engine, daemon_process):
    topic = new_topic(kafka_broker, 4)
    value = json.dumps({"payload": "x" * 60}).encode()
    produce(kafka_broker, topic, ((None, value) for _ in range(500_000)))
    doc = config(tmp_path, kafka_broker, topic, "sleep 600", executor="docker", max_in_flight=2, buffer=2000,
                 batch={"max_events": 100, "max_wait": "50ms"})
    doc["daemon"].update({"listen": f"127.0.0.1:{free_port()}", "shutdown_grace": "1s"})
    daemon = daemon_process(doc).start()
    metrics_url = f"http://127.0.0.1:{daemon.port}/metrics"

    def paused() -> bool:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            return 'eventswarm_source_paused{trigger="t"} 1.0' in response.read().decode()

    wait_until(paused, timeout=60, what="the consumer to pause")

    def lag() -> float:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            line = next(x for x in response.read().decode().splitlines() if x.startswith("eventswarm_source_lag{"))
        return float(line.split()[-1])

    wait_until(lambda: lag() > 400_000, timeout=30, what="the lag metric to show the backlog")
    samples = []
    for _ in range(10):
        samples.append(rss_mb(daemon.proc.pid))
        time.sleep(0.5)
        assert paused()
    status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/v1/status", timeout=5).read())
    assert status["triggers"][0]["paused"] is True
    assert status["triggers"][0]["buffered"] <= 2000 + 100
    print(f"daemon RSS while paused with 500,000 records waiting: {max(samples):.0f} MB")
    assert max(samples) < 150, samples
    assert daemon.stop() == 0
    assert "source of trigger t paused" in daemon.log.read_text()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_two_daemons_in_one_group_split_the_partitions_and_commit_only_their_own(tmp_path, kafka_broker):
    topic = new_topic(kafka_broker, 4)
    high = produce(kafka_broker, topic, ((f"k{i % 13}".encode(), json.dumps({"n": i}).encode()) for i in range(2000)))
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    gate = tmp_path / "gate"
    # Every batch waits for the gate, so the first member cannot finish the topic before the second joins.
    script = f"{PRINT_IDS}; until [ -e {gate} ]; do sleep 0.05; done"
    docs = [config(path, kafka_broker, topic, script, buffer=200, batch={"max_events": 50, "max_wait": "20ms"})
            for path in (first, second)]
    async with running_daemon(docs[0]) as one:
        await wait_for(lambda: store_of(docs[0]).invocations(status="running"), timeout=30,
                       what="the first member to start a batch")
        async with running_daemon(docs[1]) as two:
            await wait_for(lambda: one.triggers["t"].source.revocations, timeout=30,
                           what="the second member's join to start a rebalance")
            gate.touch()
            await wait_for(lambda: len(set(seen_ids(docs[0])) | set(seen_ids(docs[1]))) == 2000, timeout=120,
                           interval=0.2, what="all 2000 records between the two members")
            await wait_for(lambda: committed(kafka_broker, f"g-{topic}", topic, 4) == high, timeout=30,
                           what="every partition committed to its high watermark")
            owned_one = {tp.partition for tp in one.triggers["t"].source.marks}
            owned_two = {tp.partition for tp in two.triggers["t"].source.marks}
    assert owned_one and owned_two and not owned_one & owned_two
    assert seen_ids(docs[1]), "the second member took partitions over"


def test_sigterm_commits_what_finished_during_the_grace_period_and_nothing_more(tmp_path, kafka_broker, daemon_process):
    topic = new_topic(kafka_broker, 1)
    produce(kafka_broker, topic, ((None, json.dumps({"n": i}).encode()) for i in range(300)))
    doc = config(tmp_path, kafka_broker, topic, PRINT_IDS + "; sleep 2", batch={"max_events": 100, "max_wait": "50ms"})
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    daemon = daemon_process(doc).start()
    wait_until(lambda: store_of(doc).invocations(status="running"), timeout=30, what="the first batch to run")
    assert daemon.stop() == 0
    seen = seen_ids(doc)
    assert len(seen) >= 100 and len(seen) == len(set(seen))
    # The batch in flight at SIGTERM finished within the grace period, and its offsets were committed.
    assert committed(kafka_broker, f"g-{topic}", topic, 1) == {0: len(seen)}
    assert seen == [f"{topic}/0/{o}" for o in range(len(seen))]


async def test_an_unreachable_broker_leaves_the_daemon_up_and_not_ready(tmp_path):
    doc = config(tmp_path, f"127.0.0.1:{free_port()}", "nowhere", "cat")
    doc["triggers"]["hook"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/h", "mode": "sync"}}
    daemon = Daemon(parse(doc))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        await daemon.started.wait()
        await wait_for(lambda: daemon.triggers["t"].source_error, timeout=30, what="the source to report its error")
        report = await daemon._ready()
        assert report["ready"] is False and report["sources"]["t"] is False
        assert "Kafka" in daemon.triggers["t"].status()["last_error"]
        await wait_for(lambda: daemon.triggers["hook"].ready, timeout=10, what="the webhook trigger")
        url = f"http://127.0.0.1:{daemon.http.port}/hooks/h"
        status, _, _ = await anyio.to_thread.run_sync(lambda: post(url, b"{}"))
        assert status == 200  # the other trigger works meanwhile
        daemon.stop()


def test_a_stuck_record_pauses_its_partition_at_the_cap_and_the_commit_jumps_once_it_is_dead_lettered(
        tmp_path, kafka_broker, daemon_process):
    """One record hangs its batch (no ordering) while every other batch succeeds: the partition's tracker
    fills to ``max_uncommitted``, the partition pauses with memory flat and nothing committed past the
    stuck record; when the stuck batch times out and is dead-lettered, the commit jumps to the high watermark."""
    topic = new_topic(kafka_broker, 1)
    total, stuck = 200_000, 100
    high = produce(kafka_broker, topic, ((None, json.dumps({"n": i, **({"stuck": 1} if i == stuck else {})}).encode())
                                         for i in range(total)))
    doc = config(tmp_path, kafka_broker, topic, "if grep -q stuck; then exec sleep 600; fi",
                 ordering="none", buffer=20_000, batch={"max_events": 2000, "max_wait": "50ms"},
                 retry={"max_attempts": 1, "bisect": False}, source={"max_uncommitted": 1000})
    # The first fetch (up to 2,000 records, the stuck one among them) is over the cap on its own, so the
    # next fetch waits for it; the buffer (20,000) is far from full, so what pauses is the cap.
    doc["functions"]["f"]["timeout"] = "30s"
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    daemon = daemon_process(doc).start()
    status_url = f"http://127.0.0.1:{daemon.port}/v1/status"

    def trigger() -> dict[str, Any]:
        return json.loads(urllib.request.urlopen(status_url, timeout=5).read())["triggers"][0]

    wait_until(lambda: trigger()["paused"], timeout=25, what="the partition to pause at max_uncommitted")
    assert "paused: " in daemon.log.read_text() and "(max_uncommitted)" in daemon.log.read_text()
    samples = []
    for _ in range(8):
        samples.append(rss_mb(daemon.proc.pid))
        time.sleep(0.5)
        assert trigger()["paused"]
    print(f"daemon RSS while paused at the cap: {min(samples):.1f}-{max(samples):.1f} MB")
    assert max(samples) - min(samples) < 5, samples
    assert committed(kafka_broker, f"g-{topic}", topic, 1)[0] <= stuck, "committed past the stuck record"
    backfill = wait_until(lambda: trigger()["backfill"], timeout=15, what="the backlog followed as a backfill")
    assert backfill["unit"] == "records" and backfill["total"] >= total - 2000, backfill
    assert trigger()["lag_unit"] == "records"
    assert not store_of(doc).dead_letters(), "the stuck batch timed out before the test looked"

    wait_until(lambda: committed(kafka_broker, f"g-{topic}", topic, 1) == high, timeout=120,
               what="the commit to jump to the high watermark once the stuck batch is dead-lettered")
    assert not trigger()["paused"]
    wait_until(lambda: trigger()["backfill"] is None, timeout=15, what="the backfill to end once caught up")
    assert "backfill done" in daemon.log.read_text()
    letters = {d.event["id"] for d in store_of(doc).dead_letters(limit=10_000)}
    assert f"{topic}/0/{stuck}" in letters and len(letters) <= 2000
    succeeded = {i for r in store_of(doc).invocations(status="succeeded", limit=100_000) for i in r.event_ids}
    assert succeeded | letters == {f"{topic}/0/{o}" for o in range(total)}
    assert daemon.stop() == 0


async def test_a_dead_letter_topic_that_cannot_be_written_fails_the_source_visibly_and_nothing_is_lost(
        tmp_path, kafka_broker):
    """The broker stops answering while a batch is dead-lettered: producing fails within
    ``dead_letter_timeout``, the source fails (``/readyz``, ``status``, a metric) instead of leaving the
    partition silently stuck, and once the broker is back every record is delivered and committed."""
    gate = tmp_path / "gate"
    with own_broker(tmp_path / "tansu.log") as (broker, tansu):
        topic, dlq = new_topic(broker, 1), new_topic(broker, 1, prefix="dlq")
        values = [json.dumps({"n": i, **({"poison": 1} if i == 30 else {})}).encode() for i in range(60)]
        high = produce(broker, topic, ((b"k", v) for v in values))
        script = f"if grep -q poison; then until [ -e {gate} ]; do sleep 0.05; done; exit 1; fi"
        doc = config(tmp_path, broker, topic, script, ordering="none", batch={"max_events": 10, "max_wait": "20ms"},
                     retry={"max_attempts": 1, "bisect": False},
                     source={"dead_letter_topic": dlq, "dead_letter_timeout": "2s", "commit_interval": "200ms"})
        async with running_daemon(doc) as daemon:
            trigger = daemon.triggers["t"]
            await wait_for(lambda: store_of(doc).invocations(status="running"), timeout=30,
                           what="the poison record's batch to run")
            tansu.send_signal(signal.SIGSTOP)  # the broker is gone for the producer (and everyone else)
            gate.touch()
            await wait_for(lambda: trigger.source_error and "dead-letter topic" in trigger.source_error, timeout=30,
                           what="the source to fail on the dead letters it could not produce")
            report = await daemon._ready()
            assert report["ready"] is False and report["sources"]["t"] is False
            assert "could not be produced" in trigger.status()["last_error"]
            assert 'eventswarm_source_errors_total{trigger="t"}' in daemon.metrics.render()[0].decode()
            tansu.send_signal(signal.SIGCONT)
            await wait_for(lambda: trigger.ready, timeout=90, what="the source to restart once the broker is back")
            await wait_for(lambda: committed(broker, f"g-{topic}", topic, 1) == high, timeout=60, interval=0.5,
                           what="every record committed after the recovery")
        produced = consume_all(broker, dlq, 1)
        assert {(k, v) for k, v, _ in produced} == {(b"k", values[30])}
        succeeded = {i for r in store_of(doc).invocations(status="succeeded", limit=10_000) for i in r.event_ids}
        letters = {d.event["id"] for d in store_of(doc).dead_letters()}
        assert succeeded | letters == {f"{topic}/0/{o}" for o in range(60)}
        assert f"{topic}/0/30" in letters
