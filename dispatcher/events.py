"""Event: one CloudEvents 1.0 event, built once per source record and encoded once."""

from __future__ import annotations

import base64
import json
import os
import time as _time
from datetime import UTC, datetime
from typing import Any

_MISSING = object()
_CORE = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data", "data_base64")


def new_id() -> str:
    """A random 128-bit id, hex: cheaper than ``uuid4()`` and as unique."""
    return os.urandom(16).hex()


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_second: list[tuple[int, str]] = [(-1, "")]


def rfc3339(ts: float) -> str:
    """``ts`` as RFC 3339 in UTC with microseconds; the seconds part is formatted once per second."""
    second = int(ts)
    cached, prefix = _second[0]
    if cached != second:
        prefix = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = (second, prefix)
    return f"{prefix}.{int((ts - second) * 1_000_000):06d}Z"


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
            self._encoded = _ENCODER.encode(self.to_dict()).encode()
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
