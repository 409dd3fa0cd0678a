"""Kafka records as the source keeps and sends them: the fetch fast path (records as small tuples, not aiokafka's
objects, with a batch that cannot be decoded ending its partition's records there), a record as a CloudEvent, and
a fetch of a partition encoded at once into the events of one run."""

from __future__ import annotations

import base64
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from json.encoder import encode_basestring
from typing import Any, NamedTuple

import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import PartitionRecords

from connectors.values import RAW_JSON, data_of, json_error
from dispatcher.api import (
    Event,
    pairs_json,
    rfc3339,
    rfc3339_ms,
    traceparent,
)

Payload = tuple[int, int, bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]
"""What a run keeps of a record: offset, timestamp, key, value, headers. A tuple of these holds no
object the garbage collector must track, so a full buffer costs the collector nothing."""


def _payload(_tp: Any, record: Any) -> Payload:
    """What a run keeps of a record, from aiokafka's ``ConsumerRecord`` or from a record of a fetched batch."""
    headers = record.headers
    return record.offset, record.timestamp, record.key, record.value, tuple(headers) if headers else ()


def payloads_of(records: Iterable[Any]) -> list[Payload]:
    """Records as payloads: a record the fetcher already made a payload stays as it is."""
    return [record if type(record) is tuple else _payload(None, record) for record in records]


Undecodable = Callable[[Any, int, BaseException], None]
"""Told of a partition whose records from an offset on cannot be decoded: (its TopicPartition, the offset, why)."""


class _PayloadBuffer(OrderedDict):  # type: ignore[type-arg]
    """aiokafka's buffer of fetched partitions, whose records come out as payloads; a batch that cannot be decoded
    ends its partition's records there (those before it come out) and is told to ``undecodable``."""

    def __init__(self, undecodable: Undecodable) -> None:
        super().__init__()
        self.undecodable = undecodable

    def __setitem__(self, tp: Any, result: Any) -> None:
        records = getattr(result, "_partition_records", None)
        if isinstance(records, PartitionRecords):
            records._consumer_record = _payload
            records._records_iterator = _guarded(records, records._records_iterator, self.undecodable)
        super().__setitem__(tp, result)


def _guarded(records: Any, iterator: Any, undecodable: Undecodable) -> Any:
    """``iterator``'s records until one cannot be decoded (a batch whose codec's data is corrupt, a codec no library
    reads): then it ends, so that aiokafka hands out the records before it and keeps the partition's position at it.
    (Raised, the error would lose the records that the same fetch drained from other partitions.)"""
    try:
        yield from iterator
    except Exception as exc:
        undecodable(records._tp, records.next_fetch_offset, exc)


def fetch_payloads(consumer: AIOKafkaConsumer, undecodable: Undecodable) -> bool:
    """Have a started consumer's ``getmany`` return payloads instead of ``ConsumerRecord`` objects.

    aiokafka builds a dataclass of eleven fields per record, about half of its cost per record;
    the source keeps a tuple of five. This reaches into aiokafka's fetcher (its ``_records``
    buffer, and the ``_consumer_record`` method of ``PartitionRecords``, which still does the
    batching, transaction and position work), so it checks that both are as expected and
    otherwise leaves the consumer alone and returns False: the source then converts each record.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    buffered = getattr(fetcher, "_records", None)
    if type(buffered) is not OrderedDict or not _consumer_record_as_expected():
        return False
    replacement = _PayloadBuffer(undecodable)
    for tp, result in buffered.items():
        replacement[tp] = result
    fetcher._records = replacement  # type: ignore[union-attr]
    return True


def _consumer_record_as_expected() -> bool:
    """aiokafka's ``PartitionRecords._consumer_record(self, tp, record)``, the method the fast path replaces."""
    method = getattr(PartitionRecords, "_consumer_record", None)
    try:
        if not callable(method) or "_records_iterator" not in inspect.getsource(PartitionRecords.__init__):
            return False
    except (OSError, TypeError):
        return False
    try:
        return list(inspect.signature(method).parameters) == ["self", "tp", "record"]
    except (TypeError, ValueError):
        return False


class Record(NamedTuple):
    """A record as ``to_event`` reads it (aiokafka's ``ConsumerRecord`` has the same fields)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def next_offset(offset: int) -> int:
    """Where a partition resumes after the record at ``offset``."""
    return offset + 1


def offset_of(payload: Payload) -> int:
    return payload[0]


def to_event(record: Any, value_format: str, received: float | None = None) -> Event:
    """A consumer record as a CloudEvent; a value that does not fit ``value_format`` travels as ``data_base64``
    (``connectors.values``)."""
    topic, partition, offset = record.topic, record.partition, record.offset
    extensions: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset}
    if record.headers:
        extensions["kafkaheaders"] = pairs_json(record.headers)
        trace = _trace(record.headers)
        if trace:
            extensions["traceparent"] = trace
    key = record.key
    subject = None
    if key is not None:
        try:
            subject = key.decode("utf-8")
        except UnicodeDecodeError:
            subject = base64.b64encode(key).decode("ascii")
            extensions["keyencoding"] = "base64"
    common: dict[str, Any] = {
        "id": f"{topic}/{partition}/{offset}", "source": f"kafka://{topic}/{partition}",
        "type": "eventswarm.kafka.record", "subject": subject, "partition": f"{topic}/{partition}",
        "time": rfc3339_ms(record.timestamp) if record.timestamp and record.timestamp > 0 else None,
        "extensions": extensions, "received": received,
    }
    return Event(**data_of(record.value, value_format, extensions), **common)


_KEYS: dict[bytes | None, tuple[str | None, bytes]] = {}
"""Record keys seen lately: the event's subject, and its JSON members (with the extension saying how it is encoded)."""


def _key(key: bytes | None) -> tuple[str | None, bytes]:
    if key is None:
        return None, b""
    try:
        subject, extra = key.decode("utf-8"), b""
    except UnicodeDecodeError:
        subject, extra = base64.b64encode(key).decode("ascii"), b',"keyencoding":"base64"'
    if len(_KEYS) >= 4096:
        _KEYS.clear()
    known = _KEYS[key] = (subject, b',"subject":' + encode_basestring(subject).encode() + extra)
    return known


def _headers(headers: Any) -> bytes:
    trace = _trace(headers)
    return (b',"kafkaheaders":' + encode_basestring(pairs_json(headers)).encode()
            + (b',"traceparent":"' + trace.encode() + b'"' if trace else b""))


def _trace(headers: Any) -> str | None:
    """A record's W3C ``traceparent`` header, when it has a well-formed one."""
    return next((trace for key, value in headers if key == "traceparent" and (trace := traceparent(value))), None)


def _json_data(values: Sequence[bytes | None]) -> Sequence[bytes | None]:
    """Each value as the event's data if it is JSON (else None: ``to_event`` says why)."""
    try:
        list(map(RAW_JSON.decode, values))  # type: ignore[arg-type]
        # Each value begins and ends with ASCII, so the whole is UTF-8 only if each value is.
        b"".join(values).decode("utf-8")  # type: ignore[arg-type]
        return values
    except (msgspec.DecodeError, UnicodeDecodeError, TypeError):
        return [value if value is not None and json_error(value) is None else None for value in values]


def _text_data(values: Sequence[bytes | None]) -> list[bytes | None]:
    data: list[bytes | None] = []
    for value in values:
        try:
            data.append(encode_basestring(value.decode("utf-8")).encode() if value is not None else None)
        except UnicodeDecodeError:
            data.append(None)
    return data


def _bytes_data(values: Sequence[bytes | None]) -> list[bytes | None]:
    return [b'"%s"' % base64.b64encode(value) if value is not None else None for value in values]


_CONTENT = {"json": (b"application/json", b"data", _json_data), "text": (b"text/plain", b"data", _text_data),
            "bytes": (b"application/octet-stream", b"data_base64", _bytes_data)}


def encode_records(topic: str, partition: int, payloads: list[Payload], value_format: str,
                   received: float,
                   ) -> tuple[list[bytes], list[str], list[str | None], Sequence[int], list[str | None] | None]:
    """The CloudEvents JSON, ids, subjects and offsets of consecutive records of one partition, and each record's
    well-formed ``traceparent`` header (None when no record has one).

    The same events as ``to_event`` would make (a test holds them equal), but built from a byte
    template over whole lists, with a JSON value embedded as it came: this is the cost per record
    of the whole source. A record without a value, or whose value does not fit ``value_format``,
    goes through ``to_event``.
    """
    content, field, to_data = _CONTENT[value_format]

    def literal(text: str) -> bytes:
        return encode_basestring(text).encode().replace(b"%", b"%%")

    prefix = f"{topic}/{partition}/"
    template = b"".join((
        b'{"specversion":"1.0","id":', literal(prefix)[:-1], b'%d","source":', literal(f"kafka://{topic}/{partition}"),
        b',"type":"eventswarm.kafka.record","time":"%s","datacontenttype":"', content, b'"%s,"topic":', literal(topic),
        b',"partition":', str(partition).encode(), b',"offset":%d,"', field, b'":%s}'))
    offsets, stamps, record_keys, values, headers = zip(*payloads, strict=True)
    ids = [prefix + str(offset) for offset in offsets]
    data = to_data(values)
    times = {stamp: (rfc3339_ms(stamp) if stamp and stamp > 0 else rfc3339(received)).encode() for stamp in set(stamps)}
    keys = [_KEYS.get(key) or _key(key) for key in record_keys]
    members = [key[1] for key in keys]  # the subject, and the extensions a record may add (their order is free)
    traces = None
    if any(headers):
        members = [member + _headers(pairs) if pairs else member for member, pairs in zip(members, headers, strict=True)]
        traces = [_trace(pairs) if pairs else None for pairs in headers]
        if not any(traces):
            traces = None
    encoded = [template % (offset, times[stamp], member, offset, value) if value is not None
               else to_event(Record(topic, partition, *payload), value_format, received).encode()
               for offset, stamp, member, value, payload in zip(offsets, stamps, members, data, payloads, strict=True)]
    return encoded, ids, [key[0] for key in keys], offsets, traces
