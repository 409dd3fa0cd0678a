"""A record's event ids, packed: every id comes back as it was, in order, whatever its shape; sequential ids cost
next to nothing; a damaged pack is an error, not a wrong list."""

from __future__ import annotations

import os
import random

import pytest

from dispatcher.idpack import pack, unpack

SHAPES = {
    "kafka": [f"orders/{p}/{o}" for p in (0, 1) for o in range(1_000_000, 1_000_500)],
    "kafka with gaps": [f"t/0/{o}" for o in [*range(10, 20), *range(25, 30), 31, 33, 40]],
    "chain logs": [f"1:0x{b:064x}:{i}" for b in (7, 8) for i in range(4)] + ["1:0x9:3:removed"],
    "webhook": [os.urandom(16).hex() for _ in range(300)],
    "lines": [f"3f2a9c/{o * 57}-{random.getrandbits(32):08x}" for o in range(300)],
    "odd": ["", "0", "00", "007", "-1", "a0", "a00", "9" * 40, "ÄÖ/1", "ÄÖ/2", "x\ny", "AB12", "ab1", "ab2", "ab",
            "ab ", "0x", "1", "2", "1"],
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_id_comes_back_in_order(shape):
    ids = SHAPES[shape]
    assert unpack(pack(ids)) == ids
    assert unpack(pack(ids[:1])) == ids[:1] and unpack(pack([])) == []


def test_random_ids_of_any_shape_come_back():
    alphabet = "0123456789abcdefAB/:-_ é"
    rng = random.Random(7)
    for _ in range(500):
        ids = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(1, 30))]
        if rng.random() < 0.3:
            stem, first = rng.choice(["t/0/", "a", "", "x9"]), rng.randint(0, 10**12)
            ids[rng.randint(0, len(ids)):0] = [f"{stem}{first + i}" for i in range(rng.randint(2, 50))]
        assert unpack(pack(ids)) == ids, ids


def test_sequential_ids_cost_next_to_nothing_and_random_hex_half_its_text():
    sizes = {shape: len(pack(ids)) / len(ids) for shape, ids in SHAPES.items()}
    assert sizes["kafka"] < 0.1 and sizes["chain logs"] < 50 and sizes["webhook"] < 17 and sizes["lines"] < 14, sizes


@pytest.mark.parametrize("damaged", [b"", b"Q", b"P\x01\x05ab", b"P\x09", b"Z\x00\x01", b"P\x05\x10\x03abc"])
def test_a_damaged_pack_is_an_error(damaged):
    with pytest.raises(ValueError):
        unpack(damaged)
