"""The schedule source: ``source = { kind = "schedule", cron = "*/5 * * * *", timezone = "Europe/Berlin" }`` or
``every = "30s"``. One event per tick (``type`` ``eventswarm.schedule.tick``), each fired once.

One reader: with replicas the source runs on the holder of its lease. Its checkpoint ``schedule`` holds the newest
tick fired (or skipped) and the ticks fired but not yet settled. A tick is written there *before* it is emitted,
under the lease's fencing token, so a former holder that was paused cannot fire it again (its write is refused).
A tick fired and not settled when the daemon stopped (or its replica died) is fired again at the next start, with
the same event id (``<trigger>/<scheduled time>``): at least once, like every event. Ticks that fell due while no
daemon ran (or while it stalled, or the wall clock jumped forwards) are missed: ``catch_up`` says which of them fire.
``docs/schedules.md`` has the rules.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Literal

import anyio
from pydantic import field_validator, model_validator

from connectors.schedule_ticks import (
    GRACE,
    CatchUp,
    Clock,
    SystemClock,
    Ticks,
    cron_expression,
    due,
    jitter,
    tick_id,
    zone,
)
from dispatcher.api import Duration, Event, Outcome, Source, SourceConfig, SourceContext, rfc3339

log = logging.getLogger("eventswarm.schedule")

CHECKPOINT = "schedule"
NAP = 1.0
"""The longest wait before the wall clock is read again: a clock that jumps is noticed within it."""
MAX_PENDING = 1000
"""Ticks fired and not settled at most (``overlap = "allow"`` with a function far slower than its schedule): past
it a tick is skipped, and counted."""


class ScheduleSourceConfig(SourceConfig):
    kind: Literal["schedule"]
    cron: str = ""
    """Five fields (minute hour day month weekday) or an alias (``@hourly``, ``@daily``, ``@weekly``, ``@monthly``,
    ``@yearly``), on the wall clock of ``timezone``."""
    timezone: str = "UTC"
    """An IANA zone name (``"Europe/Berlin"``) for ``cron``."""
    every: Duration | None = None
    """A fixed interval instead of ``cron``, whole seconds (``"30s"``, ``"5m"``): ticks at its multiples since the Unix
    epoch."""
    catch_up: CatchUp = "last"
    """Ticks missed while no daemon ran: ``none``, the newest one (``last``), or ``all`` of them in order."""
    max_catch_up: int | Duration = 100
    """What ``catch_up`` may fire at most: a count (the newest missed ticks) or a window (``"1h"``: those at most that
    old, as a CronJob's ``startingDeadlineSeconds``)."""
    overlap: Literal["allow", "skip", "queue"] = "allow"
    """While an earlier tick's invocation runs: fire anyway (``allow``), skip the tick (``skip``), or let one tick
    wait for it (``queue``; more are skipped)."""
    jitter: Duration = 0.0
    """Each tick fires after a delay within this window, the same on every replica."""

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if value:
            cron_expression(value)
        return value

    @field_validator("max_catch_up")
    @classmethod
    def _max_catch_up(cls, value: int | float) -> int | float:
        if isinstance(value, int) and value < 1:
            raise ValueError("give a count of 1 or more, or a window such as \"1h\"")
        return value

    @model_validator(mode="after")
    def _check(self) -> ScheduleSourceConfig:
        if bool(self.cron) == (self.every is not None):
            raise ValueError("cron or every: give one of them (cron = \"*/5 * * * *\" or every = \"30s\")")
        if self.every is not None:
            if self.every < 1 or self.every != int(self.every):
                raise ValueError(f"every: {self.every:g}s is not a whole number of seconds (1s or more)")
            if "timezone" in self.model_fields_set:
                raise ValueError("timezone: an interval does not follow a wall clock; timezone is for cron")
            if self.jitter >= self.every:
                raise ValueError(f"jitter: {self.jitter:g}s is not shorter than the interval ({self.every:g}s)")
        return self

    def ticks(self) -> Ticks:
        return Ticks(cron=self.cron, timezone=self.timezone, every=int(self.every or 0))

    def upcoming(self, count: int, after: float) -> list[datetime]:
        """The next ``count`` ticks after ``after`` (Unix seconds), on the wall clock of the schedule's zone."""
        ticks, found, moment = self.ticks(), [], after
        for _ in range(count):
            moment = ticks.after(moment)
            found.append(ticks.local(moment))
        return found


class ScheduleSource(Source[ScheduleSourceConfig]):
    config_model = ScheduleSourceConfig
    single_reader = True

    def __init__(self, config: ScheduleSourceConfig, clock: Clock | None = None) -> None:
        super().__init__(config)
        self.clock: Clock = clock or SystemClock()
        self.ticks = config.ticks()
        self.fired = 0.0
        """The newest tick fired or skipped: the next round starts after it."""
        self.pending: set[float] = set()
        """Ticks fired and not settled."""
        self.queued: float | None = None
        self._saving = anyio.Lock()
        self._settled = anyio.Event()
        self._went_back = False
        self._grace = 0.0
        """0 in the first round after a start: every tick due then fell while no daemon ran (missed)."""
        self.last: float | None = None
        """The newest tick fired (for ``status``)."""

    async def run(self, ctx: SourceContext) -> None:
        self._grace = 0.0
        saved = await ctx.checkpoints.get(CHECKPOINT)
        now = self.clock.now()
        if saved:
            state = json.loads(saved)
            self.fired = float(state["fired"])
            self.pending = {float(t) for t in state.get("pending", [])}
            self.queued = state.get("queued")
        else:
            self.fired = now  # a new schedule: from now on, nothing of the past
            await self._save(ctx)
        ctx.set_ready(True)
        for tick in sorted(self.pending):  # fired, never settled: at least once
            await self._emit(ctx, tick, again=True)
        while True:
            await self._round(ctx)
            await self._wait(ctx)

    async def _round(self, ctx: SourceContext) -> None:
        """Fire what is due now (and a queued tick once the one it waits for has settled)."""
        config = self.config
        now = self.clock.now()
        if now < self.fired - GRACE and not self._went_back:
            self._went_back = True
            log.warning("trigger %s: the wall clock went back %.1fs behind the newest tick (%s): no tick fires again; "
                        "the next one fires when the clock reaches it", ctx.trigger, self.fired - now,
                        rfc3339(self.fired))
        elif now >= self.fired:
            self._went_back = False
        window = config.max_catch_up if isinstance(config.max_catch_up, float) else None
        count = config.max_catch_up if isinstance(config.max_catch_up, int) else None
        fire, skipped, newest, missed, last_missed = due(
            self.ticks, self.fired, now, config.catch_up, count, window,
            lambda tick: jitter(ctx.trigger, tick, config.jitter), self._grace)
        self._grace = GRACE
        if missed:
            log.warning("trigger %s: %d tick%s missed up to %s (the daemon was down or stalled, or the clock jumped); "
                        "catch_up = %r fires %d of them", ctx.trigger, missed, "s"[:missed - 1],
                        rfc3339(last_missed) if last_missed is not None else "?", config.catch_up, missed - skipped)
        if skipped:
            ctx.dropped("missed", skipped)
        for tick in fire:
            await self._tick(ctx, tick)
        if newest > self.fired:
            self.fired = newest
            await self._save(ctx)
        if self.queued is not None and not self.pending:
            tick, self.queued = self.queued, None
            await self._fire(ctx, tick)

    async def _tick(self, ctx: SourceContext, tick: float) -> None:
        """A due tick, as ``overlap`` says."""
        overlap = self.config.overlap
        if (self.pending and overlap != "allow") or len(self.pending) >= MAX_PENDING:
            if overlap == "queue" and self.queued is None:
                self.queued = tick
                self.fired = max(self.fired, tick)
                await self._save(ctx)
                return
            log.info("trigger %s: tick %s skipped: the invocation of tick %s still runs (overlap = %r)", ctx.trigger,
                     rfc3339(tick), rfc3339(min(self.pending)), overlap)
            ctx.dropped("overlap", 1)
            return
        await self._fire(ctx, tick)

    async def _fire(self, ctx: SourceContext, tick: float) -> None:
        """Saved first (fenced by the lease: a replica that lost it fails here), then emitted."""
        self.fired = max(self.fired, tick)
        self.pending.add(tick)
        await self._save(ctx)
        self.last = max(self.last or tick, tick)
        await self._emit(ctx, tick)

    async def _emit(self, ctx: SourceContext, tick: float, again: bool = False) -> None:
        delay = jitter(ctx.trigger, tick, self.config.jitter)
        now = self.clock.now()
        scheduled = rfc3339(tick)
        event = Event(
            id=tick_id(ctx.trigger, tick), source=f"eventswarm://schedule/{ctx.trigger}",
            type="eventswarm.schedule.tick", time=scheduled,
            data={"scheduled": scheduled, "scheduled_local": self.ticks.local(tick).isoformat(),
                  "fired": rfc3339(now), "late_seconds": round(max(0.0, now - tick - delay), 3),
                  "jitter_seconds": round(delay, 3), "again": again},
            extensions={"scheduledtime": scheduled, "schedule": self.config.cron or f"every {self.config.every:g}s"},
            datacontenttype="application/json")

        async def settled(outcome: Outcome) -> None:
            self.pending.discard(tick)
            await self._save(ctx)
            self._settled.set()

        await ctx.emit(event, settled)

    async def _save(self, ctx: SourceContext) -> None:
        async with self._saving:  # (each write is the whole state as it is now: in order, the newest last)
            await ctx.checkpoints.put({CHECKPOINT: json.dumps(
                {"fired": self.fired, "pending": sorted(self.pending), "queued": self.queued})})

    async def _wait(self, ctx: SourceContext) -> None:
        """Until the next tick (and its jitter) is due, a queued tick may fire, or ``NAP`` has passed."""
        upcoming = self.ticks.after(self.fired)
        ctx.set_schedule(upcoming, self.last)
        wait = upcoming + jitter(ctx.trigger, upcoming, self.config.jitter) - self.clock.now()
        if wait <= 0:
            return
        self._settled = anyio.Event()
        async with anyio.create_task_group() as tg:
            async def nap() -> None:
                await self.clock.sleep(min(wait, NAP))
                tg.cancel_scope.cancel()

            async def settle() -> None:
                await self._settled.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(nap)
            if self.queued is not None:
                tg.start_soon(settle)
