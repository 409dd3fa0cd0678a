"""Ordered progress: a source commits its position only below its first unsettled item, in bounded memory.

Every source that acknowledges at its origin by position needs this: a Kafka partition (offsets), a
tailed file (byte offsets), a chain (``(block, logIndex)``). Items are tracked in source order, in
spans (the items of one run); they settle in any order and in parts of any size; ``committable`` is
where to resume once every item before it is settled. The caller says where to resume after each
item (``after``), so the tracker knows nothing of offsets or blocks.

The cap: ``track`` waits (backpressure) while ``limit`` items are in flight behind the first
unsettled one, settled or not. Without it, one stuck batch followed by many settled runs would keep
every span in memory while nothing could be committed; with it, the source stops reading instead.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import anyio

log = logging.getLogger("eventswarm.progress")

P = TypeVar("P", bound=Hashable)

DEFAULT_LIMIT = 100_000
"""Items in flight per tracker before ``track`` waits: a few trigger buffers' worth."""


class Span(Generic[P]):
    """The items of one run, at ``positions`` (ascending), settled in parts, in any order."""

    __slots__ = ("_done", "_progress", "counted", "positions", "prefix", "remaining")

    def __init__(self, progress: Progress[P], positions: Sequence[P]) -> None:
        self._progress = progress
        self.positions = positions
        self.remaining = len(positions)
        self._done: set[P] = set()
        self.prefix = 0
        """How many of the first positions are settled (and no longer held in ``_done``)."""
        self.counted = 0
        """How many of the first positions the tracker no longer counts in flight."""

    @property
    def progress(self) -> Progress[P]:
        """The tracker the span belongs to."""
        return self._progress

    def settle(self, items: Sequence[Any], key: Callable[[Any], P] | None = None) -> None:
        """The items ``items`` (ascending, each settled once) are settled: positions, or things whose
        position ``key`` gives (a Kafka source passes its record tuples, without building a list)."""
        count = len(items)
        if not count:
            return
        self.remaining -= count
        if self.remaining > 0:
            prefix, mine = self.prefix, self.positions
            first, last = (items[0], items[-1]) if key is None else (key(items[0]), key(items[-1]))
            if not self._done and first == mine[prefix] and last == mine[prefix + count - 1]:
                self.prefix = prefix + count  # the next slice, in order (the common case): no set needed
            else:
                self._done.update(items if key is None else map(key, items))
        self._progress._advance()


class Progress(Generic[P]):
    """One ordered stream's items in flight (one partition, one file, one chain) and its committable position.

    ``committable`` only moves forward: every item before it is settled. ``committed`` is for the
    caller's bookkeeping (what it saved last); ``Committer`` keeps it.
    """

    def __init__(self, start: P, *, after: Callable[[P], P], limit: int = DEFAULT_LIMIT) -> None:
        self.committable: P = start
        self.committed: P = start
        self.limit = limit
        self._after = after
        self._spans: deque[Span[P]] = deque()
        self._count = 0
        self._changed: anyio.Event | None = None

    @property
    def in_flight(self) -> int:
        """Items tracked behind the first unsettled one, settled or not: what the tracker holds in memory."""
        return self._count

    @property
    def unsettled(self) -> int:
        return sum(span.remaining for span in self._spans)

    def has_room(self, count: int = 1) -> bool:
        """Whether ``count`` more items may be tracked now (a run larger than the cap still may, alone)."""
        return not self._spans or self._count + count <= self.limit

    def track_nowait(self, positions: Sequence[P], *, begin: P | None = None) -> Span[P]:
        """A run of items at ``positions`` is in flight (whatever the cap). ``begin``: where the run starts,
        when items before it need no settling (Kafka offsets of compacted records): with nothing in flight,
        ``committable`` moves there."""
        if begin is not None and not self._spans and _later(begin, self.committable):
            self.committable = begin
        span = Span(self, positions)
        self._spans.append(span)
        self._count += len(positions)
        return span

    async def track(self, positions: Sequence[P], *, begin: P | None = None) -> Span[P]:
        """``track_nowait``, after waiting while the cap is reached (the source stops reading meanwhile)."""
        while not self.has_room(len(positions)):
            await self._wait_for_change()
        return self.track_nowait(positions, begin=begin)

    async def idle(self) -> None:
        """Wait until no item is in flight (a revoked partition, a stopping source)."""
        while self._spans:
            await self._wait_for_change()

    async def _wait_for_change(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _advance(self) -> None:
        spans, after = self._spans, self._after
        before = self._count
        while spans:
            span = spans[0]
            if span.remaining <= 0:
                self.committable = after(span.positions[-1])
                self._count -= len(span.positions) - span.counted
                spans.popleft()
                continue
            positions, done, prefix = span.positions, span._done, span.prefix
            while positions[prefix] in done:
                done.discard(positions[prefix])
                prefix += 1
            span.prefix = prefix
            if prefix > span.counted:
                self._count -= prefix - span.counted
                span.counted = prefix
                self.committable = after(positions[prefix - 1])
            break
        if self._count != before and self._changed is not None:  # room for ``track``, or idle for ``idle``
            self._changed.set()
            self._changed = None


def _later(a: Any, b: Any) -> bool:
    return bool(a > b)


Save = Callable[[Mapping[Any, Any]], Awaitable[None]]


class Committer:
    """Saves the committable positions of several ``Progress`` trackers (by key): every ``interval``,
    under one lock, and once more, shielded, when the source stops (``run`` is cancelled) or gives some
    up (``drain(keys)``, as a Kafka partition is revoked). ``save_fn`` gets only what moved.

    A ``save_fn`` that raises saves nothing: ``save`` raises, and ``run`` logs it once per interval and
    tries again (a Kafka commit refused during a rebalance, a full disk). The last save on the way out
    waits at most ``final_wait`` seconds, so a source whose origin is gone still stops.
    """

    def __init__(self, save_fn: Save, interval: float, *, final_wait: float = 10.0) -> None:
        self.trackers: dict[Any, Progress[Any]] = {}
        self._save = save_fn
        self.interval = interval
        self.final_wait = final_wait
        self._lock = anyio.Lock()

    async def save(self, keys: Iterable[Any] | None = None) -> None:
        """Save the committable position of each tracker (of ``keys``) that moved since it was last saved."""
        async with self._lock:
            chosen = self.trackers if keys is None else {k: self.trackers[k] for k in keys if k in self.trackers}
            moved = {k: p for k, p in chosen.items() if p.committable != p.committed}
            if not moved:
                return
            positions = {k: p.committable for k, p in moved.items()}
            await self._save(positions)
            for key, progress in moved.items():
                progress.committed = positions[key]

    async def _try_save(self, keys: Iterable[Any] | None = None) -> None:
        try:
            await self.save(keys)
        except Exception as exc:
            log.warning("saving positions failed (tried again later): %s", exc)

    async def run(self) -> None:
        """Save every ``interval`` until cancelled; then save once more, shielded."""
        try:
            while True:
                await anyio.sleep(self.interval)
                await self._try_save()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.final_wait):
                await self._try_save()

    async def drain(self, keys: Iterable[Any] | None = None, *, wait: float) -> None:
        """Wait (up to ``wait`` seconds) until nothing of ``keys`` is in flight, then save them."""
        chosen = list(self.trackers) if keys is None else [k for k in keys if k in self.trackers]
        with anyio.move_on_after(wait):
            for key in chosen:
                await self.trackers[key].idle()
        with anyio.move_on_after(self.final_wait):
            await self._try_save(chosen)


BACKFILL_LOG_EVERY = 10.0
"""Seconds between two log lines about a backfill under way."""


class Backfill:
    """A source catching up: ``done`` of ``total`` units (blocks, records) since it began, at the rate measured
    since then, hence an estimate of the time left. The daemon keeps one per trigger for logs and ``status``."""

    def __init__(self, unit: str, done: float, total: float, now: float) -> None:
        self.unit = unit
        self.started = now
        self.first = done
        self.done = done
        self.total = total
        self.logged = now
        self.now = now

    def update(self, done: float, total: float, now: float) -> bool:
        """Record where the backfill is; True when a log line about it is due."""
        self.done, self.total, self.now = done, total, now
        if now - self.logged >= BACKFILL_LOG_EVERY:
            self.logged = now
            return True
        return False

    @property
    def rate(self) -> float:
        """Units per second since the backfill began (0 until some are done)."""
        elapsed = self.now - self.started
        return (self.done - self.first) / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before there is a rate)."""
        rate = self.rate
        return max(0.0, self.total - self.done) / rate if rate > 0 else None

    def report(self) -> dict[str, Any]:
        eta = self.eta
        return {"unit": self.unit, "done": self.done, "total": self.total,
                "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
                "rate": round(self.rate, 1), "eta_seconds": None if eta is None else round(eta, 1),
                "elapsed_seconds": round(self.now - self.started, 1)}

    def describe(self) -> str:
        eta = self.eta
        left = "time left unknown yet" if eta is None else f"about {duration_text(eta)} left"
        return (f"{self.done:,.0f} of {self.total:,.0f} {self.unit} ({100.0 * self.done / max(self.total, 1):.0f}%), "
                f"{self.rate:,.0f} {self.unit}/s, {left}")


def duration_text(seconds: float, *, coarse: bool = False) -> str:
    """``42s``, ``3m05s``, ``2h10m``; or ``coarse`` (kubectl's way, for ages): ``850ms``, ``4.2s``, ``42s``, ``3m``,
    ``5h``, ``2d``."""
    if coarse:
        if seconds < 1:
            return f"{max(0, int(seconds * 1000))}ms"
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds >= size * (2 if unit != "m" else 1):
                return f"{int(seconds // size)}{unit}"
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
