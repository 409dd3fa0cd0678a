"""The Ethereum source's ABI: event signatures parsed (or read from an ABI file) and a decoder prepared once per
event: addresses checksummed, integers beyond 2^53 as decimal strings, bytes as hex (eth-abi for what the fast path
does not read itself)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

SAFE_INTEGER = 2**53

_PARAM = re.compile(r"^\s*(?P<type>[A-Za-z0-9\[\]]+)(?P<indexed>\s+indexed)?(?:\s+(?P<name>[A-Za-z_$][\w$]*))?\s*$")


def parse_signature(signature: str) -> dict[str, Any]:
    """A Solidity event signature, ``"Transfer(address indexed from, address indexed to, uint256 value)"``,
    as an ABI event entry. Raises ``ValueError`` saying what is wrong."""
    found = re.fullmatch(r"\s*(?:event\s+)?([A-Za-z_$][\w$]*)\s*\((.*)\)\s*;?\s*", signature)
    if not found:
        raise ValueError(f"{signature!r} is not an event signature such as "
                         f"\"Transfer(address indexed from, address indexed to, uint256 value)\"")
    name, body = found.groups()
    inputs = []
    for i, part in enumerate(p for p in body.split(",") if p.strip()) if body.strip() else []:
        param = _PARAM.match(part)
        if not param:
            raise ValueError(f"{signature!r}: parameter {i + 1} ({part.strip()!r}) is not \"type [indexed] [name]\"")
        kind = _canonical(param["type"])
        if not _valid_type(kind):
            raise ValueError(f"{signature!r}: {param['type']!r} is not a Solidity type")
        inputs.append({"type": kind, "indexed": bool(param["indexed"]), "name": param["name"] or f"arg{i}"})
    return {"type": "event", "name": name, "inputs": inputs, "anonymous": False}


def _canonical(kind: str) -> str:
    return re.sub(r"^(u?int)(?=$|\[)", r"\g<1>256", kind)


def _valid_type(kind: str) -> bool:
    base = re.sub(r"(\[\d*\])+$", "", kind)
    if base in ("address", "bool", "string", "bytes"):
        return True
    if (m := re.fullmatch(r"u?int(\d+)", base)) is not None:
        return 8 <= int(m[1]) <= 256 and int(m[1]) % 8 == 0
    if (m := re.fullmatch(r"bytes(\d+)", base)) is not None:
        return 1 <= int(m[1]) <= 32
    return False


def _type_of(param: Mapping[str, Any]) -> str:
    """An ABI parameter's canonical type (tuples written out, for the signature and for eth-abi)."""
    kind = str(param["type"])
    if kind.startswith("tuple"):
        return "(" + ",".join(_type_of(c) for c in param.get("components", [])) + ")" + kind[5:]
    return kind


class Decoder:
    """Decodes the logs of one event, prepared once."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.name = str(entry["name"])
        inputs = list(entry.get("inputs", []))
        self.signature = f"{self.name}({','.join(_type_of(p) for p in inputs)})"
        self.topic = "0x" + keccak(text=self.signature).hex()
        self.indexed = [(p.get("name") or f"arg{i}", _type_of(p)) for i, p in enumerate(inputs) if p.get("indexed")]
        self.data = [(p.get("name") or f"arg{i}", _type_of(p)) for i, p in enumerate(inputs) if not p.get("indexed")]
        self.data_types = [t for _, t in self.data]
        self.order = [p.get("name") or f"arg{i}" for i, p in enumerate(inputs)]

    def decode(self, topics: Sequence[str], data: str) -> dict[str, Any]:
        """The log's arguments, JSON-safe; raises ``ValueError`` when the log does not fit this event."""
        if len(topics) != 1 + len(self.indexed):
            raise ValueError(f"{len(topics) - 1} indexed topics where {self.signature} has {len(self.indexed)}")
        args: dict[str, Any] = {}
        for (name, kind), topic in zip(self.indexed, topics[1:], strict=True):
            if _dynamic(kind):
                args[name] = topic  # only the hash of a dynamic value is in the log
            else:
                value = _word(kind, topic[2:]) if len(topic) == 66 else SLOW
                args[name] = _decode_one([kind], bytes.fromhex(topic[2:]))[0] if value is SLOW else value
        values: Sequence[Any] = ()
        if self.data:
            words = [data[2 + 64 * i:66 + 64 * i] for i in range(len(self.data_types))]
            values = [_word(kind, word) for kind, word in zip(self.data_types, words, strict=True)] \
                if len(data) == 2 + 64 * len(self.data_types) else [SLOW]
            if SLOW in values:
                values = _decode_one(self.data_types, bytes.fromhex(data[2:]))
        args.update(zip((n for n, _ in self.data), values, strict=True))
        return {name: _jsonable(args[name]) for name in self.order}


UINT = re.compile(r"^uint\d*$")
SLOW = object()
"""``_word``'s answer for a type or a value it leaves to eth-abi."""


def _word(kind: str, word: str) -> Any:
    """One 32-byte word (64 hex digits) as ``kind``, for the common static types (eth-abi takes 30 times as long,
    and a backfill decodes millions); ``SLOW`` for anything else, or a value that is not a clean fit."""
    if kind == "address":
        return checksummed("0x" + word[24:]) if word[:24] == "0" * 24 else SLOW
    if UINT.match(kind):
        value = int(word, 16)
        return value if not value >> int(kind[4:] or 256) else SLOW
    if kind == "bool":
        return word == "0" * 63 + "1" if word[:63] == "0" * 63 and word[63] in "01" else SLOW
    if kind == "bytes32":
        return bytes.fromhex(word)
    return SLOW


checksummed = functools.lru_cache(maxsize=1 << 16)(to_checksum_address)
"""EIP-55 checksums (a keccak each) of the addresses seen lately: logs repeat the same few."""


def _decode_one(types: list[str], blob: bytes) -> tuple[Any, ...]:
    # (imported here: eth-abi takes a third of a second to import, and the CLI reads the config at every command)
    from eth_abi.abi import decode as abi_decode
    from eth_abi.exceptions import DecodingError

    try:
        return tuple(abi_decode(types, blob, strict=False))
    except (DecodingError, ValueError, OverflowError, TypeError) as exc:
        raise ValueError(f"cannot decode as ({','.join(types)}): {exc}") from None


def _dynamic(kind: str) -> bool:
    return kind in ("string", "bytes") or kind.endswith("[]") or kind.startswith("(")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -SAFE_INTEGER <= value <= SAFE_INTEGER else str(value)
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str) and len(value) == 42 and value.startswith("0x"):
        try:
            return checksummed(value)
        except ValueError:
            return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def load_decoders(events: list[str], abi_file: str) -> dict[str, Decoder]:
    """The decoders of the configured events, by topic 0."""
    entries = [parse_signature(s) for s in events]
    if abi_file:
        document = json.loads(Path(abi_file).read_text())
        abi = document.get("abi", document) if isinstance(document, dict) else document
        if not isinstance(abi, list):
            raise ValueError(f"abi_file {abi_file}: not a JSON ABI (a list of entries, or an object with \"abi\")")
        entries += [e for e in abi if isinstance(e, dict) and e.get("type") == "event" and not e.get("anonymous")]
    decoders = [Decoder(e) for e in entries]
    return {d.topic: d for d in decoders}
