"""The schedule source's ticks, as pure functions of a wall-clock time: when they fall (a cron in a time zone, or
every N seconds), which ones are due after a downtime or a stall (``catch_up``), and each tick's jitter.

Times are Unix seconds (UTC). Cron expressions are read by cronsim, which follows Debian's cron (Vixie cron) across
daylight-saving changes: a time that does not exist (the hour skipped in spring) fires once at the first minute after
the change; in the hour that happens twice (autumn), an entry with a fixed hour and minute fires once (the first
time), and one that repeats within the hour (``*/15 * * * *``, ``0 * * * *``) fires in both.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, NamedTuple, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
from cronsim import CronSim, CronSimError

ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
           "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
"""Vixie cron's aliases (crontab(5))."""
GRACE = 1.0
"""A tick found due less than this late is on time; later, it was missed (a downtime, a stall, a clock jump) and
``catch_up`` decides whether it fires."""
SCAN_LIMIT = 100_000
"""Ticks looked at in one catch-up at most (the newest ones count: those before are skipped, and counted)."""
CatchUp = Literal["none", "last", "all"]


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a time zone of the IANA database (e.g. \"Europe/Berlin\", \"UTC\")") from None


def cron_expression(text: str) -> str:
    """``text`` with an alias spelled out; ValueError when cronsim cannot read it (say why)."""
    expression = ALIASES.get(text.strip().lower(), text.strip())
    fields = expression.split()
    if len(fields) == 6:
        raise ValueError(f"{text!r}: a seconds field is not supported (cron has five fields: minute hour day month "
                         "weekday); for ticks under a minute use every = \"30s\"")
    try:
        CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"{text!r} is not a cron expression: {exc} (five fields: minute hour day month weekday, or "
                         f"{', '.join(sorted(ALIASES))})") from None
    return expression


@dataclass(frozen=True)
class Ticks:
    """When a schedule fires: ``cron`` in ``timezone``, or every ``every`` seconds (multiples of it since the Unix
    epoch, so every replica and every restart agrees on them)."""

    cron: str = ""
    timezone: str = "UTC"
    every: int = 0

    def after(self, moment: float) -> float:
        """The first tick strictly after ``moment``."""
        if self.every:
            return float((int(moment // self.every) + 1) * self.every)
        start = datetime.fromtimestamp(int(moment), zone(self.timezone))
        return next(iter(CronSim(cron_expression(self.cron), start))).timestamp()

    def newest(self, start: float, end: float, limit: int = SCAN_LIMIT) -> tuple[list[float], int]:
        """The ticks in (``start``, ``end``], newest first, at most ``limit``; and how many there are in all (past
        ``limit``, at least ``limit + 1``)."""
        if self.every:
            first, last = int(start // self.every) + 1, int(end // self.every)
            count = max(0, last - first + 1)
            return [float(n * self.every) for n in range(last, max(first, last - limit) - 1, -1)][:limit], count
        found: list[float] = []
        moments = CronSim(cron_expression(self.cron), datetime.fromtimestamp(int(end) + 1, zone(self.timezone)),
                          reverse=True)
        for moment in moments:
            tick = moment.timestamp()
            if tick <= start:
                return found, len(found)
            if tick <= end:
                if len(found) == limit:
                    return found, limit + 1
                found.append(tick)
        return found, len(found)

    def local(self, tick: float) -> datetime:
        """``tick`` on the wall clock of the schedule's zone."""
        return datetime.fromtimestamp(tick, zone(self.timezone))


class Due(NamedTuple):
    fire: list[float]
    """The ticks to fire now, in order."""
    skipped: int
    """Due ticks skipped (missed, and not fired as ``catch_up`` says)."""
    newest: float
    """The newest tick dealt with, fired or skipped: the next round starts after it."""
    missed: int
    """Due ticks that were missed (fired or skipped)."""
    last_missed: float | None
    """The newest of them (when it is known: past ``SCAN_LIMIT`` the older ones are only counted)."""


def due(ticks: Ticks, fired: float, now: float, catch_up: CatchUp, max_count: int | None,
        max_window: float | None, delay: Callable[[float], float] = lambda tick: 0.0, grace: float = GRACE,
        ) -> Due:
    """What to do at ``now`` when the last tick fired (or skipped) was ``fired`` (see ``Due``).

    A tick is due at its time plus its ``delay`` (its jitter). One due for less than ``grace`` is on time and always
    fires (at a start, ``grace`` is 0: every tick due before it fell while no daemon ran). The ones due longer were missed (a downtime, a stall, a clock jump forwards): ``none`` skips them;
    ``last`` fires the newest due tick; ``all`` fires them in order. ``max_count`` (the newest ones) or
    ``max_window`` (those at most that old) bounds what ``last`` and ``all`` may fire."""
    newest, count = ticks.newest(fired, now)
    ready: list[float] = []
    for tick in reversed(newest):
        if tick + delay(tick) > now:
            break  # (it waits for its jitter; the ones after it wait with it)
        ready.append(tick)
    waiting = len(newest) - len(ready)
    on_time = [t for t in ready if now - t - delay(t) < grace]
    missed = [t for t in ready if now - t - delay(t) >= grace]
    if max_window is not None:
        allowed = [t for t in missed if now - t <= max_window]
    else:
        allowed = missed[-max_count:] if max_count else []
    if catch_up == "all":
        chosen = allowed
    elif catch_up == "last":
        chosen = allowed[-1:] if not on_time else []  # the newest due tick is the one that fires
    else:
        chosen = []
    return Due(chosen + on_time, count - waiting - len(on_time) - len(chosen), ready[-1] if ready else fired,
               count - waiting - len(on_time), missed[-1] if missed else None)


def jitter(trigger: str, tick: float, window: float) -> float:
    """The delay of ``tick`` within ``window`` seconds: spread over the window, the same on every replica."""
    if window <= 0:
        return 0.0
    digest = hashlib.sha256(f"{trigger}\0{tick:.0f}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * window


def tick_id(trigger: str, tick: float) -> str:
    """The event id of ``trigger``'s tick at ``tick``: the same on every replica and after a restart."""
    return f"{trigger}/{datetime.fromtimestamp(tick, UTC):%Y%m%dT%H%M%SZ}"


class Clock(Protocol):
    """The wall clock (which tick is due) and a way to wait (on the monotonic clock)."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
