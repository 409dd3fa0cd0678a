"""The event ids of an invocation record, packed: what a record must answer (which events a batch held) without a
string per event where a source's ids are sequential.

Ids are packed in the order given, and unpacked to the same strings:

- **runs**: ids that end in a number counting up by one under the same stem (Kafka's ``topic/partition/offset``,
  a chain log's ``chain:block:logindex``) are one stem, a first number and a count; a run that carries on the last
  one's stem after a gap (a compacted topic, a filtered log) does not repeat the stem;
- **hex**: a lowercase hex id (a webhook's or a dropped file's: random, nothing to share) is its bytes, half the
  text;
- **text**: any other id (a tailed line's ``dev:inode/offset-crc``, a chain log's that starts a new block) is its
  bytes; a pack with much text is compressed (raw deflate) when that makes it smaller.

Bytes per event at a batch of 100, before (the records' JSON list) and after: Kafka 23 and 0.2, chain logs 77 and
13, lines 29 and 9, webhooks and files 35 and 16 (``bench/records.py``; ``docs/capacity.md``).
"""

from __future__ import annotations

import re
import zlib

_PACKED = 0x50  # "P"
_ZLIB = 0x5A  # "Z"

_NEW_RUN, _RUN, _HEX, _TEXT, _HEXES = 1, 2, 3, 4, 5

_DIGITS = "0123456789"
_HEX_ID = re.compile(r"(?:[0-9a-f]{2})+\Z")

_COMPRESS_FROM = 64
"""Bytes of text in a pack from which zlib is tried."""


def pack(ids: list[str]) -> bytes:
    """``ids``, packed (``unpack`` gives them back, in order)."""
    out = bytearray((_PACKED,))
    hexes = _same_hex(ids)
    if hexes is not None:  # (a webhook's or a folder's batch: at once, not id by id)
        out.append(_HEXES)
        _varint(out, len(ids[0]) // 2)
        _varint(out, len(ids))
        return bytes(out + hexes)
    stem: str | None = None
    text = 0
    at, count = 0, len(ids)
    while at < count:
        this = ids[at]
        base = this.rstrip(_DIGITS)
        digits = this[len(base):]
        if digits and (digits[0] != "0" or digits == "0"):  # (a number written with a leading 0 is text)
            first = int(digits)
            end, following = at + 1, first + 1
            while end < count and ids[end] == f"{base}{following}":
                end, following = end + 1, following + 1
            if end - at > 1 or base == stem:
                if base == stem:
                    out.append(_RUN)
                else:
                    out.append(_NEW_RUN)
                    _bytes(out, base.encode())
                    stem = base
                _varint(out, first)
                _varint(out, end - at - 1)
                at = end
                continue
        raw = this.encode()
        if _HEX_ID.match(this):
            out.append(_HEX)
            _bytes(out, bytes.fromhex(this))
        else:
            out.append(_TEXT)
            _bytes(out, raw)
            text += len(raw)
        at += 1
    if text >= _COMPRESS_FROM:
        squeezer = zlib.compressobj(6, zlib.DEFLATED, -15)
        squeezed = squeezer.compress(out[1:]) + squeezer.flush()
        if len(squeezed) + 1 < len(out):
            return bytes((_ZLIB,)) + squeezed
    return bytes(out)


def unpack(packed: bytes) -> list[str]:
    """The ids ``pack`` packed. Raises ``ValueError`` for bytes that are not a pack."""
    if not packed:
        raise ValueError("an empty pack")
    data = memoryview(packed)
    if data[0] == _ZLIB:
        try:
            data = memoryview(zlib.decompress(data[1:], -15))
        except zlib.error as exc:
            raise ValueError(f"a damaged pack: {exc}") from None
    elif data[0] == _PACKED:
        data = data[1:]
    else:
        raise ValueError(f"not a pack (it starts with {data[0]:#04x})")
    ids: list[str] = []
    stem = ""
    at = 0
    try:
        while at < len(data):
            kind = data[at]
            at += 1
            if kind in (_NEW_RUN, _RUN):
                if kind == _NEW_RUN:
                    raw, at = _read_bytes(data, at)
                    stem = raw.decode()
                first, at = _read_varint(data, at)
                more, at = _read_varint(data, at)
                ids.extend(f"{stem}{number}" for number in range(first, first + more + 1))
            elif kind == _HEX:
                raw, at = _read_bytes(data, at)
                ids.append(raw.hex())
            elif kind == _HEXES:
                size, at = _read_varint(data, at)
                many, at = _read_varint(data, at)
                raw, at = _read(data, at, size * many)
                ids.extend(raw[start:start + size].hex() for start in range(0, len(raw), size))
            elif kind == _TEXT:
                raw, at = _read_bytes(data, at)
                ids.append(raw.decode())
            else:
                raise ValueError(f"a damaged pack (an entry of kind {kind})")
    except IndexError:
        raise ValueError("a damaged pack (it ends inside an entry)") from None
    return ids


def _same_hex(ids: list[str]) -> bytes | None:
    """The bytes of ``ids`` when they are all lowercase hex of one even length."""
    if not ids or not ids[0] or len(ids[0]) % 2 or any(len(i) != len(ids[0]) for i in ids):
        return None
    joined = "".join(ids)
    try:
        raw = bytes.fromhex(joined)
    except ValueError:
        return None
    return raw if raw.hex() == joined else None  # (not upper case, no spaces: fromhex takes both)


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _bytes(out: bytearray, raw: bytes) -> None:
    _varint(out, len(raw))
    out += raw


def _read_varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _read_bytes(data: memoryview, at: int) -> tuple[bytes, int]:
    length, at = _read_varint(data, at)
    return _read(data, at, length)


def _read(data: memoryview, at: int, length: int) -> tuple[bytes, int]:
    if at + length > len(data):
        raise IndexError
    return bytes(data[at:at + length]), at + length
