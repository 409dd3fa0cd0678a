"""A message's payload as an event's data, as a broker source's ``value_format`` says (Kafka, NATS)."""

from __future__ import annotations

import json
from typing import Any

import msgspec

RAW_JSON = msgspec.json.Decoder(msgspec.Raw)
"""Checks JSON grammar without building objects."""


def json_error(value: bytes) -> str | None:
    """Why ``value`` is not RFC 8259 JSON in UTF-8, or None when it is."""
    try:
        RAW_JSON.decode(value)  # the grammar, without building objects
        value.decode("utf-8")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return str(exc)
    return None


def data_of(value: bytes | None, value_format: str, extensions: dict[str, Any]) -> dict[str, Any]:
    """The ``Event`` keyword arguments that carry ``value``: ``data`` (JSON, or text with its content type) when
    it fits ``value_format``, else ``data_base64``, with the extension ``dataerror`` saying why it did not fit.

    A JSON value must be RFC 8259 JSON in UTF-8 (no NaN, no lone surrogates, no byte order mark): what every
    consumer of the function's input can parse."""
    if value is None:
        return {"data": None}
    if value_format == "json":
        error = json_error(value)
        if error is None:
            try:
                return {"data": json.loads(value)}
            except ValueError as exc:  # valid JSON Python cannot hold (an integer of 5000 digits)
                error = str(exc)
        extensions["dataerror"] = f"not valid JSON: {error}"[:200]
    elif value_format == "text":
        try:
            return {"data": value.decode("utf-8"), "datacontenttype": "text/plain"}
        except UnicodeDecodeError as exc:
            extensions["dataerror"] = f"not valid UTF-8: {exc}"[:200]
    return {"data_base64": value}
