"""Kafka records as CloudEvents: the byte-template encoder makes exactly the events ``to_event`` makes."""

import json

import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st

from connectors.kafka import Record, encode_records, to_event

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
    encoded, ids, subjects, payloads = encode_records(batch, value_format, received)
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
        doc = json.loads(encode_records([record], "json", 0.0)[0][0])
        assert doc["data_base64"] and doc["dataerror"].startswith("not valid JSON") and "data" not in doc
