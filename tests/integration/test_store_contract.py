"""One store contract, two backends: SQLite (the embedded default) and PostgreSQL (the shared state of replicas,
a real server started by scripts/postgres.sh). Records and logs, dead letters, checkpoints, the inbox and dedupe,
and the group commit behave alike on both."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from dispatcher.errors import StoreError
from dispatcher.events import Event
from dispatcher.schema import RECORD_OVERHEAD
from dispatcher.state import StateStore
from dispatcher.store import (
    Database,
    DeadLetter,
    InvocationRecord,
    abandon_unfinished,
    delete_checkpoints,
    finish_invocation,
    forget_checkpoints,
    insert_dead_letter,
    insert_invocation,
    prune_dedupe,
    prune_records,
    put_checkpoints,
    remove_dead_letter,
    start_invocation,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path) -> Iterator[Database]:
    if request.param == "sqlite":
        location = str(tmp_path / "state.db")
    else:
        location = request.getfixturevalue("postgres_database")
    opened = Database(location, check=True)
    yield opened
    opened.close()


def record(invocation_id: str, queued_at: float, trigger: str = "t", status: str = "queued") -> InvocationRecord:
    return InvocationRecord(invocation_id, trigger, "f", status, 1, 2, ["e1", "e2"], None, None, queued_at, None, None,
                            None)


async def test_invocation_records_and_their_logs(store):
    state = StateStore(store)
    await state.write(insert_invocation(record("inv-a", 100.0)), insert_invocation(record("inv-b", 200.0, "u")))
    await state.write(start_invocation("inv-a", 101.0))
    logs = (b"out \x00\xff\n", "stderr ünïcode\n".encode())
    await state.write(finish_invocation("inv-a", status="failed", exit_code=3, error="exit code 3", finished_at=102.5,
                                        executor_ref="ref-1", stdout=logs[0], stderr=logs[1]))
    a = store.invocation("inv-a")
    assert (a.status, a.exit_code, a.error, a.started_at, a.finished_at, a.executor_ref, a.event_ids) == \
        ("failed", 3, "exit code 3", 101.0, 102.5, "ref-1", ["e1", "e2"])
    assert store.logs("inv-a") == logs and store.logs("inv-b") == (b"", b"") and store.logs("nope") is None
    assert [r.id for r in store.invocations()] == ["inv-b", "inv-a"]  # newest first
    assert [r.id for r in store.invocations(trigger="t")] == ["inv-a"]
    assert [r.id for r in store.invocations(status="queued")] == ["inv-b"]
    assert [r.id for r in store.invocations(since=150.0)] == ["inv-b"]
    assert [r.id for r in store.invocations(limit=1)] == ["inv-b"]
    assert store.invocation("nope") is None
    # Written again, an invocation is replaced whole, logs too.
    await state.write(insert_invocation(record("inv-a", 100.0, status="queued")))
    assert store.invocation("inv-a").status == "queued" and store.logs("inv-a") == (b"", b"")


async def test_unique_prefixes_resolve_and_a_wildcard_in_one_cannot_widen_it(store):
    state = StateStore(store)
    await state.write(*(insert_invocation(record(i, 1.0)) for i in ("abc1", "abc2", "abd", "a%c")))
    assert store.resolve("invocations", "abd") == ["abd"]
    assert store.resolve("invocations", "abc") == ["abc1", "abc2"]
    assert store.resolve("invocations", "ab") == ["abc1", "abc2"]  # (two: ambiguous)
    assert store.resolve("invocations", "a%") == ["a%c"]
    assert store.resolve("invocations", "zz") == [] and store.resolve("invocations", "") == []


async def test_abandoned_and_pruned_invocations(store):
    state = StateStore(store)
    await state.write(insert_invocation(record("old-done", 10.0, status="succeeded")),
                      insert_invocation(record("old-running", 10.0, status="running")),
                      insert_invocation(record("new-queued", 500.0)))
    removed: list[tuple[float, int]] = []
    await state.write(prune_records(before=100.0, limit=10, replica="", postgres=store.postgres, removed=removed))
    assert {r.id for r in store.invocations()} == {"old-running", "new-queued"} and [at for at, _ in removed] == [10.0]
    await state.write(abandon_unfinished(600.0))
    for r in store.invocations():
        assert r.status == "failed" and r.finished_at == 600.0 and r.error.startswith("interrupted")


async def test_records_are_counted_to_the_byte_and_pruned_oldest_first_in_chunks(store):
    """The records' bytes (what max_records_size bounds) follow every write that changes them, on both databases:
    an insert (its packed ids), a finish (its logs), an insert that replaces a row, and pruning by age or size."""
    state = StateStore(store)
    ids = [f"orders/0/{n}" for n in range(1000)] + ["0123456789abcdef0123456789abcdef"]
    records = [InvocationRecord(f"inv-{i}", "t", "f", "queued", 1, len(ids), ids, None, None, 100.0 + i, None, None, None)
               for i in range(30)]
    await state.write(*(insert_invocation(r) for r in records))
    assert store.invocation("inv-3").event_ids == ids  # expanded on read
    packed = store.records_bytes() // 30 - RECORD_OVERHEAD
    assert 0 < packed < 40, packed  # a thousand offsets and a hex id: a few bytes, not 20,000
    logs = (b"o" * 1000, b"e" * 234)
    await state.write(*(finish_invocation(r.id, status="succeeded", exit_code=0, error=None, finished_at=200.0,
                                          executor_ref=None, stdout=logs[0], stderr=logs[1]) for r in records))
    assert store.records_bytes() == 30 * (RECORD_OVERHEAD + packed + 1234)
    await state.write(finish_invocation("inv-0", status="succeeded", exit_code=0, error=None, finished_at=201.0,
                                        executor_ref=None, stdout=b"", stderr=b"", replica="b"))  # logs replaced
    await state.write(insert_invocation(records[1]))  # written again: the row's logs go
    assert store.records_bytes() == 30 * (RECORD_OVERHEAD + packed) + 28 * 1234
    assert store.oldest_record() == 100.0
    removed: list[tuple[float, int]] = []
    await state.write(prune_records(before=None, limit=5, replica="", postgres=store.postgres, removed=removed))
    assert sorted(at for at, _ in removed) == [100.0, 102.0, 103.0, 104.0, 105.0]  # the oldest finished (1 is queued again)
    assert sum(size for _, size in removed) == 5 * (RECORD_OVERHEAD + packed) + 4 * 1234
    assert store.records_bytes() == 25 * (RECORD_OVERHEAD + packed) + 24 * 1234
    await state.write(prune_records(before=110.0, limit=100, replica="", postgres=store.postgres, removed=removed))
    assert len(removed) == 9 and store.oldest_record() == 101.0 and len(store.invocations(limit=100)) == 21
    assert store.records_bytes() == 21 * (RECORD_OVERHEAD + packed) + 20 * 1234


async def test_dead_letters(store):
    state = StateStore(store)
    letters = [DeadLetter(f"dl-{i}", "t" if i < 3 else "u", {"id": f"e{i}", "data": {"n": i}},
                          [{"attempt": 1, "exit_code": 1}], 100.0 + i) for i in range(4)]
    await state.write(*(insert_dead_letter(letter) for letter in letters))
    assert [d.id for d in store.dead_letters()] == ["dl-0", "dl-1", "dl-2", "dl-3"]  # oldest first
    assert [d.id for d in store.dead_letters(trigger="u")] == ["dl-3"]
    assert store.dead_letters(limit=2)[1] == letters[1]
    assert store.dead_letter("dl-2") == letters[2] and store.dead_letter("nope") is None
    await state.write(remove_dead_letter("dl-0"))
    assert store.remove_dead_letters(["dl-1", "nope"]) == 1
    assert store.remove_dead_letters() == 2 and store.dead_letters() == []


async def test_checkpoints(store):
    state = StateStore(store)
    many = {f"file:{i:04d}": str(i) for i in range(1200)}  # past the 500 keys a lookup asks for at once
    await state.write(put_checkpoints("t", many), put_checkpoints("u", {"file:0001": "other"}))
    await state.write(put_checkpoints("t", {"file:0001": "updated"}))
    assert store.checkpoint("t", "file:0001") == "updated" and store.checkpoint("t", "nope") is None
    assert store.checkpoint("u", "file:0001") == "other"
    found = store.checkpoints_of("t", [f"file:{i:04d}" for i in range(0, 1200, 3)] + ["nope"])
    assert len(found) == 400 and found["file:0003"] == "3"
    assert list(store.checkpoints("t", "file:00", 5)) == [f"file:{i:04d}" for i in range(5)]
    await state.write(delete_checkpoints("t", ["file:0000", "file:0002"]))
    assert list(store.checkpoints("t", "file:00", 2)) == ["file:0001", "file:0003"]
    forgotten: list[int] = []
    await state.write(forget_checkpoints("t", "file:", 4e9, 500, forgotten), forget_checkpoints("t", "file:", 4e9, 1000, forgotten))
    assert forgotten == [500, 698]  # in chunks: 1,200 less the two deleted
    assert store.checkpoints("t", "file:", 10) == {} and store.checkpoint("u", "file:0001") == "other"


async def test_the_inbox_keeps_events_in_order_once_each_with_dedupe(store):
    state = StateStore(store)
    events = [Event(source="s", type="t", data={"n": i}) for i in range(5)]
    for i, event in enumerate(events):
        assert await state.inbox_put("t", event, f"key-{i}") is None
    assert await state.inbox_put("t", Event(source="s", type="t"), "key-1") == events[1].id  # a repeat: not stored
    await state.inbox_put("u", Event(source="s", type="t"), None)
    assert store.inbox_size("t") == 5 and store.inbox_size("u") == 1 and store.inbox_last() >= 6
    pending = [e async for e in await state.inbox_pending("t", page=2)]
    assert [e.id for e in pending] == [e.id for e in events] and pending[3].data == {"n": 3}
    await state.inbox_remove("t", events[0].id)
    await state.inbox_remove("t", events[1].id, forget_dedupe=True)
    assert store.inbox_size("t") == 3
    assert await state.inbox_put("t", Event(source="s", type="t"), "key-0") == events[0].id  # still remembered
    assert await state.inbox_put("t", Event(source="s", type="t"), "key-1") is None  # forgotten: stored again
    forgotten: list[int] = []
    await state.write(prune_dedupe(before=4e9, limit=1, removed=forgotten), prune_dedupe(before=4e9, limit=10, removed=forgotten))
    assert forgotten == [1, 4]  # (key-0, key-2, key-3, key-4 and the new key-1, in chunks)
    assert await state.inbox_put("t", Event(source="s", type="t"), "key-0") is None  # the dedupe window passed


async def test_a_group_commit_stores_every_write_or_none_of_its_group(store):
    state = StateStore(store)
    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(state.write, insert_invocation(record(f"many-{i:03d}", float(i))))
    assert len(store.invocations(limit=1000)) == 200

    def broken(conn) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (?)", (1,))

    with pytest.raises(StoreError, match="no_such_table"):
        await state.write(insert_invocation(record("doomed", 1.0)), broken)
    assert store.invocation("doomed") is None  # one transaction: nothing of it is stored
    assert state.error is not None and "no_such_table" in state.error
    await state.write(insert_invocation(record("after", 1.0)))  # the store works again, and says so
    assert store.invocation("after") is not None and state.error is None


async def test_writes_in_one_transaction_see_each_other(store):
    # Two deliveries of the same webhook in one group commit: the second reads the first's dedupe row.
    state = StateStore(store)
    first, second = Event(source="s", type="t"), Event(source="s", type="t")
    with state.collecting() as writes:  # (collected, then committed as one transaction)
        await state.inbox_put("t", first, "same-delivery")
        await state.inbox_put("t", second, "same-delivery")
    await state.write(*writes)
    assert store.inbox_size("t") == 1
    assert [e.id async for e in await state.inbox_pending("t")] == [first.id]
