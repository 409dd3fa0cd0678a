"""Retention on a real SQLite store: the size budget prunes the oldest records down to its low water and warns once
when they were younger than keep_invocations; pages freed are given back to the disk; dead letters are never
pruned, and warned of as they pass 10,000."""

from __future__ import annotations

import logging
import time

import pytest

from dispatcher.config import DaemonConfig
from dispatcher.metrics import Metrics
from dispatcher.retention import LOW_WATER, Retention
from dispatcher.state import StateStore
from dispatcher.store import (
    Database,
    DeadLetter,
    InvocationRecord,
    finish_invocation,
    insert_dead_letter,
    insert_invocation,
)

pytestmark = pytest.mark.anyio


async def fill(state: StateStore, count: int, log_bytes: int, queued: float, first: int = 0) -> None:
    for start in range(first, first + count, 100):
        writes = []
        for i in range(start, min(start + 100, first + count)):
            record = InvocationRecord(f"inv-{i:05d}", "t", "f", "queued", 1, 1, [f"t/0/{i}"], None, None, queued + i,
                                      None, None, None)
            writes += [insert_invocation(record), finish_invocation(record.id, status="succeeded", exit_code=0, error=None,
                                                                    finished_at=queued + i, executor_ref=None,
                                                                    stdout=b"x" * log_bytes, stderr=b"")]
        await state.write(*writes)


async def test_the_budget_prunes_the_oldest_records_to_its_low_water_and_warns_once(tmp_path, caplog):
    store = Database(str(tmp_path / "state.db"))
    state, metrics = StateStore(store), Metrics()
    budget = 1024 * 1024
    retention = Retention(state, metrics, lambda: DaemonConfig(max_records_size=budget))
    await fill(state, 600, 4000, time.time() - 600)  # about 2.6 MB, all younger than keep_invocations
    with caplog.at_level(logging.WARNING, "eventswarm.store"):
        await retention.by_size()
        await fill(state, 100, 4000, time.time(), first=600)
        await retention.by_size()
    counted = store.records_bytes()
    assert counted <= budget * LOW_WATER and counted > budget * LOW_WATER - 200 * 4500  # (within a chunk)
    kept = [r.id for r in store.invocations(limit=1000)]
    assert len(kept) < 600 and "inv-00699" in kept and "inv-00000" not in kept  # the oldest went
    assert metrics.records_bytes._value.get() == counted and metrics.records_budget._value.get() == budget
    assert metrics.records_oldest._value.get() == store.oldest_record()
    assert metrics.records_pruned.labels("size")._value.get() == 700 - len(kept)
    warnings = [r.getMessage() for r in caplog.records if "younger than keep_invocations" in r.getMessage()]
    assert len(warnings) == 1 and "max_records_size (1MiB)" in warnings[0] and "(7d)" in warnings[0], warnings
    unbounded = Retention(state, metrics, lambda: DaemonConfig(max_records_size=0))
    await fill(state, 600, 4000, time.time(), first=1000)
    await unbounded.by_size()
    assert store.records_bytes() > 2 * budget  # 0: no size bound
    store.close()


async def test_records_pruned_by_age_give_their_pages_back_and_dead_letters_stay(tmp_path, caplog):
    store = Database(str(tmp_path / "state.db"))
    state, metrics = StateStore(store), Metrics()
    await fill(state, 600, 64 * 1024, time.time() - 10 * 86400)  # 40 MB of logs, older than keep_invocations
    await state.write(*(insert_dead_letter(DeadLetter(f"dl-{i}", "t", {"id": f"e{i}"}, [], 1.0)) for i in range(10_000)))
    pages = store.free_pages()[1]
    with caplog.at_level(logging.WARNING, "eventswarm.store"):
        await Retention(state, metrics, lambda: DaemonConfig()).by_age()
        await Retention(state, metrics, lambda: DaemonConfig()).by_age()
    assert store.invocations() == [] and store.records_bytes() == 0
    free, after, _ = store.free_pages()
    # Given back, 2 MiB a step, until no more than 8 MiB (2,048 pages) are free: those are kept for reuse.
    assert after < pages / 3 and free <= 2048, (pages, after, free)
    assert store.dead_letter_count() == 10_000 and metrics.dead_letters_kept._value.get() == 10_000
    warned = [r.getMessage() for r in caplog.records if "dead letters are kept" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("10000 dead letters")  # (each Retention warns once)
    store.close()
