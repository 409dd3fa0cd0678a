"""Kafka records as CloudEvents: the byte-template encoder makes exactly the events ``to_event`` makes."""

import json
import struct

import pytest
from aiokafka.consumer.fetcher import FetchResult, PartitionRecords
from aiokafka.record._crc32c import crc as crc32c
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from connectors.kafka_records import Record, _PayloadBuffer, encode_records, payloads_of, to_event
from dispatcher.events import rfc3339, rfc3339_ms

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
values = st.one_of(
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    json_values.map(lambda v: json.dumps(v, indent=1).encode()),  # whitespace kept as it came
    st.text().map(str.encode),
    st.binary(max_size=40),
    st.sampled_from([b"NaN", b"1e400", b'"\\ud800"', b"\xef\xbb\xbf{}", b"{not json", b"", b"\xff\xfe", b'"\xff"',
                     b" null ", b'{"a": "\xc3\xa9"}']),
    st.none())
keys = st.none() | st.text(max_size=8).map(str.encode) | st.binary(max_size=8)
headers = st.lists(st.tuples(st.text(max_size=5), st.binary(max_size=5)), max_size=2)


@st.composite
def records(draw):
    count = draw(st.integers(min_value=1, max_value=12))
    offset = draw(st.integers(min_value=0, max_value=10**12))
    timestamp = draw(st.sampled_from([-1, 0, 1_700_000_000_123]) | st.integers(min_value=1, max_value=4 * 10**12))
    out = []
    for _ in range(count):
        value, key = draw(values), draw(keys)
        out.append(ConsumerRecord("orders.v1", 3, offset, timestamp, 0, key, value, None,
                                  len(key or b""), len(value or b""), draw(headers)))
        offset += draw(st.integers(min_value=1, max_value=3))
        timestamp += draw(st.integers(min_value=0, max_value=5))
    return out


@pytest.mark.parametrize("value_format", ["json", "text", "bytes"])
@given(batch=records())
def test_the_fast_encoding_is_the_event_to_event_makes(value_format, batch):
    received = 1_763_960_000.5
    payloads = payloads_of(batch)
    encoded, ids, subjects, offsets, _ = encode_records("orders.v1", 3, payloads, value_format, received)
    assert list(offsets) == [record.offset for record in batch]
    for record, raw, event_id, subject, payload in zip(batch, encoded, ids, subjects, payloads, strict=True):
        event = to_event(record, value_format, received)
        # What the run keeps of the record makes the same event again (dead letters, filters).
        assert to_event(Record(record.topic, record.partition, *payload), value_format, received).to_dict() == event.to_dict()
        doc = json.loads(raw)
        if "data" in doc and doc["data"] is None:
            del doc["data"]  # a JSON null value: "data": null, as it came; an Event without data has none
        assert doc == event.to_dict()
        assert (event_id, subject) == (event.id, event.subject)


def test_a_value_that_is_not_strict_json_arrives_as_data_base64_saying_why():
    for value in (b"NaN", b'"\\ud800"', b'"\xff"', b"\xef\xbb\xbf{}", b"[1,]", b"{not json"):
        record = ConsumerRecord("t", 0, 7, 1, 0, None, value, None, 0, len(value), [])
        doc = json.loads(encode_records("t", 0, payloads_of([record]), "json", 0.0)[0][0])
        assert doc["data_base64"] and doc["dataerror"].startswith("not valid JSON") and "data" not in doc


def test_the_fetcher_hands_out_the_payloads_its_consumer_records_would_give():
    tp = TopicPartition("t", 2)
    fetched = bytearray()
    for base in (0, 4):  # two record batches in one fetch
        builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                            producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
        for i in range(4):
            builder.append(i, timestamp=1_700_000_000_000 + base + i, key=None if i == 1 else b"k%d" % i,
                           value=None if i == 2 else b'{"n": %d}' % (base + i), headers=[("h", b"v")] if i == 3 else [])
        batch = builder.build()
        batch[0:8] = base.to_bytes(8, "big")  # the batch's base offset
        fetched += batch

    def partition_records() -> PartitionRecords:
        return PartitionRecords(tp, MemoryRecords(bytes(fetched)), None, 1, None, None, True, 0)  # fetched from offset 1

    consumer_records = list(partition_records())
    assert [record.offset for record in consumer_records] == [1, 2, 3, 4, 5, 6, 7]
    told: list[tuple[object, int, BaseException]] = []
    buffer = _PayloadBuffer(lambda *bad: told.append(bad))
    buffer[tp] = FetchResult(tp, assignment=None, partition_records=partition_records(), backoff=0)
    payloads = list(buffer[tp]._partition_records)
    assert payloads == payloads_of(consumer_records)
    assert payloads[2] == (3, 1_700_000_000_003, b"k3", b'{"n": 3}', (("h", b"v"),))
    assert payloads_of(payloads) == payloads
    assert not told

    # The second batch says it is lz4 and is not: the records before it come out, and the buffer says where it stopped.
    at = len(fetched) // 2  # (where the second batch begins: both have the same size)
    attributes = struct.unpack_from(">h", fetched, at + 21)[0]
    struct.pack_into(">h", fetched, at + 21, (attributes & ~7) | 3)
    struct.pack_into(">I", fetched, at + 17, crc32c(bytes(fetched[at + 21:])))
    records = partition_records()
    buffer[tp] = FetchResult(tp, assignment=None, partition_records=records, backoff=0)
    assert [payload[0] for payload in buffer[tp]._partition_records] == [1, 2, 3]
    assert [(bad[0], bad[1]) for bad in told] == [(tp, 4)] and records.next_fetch_offset == 4


def test_a_record_time_in_milliseconds_is_exact():
    assert rfc3339_ms(1_700_000_000_123) == "2023-11-14T22:13:20.123000Z"
    assert rfc3339(1_700_000_000.123).endswith("20.122999Z")  # why not through seconds as a float
    record = ConsumerRecord("t", 0, 7, 1_700_000_000_001, 0, None, b"1", None, 0, 1, [])
    assert json.loads(encode_records("t", 0, payloads_of([record]), "json", 0.0)[0][0])["time"] == "2023-11-14T22:13:20.001000Z"
