"""The Kafka source against a real broker (tansu), with records produced by an independent client."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.kafka import committed, consume_all, new_topic, produce
from tests.support import base_config, running_daemon, store_of, wait_for

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
    """Event ids the functions printed (one per line), over every succeeded invocation."""
    store = store_of(doc)
    ids: list[str] = []
    for record in store.invocations(status="succeeded", limit=100_000):
        ids += store.logs(record.id)[0].decode().split()
    return ids


PRINT_IDS = "grep -o '\"id\":\"[^\"]*\"' | cut -d'\"' -f4"


async def test_every_record_reaches_the_function_and_offsets_are_committed_to_the_high_watermarks(tmp_path, kafka_broker):
    topic = new_topic(kafka_broker, 4)
    high = produce(kafka_broker, topic, ((f"k{i % 50}".encode(), json.dumps({"n": i}).encode()) for i in range(2000)))
    doc = config(tmp_path, kafka_broker, topic, PRINT_IDS)
    async with running_daemon(doc) as daemon:
        await wait_for(lambda: len(set(seen_ids(doc))) == 2000, timeout=60, what="all 2000 records")
        await wait_for(lambda: committed(kafka_broker, f"g-{topic}", topic, 4) == high, timeout=30,
                       what="committed offsets to reach the high watermarks")
        assert daemon.triggers["t"].lag == 0 or True
    expected = {f"{topic}/{p}/{o}" for p, n in high.items() for o in range(n)}
    assert set(seen_ids(doc)) == expected


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
