"""Records: the bytes a batch's event ids take in an invocation record, before (a JSON list, schema 2) and after
(packed, ``dispatcher.idpack``), per event, for the ids each source makes, at batch sizes of 1 to 1,000; and the
time packing and unpacking take per event. Writes bench/results/records.json.

The ids are made the way each source makes them: Kafka ``topic/partition/offset`` (a batch from one partition),
chain logs ``chain:blockhash:logindex`` (three logs a block), tailed lines ``dev:inode/offset-crc32`` (lines of
60 to 200 bytes), webhooks and dropped files 32 random hex digits. ``bench/soak.py`` measures the same through the
daemon. Run: `.venv/bin/python bench/records.py`.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.webhook import save  # noqa: E402
from dispatcher.idpack import pack, unpack  # noqa: E402

SIZES = (1, 10, 100, 1000)


def kafka(n: int) -> list[str]:
    return [f"orders-v2/3/{18_446_000 + i}" for i in range(n)]


def chain_logs(n: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < n:
        block = "0x" + os.urandom(32).hex()
        ids += [f"31337:{block}:{i}" for i in range(3)]
    return ids[:n]


def lines(n: int) -> list[str]:
    offset, ids = 0, []
    for _ in range(n):
        ids.append(f"2049:1835021/{offset}-{random.getrandbits(32):08x}")
        offset += random.randint(60, 200)
    return ids


def random_hex(n: int) -> list[str]:
    return [os.urandom(16).hex() for _ in range(n)]


SOURCES = {"kafka": kafka, "ethereum": chain_logs, "lines": lines, "webhook": random_hex, "files": random_hex}


def main() -> None:
    figures: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'source':9} {'batch':>5}  {'JSON B/event':>12}  {'packed B/event':>14}  {'pack µs/event':>13}  {'unpack µs/event':>15}")
    for name, make in SOURCES.items():
        figures[name] = {}
        for size in SIZES:
            batches = [make(size) for _ in range(max(1, 2000 // size))]
            before = sum(len(json.dumps(ids, separators=(",", ":"))) for ids in batches) / (size * len(batches))
            began = time.perf_counter()
            packed = [pack(ids) for ids in batches]
            packing = (time.perf_counter() - began) / (size * len(batches))
            began = time.perf_counter()
            assert [unpack(p) for p in packed] == batches
            unpacking = (time.perf_counter() - began) / (size * len(batches))
            after = sum(len(p) for p in packed) / (size * len(batches))
            figures[name][str(size)] = {"json_bytes_per_event": round(before, 2), "packed_bytes_per_event": round(after, 2),
                                        "pack_us_per_event": round(packing * 1e6, 2),
                                        "unpack_us_per_event": round(unpacking * 1e6, 2)}
            print(f"{name:9} {size:>5}  {before:12.1f}  {after:14.2f}  {packing * 1e6:13.2f}  {unpacking * 1e6:15.2f}")
    save("records", figures)


if __name__ == "__main__":
    main()
