"""Event: one CloudEvents 1.0 event, built once per source record and encoded once."""

from __future__ import annotations

import base64
import json
import os
import re
import time as _time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def pairs_json(pairs: Iterable[tuple[str, bytes | str | None]]) -> str:
    """Name-value pairs (Kafka or HTTP headers) as the text of a JSON object, losslessly: a value that is UTF-8 as a
    string, a null value as null, other bytes as ``{"base64": "..."}``; a name that comes more than once has the list
    of its values, in order. (A ``str`` with surrogate escapes, as aiohttp gives undecodable header bytes, is bytes.)"""
    merged: dict[str, Any] = {}
    repeated: set[str] = set()
    for name, value in pairs:
        if value is not None:
            raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = {"base64": base64.b64encode(raw).decode("ascii")}  # type: ignore[assignment]
        if name not in merged:
            merged[name] = value
        elif name in repeated:
            merged[name].append(value)
        else:
            merged[name] = [merged[name], value]
            repeated.add(name)
    return json.dumps(merged)


def traceparent(value: str | bytes | None) -> str | None:
    """A W3C ``traceparent`` header's value when it is one (version-traceid-parentid-flags, lower-case hex, the
    all-zero ids refused); else None: a malformed one is dropped, never passed on."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not value:
        return None
    value = value.strip()
    if not _TRACEPARENT.match(value) or value.startswith("ff") or value[3:35] == "0" * 32 or value[36:52] == "0" * 16:
        return None
    return value


def trace_ids(trace: str | None) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of a W3C ``traceparent`` for a log line (nothing without one)."""
    return {"trace_id": trace[3:35], "span_id": trace[36:52]} if trace else {}


_MISSING = object()
_CORE = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data", "data_base64")


def new_id() -> str:
    """A random 128-bit id, hex: cheaper than ``uuid4()`` and as unique."""
    return os.urandom(16).hex()


_second: list[tuple[int, str]] = [(-1, "")]


def _seconds(second: int) -> str:
    cached, prefix = _second[0]
    if cached != second:
        prefix = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = (second, prefix)
    return prefix


def rfc3339(ts: float) -> str:
    """``ts`` as RFC 3339 in UTC with microseconds; the seconds part is formatted once per second."""
    second = int(ts)
    return f"{_seconds(second)}.{int((ts - second) * 1_000_000):06d}Z"


def rfc3339_ms(ms: int) -> str:
    """A time in integer milliseconds (Kafka's) as ``rfc3339`` writes it, exactly: no float on the way."""
    second, milli = divmod(ms, 1000)
    return f"{_seconds(second)}.{milli:03d}000Z"


class Event:
    """A CloudEvents 1.0 event.

    ``data`` is JSON-able; ``data_base64`` carries raw bytes instead (encoded as base64 on the
    wire). ``extensions`` holds source coordinates (partition, offset, block, file path, line).
    ``partition`` is not sent: it names the ordering lane (a Kafka partition, a file, a chain)
    for ``ordering = "partition"``. ``received`` is when the daemon first saw the event.
    """

    __slots__ = (
        "_encoded",
        "data",
        "data_base64",
        "datacontenttype",
        "extensions",
        "id",
        "partition",
        "received",
        "source",
        "subject",
        "time",
        "type",
    )

    def __init__(
        self,
        *,
        source: str,
        type: str,
        data: Any = None,
        data_base64: bytes | None = None,
        id: str | None = None,
        subject: str | None = None,
        time: str | None = None,
        datacontenttype: str | None = None,
        extensions: dict[str, Any] | None = None,
        partition: str | None = None,
        received: float | None = None,
    ) -> None:
        self.id = id or new_id()
        self.source = source
        self.type = type
        self.subject = subject
        self.time = time
        self.data = data
        self.data_base64 = data_base64
        if datacontenttype is None:
            datacontenttype = "application/octet-stream" if data_base64 is not None else "application/json"
        self.datacontenttype = datacontenttype
        self.extensions = extensions
        self.partition = partition
        self.received = _time.time() if received is None else received
        self._encoded: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event in CloudEvents JSON format, as a dict."""
        doc: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time or rfc3339(self.received),
            "datacontenttype": self.datacontenttype,
        }
        if self.subject is not None:
            doc["subject"] = self.subject
        if self.extensions:
            for name, value in self.extensions.items():
                doc[name] = value
        if self.data_base64 is not None:
            doc["data_base64"] = base64.b64encode(self.data_base64).decode("ascii")
        elif self.data is not None:
            doc["data"] = self.data
        return doc

    def encode(self) -> bytes:
        """The event in CloudEvents JSON format, encoded once and kept."""
        if self._encoded is None:
            self._encoded = msgspec.json.encode(self.to_dict())
        return self._encoded

    @property
    def size(self) -> int:
        """Bytes of the encoded event: what it adds to a batch's input document."""
        return len(self.encode())

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, received: float | None = None, partition: str | None = None) -> Event:
        """Rebuild an event from its CloudEvents JSON form (the inverse of ``to_dict``)."""
        extensions = {k: v for k, v in doc.items() if k not in _CORE}
        raw = doc.get("data_base64")
        return cls(
            id=doc["id"],
            source=doc["source"],
            type=doc["type"],
            subject=doc.get("subject"),
            time=doc.get("time"),
            datacontenttype=doc.get("datacontenttype"),
            data=doc.get("data"),
            data_base64=base64.b64decode(raw) if raw is not None else None,
            extensions=extensions or None,
            partition=partition,
            received=received,
        )

    @classmethod
    def decode(cls, raw: bytes, *, received: float | None = None, partition: str | None = None) -> Event:
        event = cls.from_dict(json.loads(raw), received=received, partition=partition)
        event._encoded = raw
        return event

    def field(self, path: str, default: Any = None) -> Any:
        """The value at a dotted path such as ``data.voter_id`` or ``type``; ``default`` if absent."""
        head, _, rest = path.partition(".")
        if head == "data":
            value: Any = self.data
        elif head in ("id", "source", "type", "subject", "time", "datacontenttype"):
            value = getattr(self, head)
        elif head == "specversion":
            value = "1.0"
        elif self.extensions and head in self.extensions:
            value = self.extensions[head]
        else:
            return default
        if not rest:
            return value
        for part in rest.split("."):
            if isinstance(value, dict):
                value = value.get(part, _MISSING)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return default
            if value is _MISSING:
                return default
        return value

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, source={self.source!r}, type={self.type!r})"


def _same(payload: Any) -> Event:
    return payload  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an event's delivery ended.

    ``succeeded``: its function succeeded; ``dead-lettered``: retries were exhausted and it was
    stored as a dead letter; ``dropped``: exhausted with ``on_exhausted = "drop"``, or filtered
    out; ``failed``: a one-shot invocation (``SourceContext.invoke``) failed.
    """

    status: Literal["succeeded", "dead-lettered", "dropped", "failed"]
    invocation_id: str | None = None
    stdout: bytes = b""
    exit_code: int | None = None
    error: str | None = None
    """Why the last attempt failed (dead-lettered, dropped after retries, failed)."""

    @property
    def settled(self) -> bool:
        """True when the source may acknowledge the event (it will not be delivered again)."""
        return self.status != "failed"


class Run:
    """Events a source hands over together (say, consecutive records of one Kafka partition).

    The pipeline queues, batches and acknowledges a run as one unit, so that the cost per event is
    only its encoding. It looks at single events only to filter, to route by key, to cut a run at a
    batch limit, or after a batch failed. ``encoded`` and ``ids`` are per event, in order;
    ``payloads`` are what the source made them from (its records), turned into ``Event`` objects
    by ``make`` only when one is needed. ``ack(run, outcome)`` is called for every part of the run
    as that part is settled; parts share ``token``, the source's handle on the whole run.
    ``subjects`` (per event, or None) route ``ordering = "key"``; ``partition`` routes
    ``ordering = "partition"``.
    """

    __slots__ = ("_nbytes", "ack", "encoded", "ids", "make", "partition", "payloads", "receipt", "received", "subjects",
                 "token", "trace", "traces")

    def __init__(self, encoded: list[bytes], ids: list[str], payloads: list[Any], make: Callable[[Any], Event] = _same,
                 *, ack: RunAck | None = None, token: Any = None, partition: str | None = None,
                 subjects: list[str | None] | None = None, received: float | None = None) -> None:
        self.encoded = encoded
        self.ids = ids
        self.payloads = payloads
        self.make = make
        self.ack = ack
        self.token = token
        self.partition = partition
        self.subjects = subjects
        self.received = _time.time() if received is None else received
        self.trace: str | None = None
        """The W3C ``traceparent`` of its first event that has one (the function's ``TRACEPARENT``)."""
        self.traces: list[str | None] | None = None
        """Each event's ``traceparent`` (None for one without), or None when none has one (traces ride along)."""
        self.receipt: Any = None
        """The receive span of its events that came without a trace (telemetry), for the invocation's link."""
        self._nbytes = -1

    @classmethod
    def of(cls, events: list[Event], ack: RunAck | None = None, token: Any = None) -> Run:
        """A run of ready-made events (webhooks, replays); its partition is the first event's."""
        run = cls([e.encode() for e in events], [e.id for e in events], events, ack=ack, token=token,
                  partition=events[0].partition if events else None, subjects=[e.subject for e in events],
                  received=min((e.received for e in events), default=None))
        traces = [e.extensions.get("traceparent") if e.extensions else None for e in events]
        run.trace = next(filter(None, traces), None)
        run.traces = traces if run.trace else None
        return run

    @classmethod
    def single(cls, event: Event, ack: Callable[[Outcome], Awaitable[None]] | None = None) -> Run:
        """A run of one event, settled through the per-event ``ack`` (what ``ctx.emit`` hands over)."""
        if ack is None:
            return cls.of([event])

        async def settle(_: Run, outcome: Outcome) -> None:
            await ack(outcome)
        return cls.of([event], settle)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """What the run adds to a batch's input document: its encoded events and a separator each."""
        if self._nbytes < 0:
            self._nbytes = sum(map(len, self.encoded)) + len(self.encoded)
        return self._nbytes

    @nbytes.setter
    def nbytes(self, value: int) -> None:
        self._nbytes = value

    def event(self, index: int) -> Event:
        event = self.make(self.payloads[index])
        event._encoded = self.encoded[index]
        return event

    def events(self) -> list[Event]:
        return [self.event(i) for i in range(len(self.ids))]

    def _part(self, encoded: list[bytes], ids: list[str], payloads: list[Any],
              subjects: list[str | None] | None, traces: list[str | None] | None) -> Run:
        part = Run(encoded, ids, payloads, self.make, ack=self.ack, token=self.token, partition=self.partition,
                   subjects=subjects, received=self.received)
        part.trace = self.trace
        part.traces = traces
        part.receipt = self.receipt
        return part

    def slice(self, start: int, stop: int | None = None) -> Run:
        """Events ``start`` to ``stop`` as a run of their own, settled through the same ack."""
        subjects = self.subjects[start:stop] if self.subjects is not None else None
        traces = self.traces[start:stop] if self.traces is not None else None
        return self._part(self.encoded[start:stop], self.ids[start:stop], self.payloads[start:stop], subjects, traces)

    def select(self, indexes: Sequence[int]) -> Run:
        """The events at ``indexes`` (in that order) as a run of their own, settled through the same ack."""
        subjects, traces = self.subjects, self.traces
        return self._part([self.encoded[i] for i in indexes], [self.ids[i] for i in indexes],
                          [self.payloads[i] for i in indexes],
                          [subjects[i] for i in indexes] if subjects is not None else None,
                          [traces[i] for i in indexes] if traces is not None else None)


RunAck = Callable[[Run, Outcome], Awaitable[None]]
"""Called for each part of a run when that part is settled; the source acknowledges it there."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """``body`` parsed as strict JSON (no NaN or Infinity, which would make a function's input invalid).

    msgspec first (several times faster than ``json``); ``json`` for what msgspec cannot hold, integers
    beyond 64 bits. Either raises a ``ValueError`` (or ``RecursionError``) for what is not JSON.
    """
    try:
        return msgspec.json.decode(body)
    except msgspec.ValidationError:  # an integer out of msgspec's range: valid JSON all the same
        return json.loads(body, parse_constant=_reject_constant)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None
