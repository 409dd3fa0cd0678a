"""What keeps the state store bounded over months: invocation records pruned by age (``keep_invocations``) and by
size (``max_records_size``), in bounded chunks between group commits, so that intake never waits long on a prune;
free pages given back to the disk (SQLite with incremental vacuum); webhook dedupe keys forgotten after their
window; dead letters counted (never pruned: they are work not done) and warned of as they grow."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from dispatcher.config import DaemonConfig
from dispatcher.errors import StoreError
from dispatcher.metrics import Metrics
from dispatcher.state import StateStore
from dispatcher.store import PRUNE_CHUNK as CHUNK
from dispatcher.store import Database, prune_dedupe, prune_records

log = logging.getLogger("eventswarm.store")

SIZE_EVERY = 2.0, 0.1
"""Seconds between two checks of the records' bytes against ``max_records_size`` (a read of a row per replica): at
most the first, sooner as the records grow near the budget (at least the second apart), so that they go past it by
little however fast they are written."""
AGE_EVERY = 600.0
"""Seconds between two prunes by age (and of dedupe keys, and the dead letters' count)."""
DEDUPE_WINDOW = 7 * 86400.0
"""How long a webhook's dedupe key is remembered."""
LOW_WATER = 0.9
"""A prune by size goes down to this share of the budget, so that it does not run again at once."""
WARN_EVERY = 3600.0
"""At most one warning an hour that the budget forces out records younger than ``keep_invocations``."""
VACUUM_STEP = 512
"""Pages given back in one transaction (SQLite's ``incremental_vacuum``)."""
VACUUM_FROM = 0.25, 2048
"""Pages are given back when the free ones are more than this share of the file and this many (8 MiB of 4 KiB)."""
DEAD_LETTERS_WARN_FROM = 10_000
"""The dead letters' count from which each power of ten is warned of."""


class Retention:
    """Prunes the state store while the daemon runs (``run``). ``daemon`` gives the running config's ``[daemon]``
    (it can be reloaded)."""

    def __init__(self, state: StateStore, metrics: Metrics, daemon: Callable[[], DaemonConfig]) -> None:
        self.state = state
        self.metrics = metrics
        self.daemon = daemon
        self._warned_at = -WARN_EVERY
        self._dead_letters_warned = 0
        self._last: tuple[float, int] | None = None
        """When the records' bytes were read last, and what they were then (after that round's prune)."""

    async def run(self) -> None:
        last_age = -AGE_EVERY
        while True:
            wait = SIZE_EVERY[0]
            try:
                if time.monotonic() - last_age >= AGE_EVERY:
                    last_age = time.monotonic()
                    await self.by_age()
                wait = await self.by_size()
            except StoreError:
                pass  # the store said why, once; the next round tries again
            await anyio.sleep(wait)

    async def by_size(self) -> float:
        """Delete the oldest records while the records' bytes are over the budget, to ``LOW_WATER`` of it. Returns
        how long to wait before the next check: half the time the records take, growing as fast as since the last
        one, to fill what is left of the budget."""
        budget = self.daemon().max_records_size
        self.metrics.records_budget.set(budget)
        total = read = await self.state.read(Database.records_bytes)
        if budget and total > budget:
            removed = await self._prune(None, lambda left: left > budget * LOW_WATER, total)
            total -= sum(size for _, size in removed)
            self.metrics.records_pruned.labels("size").inc(len(removed))
            keep = self.daemon().keep_invocations
            youngest = max((at for at, _ in removed), default=None)
            if youngest is not None and youngest > time.time() - keep and time.monotonic() - self._warned_at >= WARN_EVERY:
                self._warned_at = time.monotonic()
                log.warning("max_records_size (%s) deletes invocation records younger than keep_invocations (%s): "
                            "records now go back %s; raise max_records_size, or lower keep_invocations to say so",
                            _size(budget), _age(keep), _age(time.time() - youngest))
        self.metrics.records_bytes.set(total)
        oldest = await self.state.read(Database.oldest_record)
        self.metrics.records_oldest.set(oldest or 0)
        now, last = time.monotonic(), self._last
        self._last = now, total
        if not budget or last is None or read <= last[1]:
            return SIZE_EVERY[0]
        growth = (read - last[1]) / max(now - last[0], 1e-3)
        return min(max((budget - total) / growth / 2, SIZE_EVERY[1]), SIZE_EVERY[0])

    async def by_age(self) -> None:
        """Delete records older than ``keep_invocations`` and dedupe keys older than their window; give free pages
        back; count the dead letters."""
        now = time.time()
        removed = await self._prune(now - self.daemon().keep_invocations, lambda left: True, 0)
        self.metrics.records_pruned.labels("age").inc(len(removed))
        while True:
            forgotten: list[int] = []
            await self.state.write(prune_dedupe(before=now - DEDUPE_WINDOW, limit=CHUNK, removed=forgotten))
            if forgotten[0] < CHUNK:
                break
        await self._vacuum()
        count = await self.state.read(Database.dead_letter_count)
        self.metrics.dead_letters_kept.set(count)
        if count >= DEAD_LETTERS_WARN_FROM and count >= self._dead_letters_warned * 10:
            self._dead_letters_warned = 10 ** (len(str(count)) - 1)
            log.warning("%d dead letters are kept (they are never pruned): replay them (eventswarm dlq replay) or purge "
                        "them (eventswarm dlq purge)", count)

    async def _prune(self, before: float | None, more: Callable[[int], bool], total: int) -> list[tuple[float, int]]:
        """Delete chunks of the oldest finished records (queued before ``before``) while ``more(bytes left)``."""
        removed: list[tuple[float, int]] = []
        while more(total):
            chunk: list[tuple[float, int]] = []
            await self.state.write(prune_records(before=before, limit=CHUNK, replica=self.state.replica,
                                                 postgres=self.state.store.postgres, removed=chunk))
            removed += chunk
            total -= sum(size for _, size in chunk)
            if len(chunk) < CHUNK:
                break
        return removed

    async def _vacuum(self) -> None:
        """SQLite with incremental vacuum: give free pages back to the disk, a step at a time, when they are many."""
        def many(db: Database) -> bool:
            pages = db.free_pages()
            return pages is not None and pages[0] > max(pages[1] * VACUUM_FROM[0], VACUUM_FROM[1])

        while await self.state.read(many):
            await self.state.alone(lambda conn: conn.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP})").fetchall())


def _age(seconds: float) -> str:
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor:
            return f"{seconds / factor:.3g}{unit}"
    return f"{seconds:.0f}s"


def _size(value: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor:
            return f"{value / factor:g}{unit}"
    return f"{value}B"
