"""Durations and sizes as people write them in TOML: ``"500ms"``, ``"30s"``, ``"512KiB"``."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "k": 1024, "K": 1024, "KiB": 1024, "M": 1024**2, "MiB": 1024**2, "G": 1024**3, "GiB": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"`` (or a bare number of seconds)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string such as \"30s\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration: write a number and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"1h\"")


def parse_size(value: Any) -> int:
    """Bytes from ``"512KiB"``, ``"1MiB"``, ``"10MB"`` (or a bare number of bytes)."""
    if isinstance(value, bool):
        raise ValueError("a size is a string such as \"1MiB\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError(f"{value!r} is not a size: write a number and a unit, e.g. \"512KiB\", \"1MiB\"")


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": _DURATION.pattern}, {"type": "number", "minimum": 0}],
                    "description": "a duration: a string with a unit (ms, s, m, h, d), or a number of seconds",
                    "examples": ["500ms", "30s", "5m"]}),
]
"""A duration in seconds, written in TOML as a string with a unit (or a number of seconds)."""

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": _SIZE.pattern}, {"type": "integer", "minimum": 0}],
                    "description": "a size: a string with a unit (B, KB, KiB, MB, MiB, GB, GiB), or a number of bytes",
                    "examples": ["512KiB", "1MiB"]}),
]
"""A size in bytes, written in TOML as a string with a unit (or a number of bytes)."""
