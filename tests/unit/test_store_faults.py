"""The state store under failures: a failed group commit fails every writer in it, the disk error is not masked."""

from __future__ import annotations

import sqlite3

import anyio
import pytest

from dispatcher.errors import StoreError
from dispatcher.state import StateStore
from dispatcher.store import Database

pytestmark = pytest.mark.anyio


def _insert(key: str):
    def write(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO checkpoints (trigger, key, value, updated_at) VALUES ('t', ?, 'v', 0)", (key,))
    return write


def _disk_full(conn: sqlite3.Connection) -> None:
    raise sqlite3.OperationalError("database or disk is full")


def _stored(store: Database) -> set[str]:
    return {row[0] for row in store.conn.execute("SELECT key FROM checkpoints")}


async def test_every_writer_of_a_failed_group_commit_sees_the_error(tmp_path):
    store = Database(str(tmp_path / "state.db"))
    state = StateStore(store)
    outcomes: dict[str, str] = {}

    async def writer(name: str, *writes) -> None:
        try:
            await state.write(*writes)
            outcomes[name] = "ok"
        except StoreError as exc:
            outcomes[name] = f"error: {exc}"

    # Both writers join the same group before either takes the commit lock: one transaction holds
    # both writes, and it fails on the first writer's second write.
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer, "first", _insert("a"), _disk_full)
        tg.start_soon(writer, "second", _insert("b"))
    assert outcomes["first"].startswith("error: ") and "full" in outcomes["first"]
    assert outcomes["second"].startswith("error: "), "the second writer was told its write was stored"
    assert _stored(store) == set()
    assert state.error is not None and "full" in state.error

    # The store works again: a write is stored, and the error is cleared.
    await state.write(_insert("c"))
    assert _stored(store) == {"c"}
    assert state.error is None


async def test_a_real_sqlite_full_error_is_reported_not_masked_by_the_rollback(tmp_path):
    store = Database(str(tmp_path / "state.db"))
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count={pages + 2}")  # SQLite answers SQLITE_FULL past this, as on a full disk
    state = StateStore(store)

    def big(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO checkpoints (trigger, key, value, updated_at) VALUES ('t', 'big', ?, 0)", ("x" * 100_000,))

    with pytest.raises(StoreError, match="full") as caught:
        await state.write(big)
    assert "rollback" not in str(caught.value)
    store.conn.execute("PRAGMA max_page_count=1073741823")
    await state.write(_insert("after"))
    assert _stored(store) == {"after"}


def test_a_damaged_file_is_refused_with_one_line_saying_what_to_do(tmp_path):
    path = tmp_path / "state.db"
    store = Database(str(path))
    store.conn.executemany("INSERT INTO checkpoints (trigger, key, value, updated_at) VALUES ('t', ?, ?, 0)",
                           [(str(i), "v" * 500) for i in range(400)])
    store.close()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle:middle + 3072] = bytes((i * 7 + 13) % 256 for i in range(3072))
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as caught:
        Database(str(path), check=True)
    message = str(caught.value)
    assert "\n" not in message and "damaged" in message and str(path) in message
    assert not caught.value.temporary
