"""Logging: one line per event of note, as text for people or JSON for machines."""

from __future__ import annotations

import json
import logging
import sys
import time


def fields(message: str, **values: object) -> dict[str, object]:
    """``extra=`` for a log call about a trigger, an invocation or a run of events: JSON logs put these values in
    fields of their own (``trigger``, ``invocation_id``, ``events``, ``attempt``…) beside ``message``, the line
    without them; text logs keep the whole line."""
    return {"fields": {k: v for k, v in values.items() if v is not None}, "plain": message}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": getattr(record, "plain", None) or record.getMessage(),
        }
        doc.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "urllib3", "docker", "watchfiles"):  # (watchfiles: a line per change seen)
        logging.getLogger(noisy).setLevel(logging.WARNING)
