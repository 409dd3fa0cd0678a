"""A trigger at run time: the ``SourceContext`` its source sees, its pipeline and dispatcher, the restarts of its
source, and the lease a single-reader source runs under when replicas share the state store."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from dispatcher.api import Ack, Checkpoints, Event, HttpHandler, Inbox, Outcome, Run, Source, rfc3339
from dispatcher.config import FunctionConfig, TriggerBase
from dispatcher.dispatch import Dispatcher, TriggerStopped
from dispatcher.errors import SourceError, StoreError, first_leaf
from dispatcher.executors import Executor
from dispatcher.http import HttpServer
from dispatcher.logs import fields
from dispatcher.metrics import Metrics
from dispatcher.pipeline import Pipeline
from dispatcher.progress import Backfill
from dispatcher.replicas import LEASE_PREFIX, LeaseLost, Membership
from dispatcher.schema import Write
from dispatcher.state import StateStore
from dispatcher.store import PRUNE_CHUNK, delete_checkpoints, forget_checkpoints, put_checkpoints
from dispatcher.telemetry import Telemetry

log = logging.getLogger("eventswarm")

SOURCE_RESTART_MAX = 60.0
"""Longest wait between restarts of a source that failed with a temporary error."""
RATE_EVERY = 5
"""Seconds between two samples of each trigger's events received (for its events/s)."""
RATE_WINDOW = 60
"""The rate in status is over this many seconds."""


@dataclass(frozen=True)
class Shared:
    """What the triggers of one daemon share."""

    executor: Executor
    state: StateStore
    http: HttpServer
    metrics: Metrics
    limiter: anyio.CapacityLimiter
    """Batches in flight across all triggers (``executor.max_in_flight``)."""
    owner: str
    replica: str
    membership: Membership | None = None
    telemetry: Telemetry | None = None
    """Traces (``[telemetry]``); None when export is off."""


class TriggerCheckpoints:
    """A trigger's checkpoints. A single-reader source's writes are fenced by its lease (``lease``: its name and
    token while held): refused, as ``LeaseLost``, once another replica may read the source."""

    def __init__(self, trigger: str, state: StateStore, membership: Membership | None = None) -> None:
        self.trigger = trigger
        self.state = state
        self.membership = membership
        self.lease: tuple[str, int] | None = None

    async def _write(self, write: Write) -> None:
        lease, membership = self.lease, self.membership
        if lease is None or membership is None:
            await self.state.write(write)
            return
        refused: list[bool] = []
        await self.state.write(membership.fenced(*lease, [write], refused))
        if refused:
            raise LeaseLost(f"checkpoint write refused: this replica ({membership.me.id}) no longer holds the lease of "
                            f"trigger {self.trigger} (token {lease[1]}); the source runs where the lease is")

    async def get(self, key: str) -> str | None:
        return await self.state.read(lambda s: s.checkpoint(self.trigger, key))

    async def get_many(self, keys: list[str]) -> dict[str, str]:
        return await self.state.read(lambda s: s.checkpoints_of(self.trigger, keys)) if keys else {}

    async def put(self, values: Mapping[str, str]) -> None:
        await self._write(put_checkpoints(self.trigger, values))

    async def forget(self, prefix: str, before: float) -> None:
        while True:  # in chunks, each a transaction of its own: a large forget never holds the group commit long
            removed: list[int] = []
            await self._write(forget_checkpoints(self.trigger, prefix, before, PRUNE_CHUNK, removed))
            if not removed or removed[-1] < PRUNE_CHUNK:
                return

    async def delete(self, keys: list[str]) -> None:
        await self._write(delete_checkpoints(self.trigger, keys))

    async def items(self, prefix: str, limit: int = 100_000) -> dict[str, str]:
        return await self.state.read(lambda s: s.checkpoints(self.trigger, prefix, limit))


class TriggerInbox:
    def __init__(self, trigger: str, state: StateStore) -> None:
        self.trigger = trigger
        self.state = state

    async def put(self, event: Event, dedupe_key: str | None = None) -> str | None:
        return await self.state.inbox_put(self.trigger, event, dedupe_key)

    async def remove(self, event_id: str, *, forget_dedupe: bool = False) -> None:
        await self.state.inbox_remove(self.trigger, event_id, forget_dedupe=forget_dedupe)

    async def pending(self) -> AsyncIterator[Event]:
        return await self.state.inbox_pending(self.trigger)

    async def claim(self) -> list[Event]:
        return await self.state.inbox_claim(self.trigger)

    async def orphaned(self) -> None:
        await self.state.orphaned()


class Trigger:
    """One trigger at run time: its source, pipeline and dispatcher; the ``SourceContext`` its source sees."""

    def __init__(self, name: str, config: TriggerBase, function: FunctionConfig, source: Source[Any],
                 shared: Shared) -> None:
        self.trigger = name
        self.config = config
        self.source = source
        self.dispatcher = Dispatcher(
            trigger=name, config=config, function_name=config.function, function=function, executor=shared.executor,
            state=shared.state, metrics=shared.metrics, limiter=shared.limiter, owner=shared.owner,
            replica=shared.replica, ack_failed=self.fail_source, telemetry=shared.telemetry)
        self.pipeline = Pipeline(name, config, self.dispatcher, shared.metrics, single_events=function.templated)
        self.http = shared.http
        self.metrics = shared.metrics
        self.membership = shared.membership
        self.telemetry = shared.telemetry
        self.replica = shared.replica
        self._checkpoints = TriggerCheckpoints(name, shared.state, shared.membership)
        self.checkpoints: Checkpoints = self._checkpoints
        self.inbox: Inbox = TriggerInbox(name, shared.state)
        self.standby: str | None = None
        """A single-reader source that another replica reads: that replica's id (this one waits for the lease)."""
        self.ready = False
        self.stopped: str | None = None
        self.source_error: str | None = None
        self.lag = 0.0
        self.lag_unit = "events"
        self.paused = False
        self.backfill: Backfill | None = None
        self.schedule: dict[str, str | None] | None = None
        """A schedule's next and last tick (``set_schedule``)."""
        self._samples: deque[tuple[float, float]] = deque(maxlen=RATE_WINDOW // RATE_EVERY + 1)
        self.done = anyio.Event()
        self._handlers: set[HttpHandler] = set()
        self._sync = anyio.CapacityLimiter(config.max_in_flight)
        self._source_scope: anyio.CancelScope | None = None
        self._failure: str | None = None

    # -- SourceContext ----------------------------------------------------------------------

    async def emit(self, event: Event, ack: Ack | None = None) -> None:
        if self.telemetry is not None:
            self._received_event(event)
        await self.pipeline.emit(event, ack)

    async def offer(self, event: Event, ack: Ack | None = None) -> bool:
        taken = await self.pipeline.offer(event, ack)
        if taken and self.telemetry is not None:
            self._received_event(event)
        return taken

    async def emit_run(self, run: Run) -> None:
        if self.telemetry is not None:
            self._received_run(run)
        await self.pipeline.emit_run(run)

    async def offer_run(self, run: Run) -> bool:
        taken = await self.pipeline.offer_run(run)
        if taken and self.telemetry is not None:
            self._received_run(run)
        return taken

    def _received_event(self, event: Event) -> None:
        assert self.telemetry is not None
        trace = event.extensions.get("traceparent") if event.extensions else None
        self.telemetry.received_one(self.trigger, self.config.source.kind, event.id, trace, event.received)  # type: ignore[attr-defined]

    def _received_run(self, run: Run) -> None:
        assert self.telemetry is not None
        run.receipt = self.telemetry.received(self.trigger, self.config.source.kind, run.ids, run.traces,  # type: ignore[attr-defined]
                                              run.received)

    async def invoke(self, event: Event) -> Outcome:
        self.metrics.received(self.trigger)
        predicate = self.pipeline.filter
        if predicate is not None and not predicate(event):  # (as the pipeline filters what is emitted)
            self.metrics.events_dropped.labels(self.trigger, "filtered").inc()
            return Outcome("dropped", error="filtered out by the trigger's filter")
        if self.telemetry is not None:
            self._received_event(event)
        async with self._sync:
            return await self.dispatcher.invoke_once(event)

    def add_route(self, method: str, path: str, handler: HttpHandler, *, max_body: int) -> None:
        self.http.add_route(method, path, handler, max_body=max_body, trigger=self.trigger)
        self._handlers.add(handler)

    def set_ready(self, ready: bool, error: str | None = None) -> None:
        self.ready = ready
        if error:
            self.source_error = error

    def set_lag(self, lag: float, unit: str = "events") -> None:
        if unit != self.lag_unit:
            try:
                self.metrics.source_lag.remove(self.trigger, self.lag_unit)
            except KeyError:
                pass
        self.lag, self.lag_unit = lag, unit
        self.metrics.source_lag.labels(self.trigger, unit).set(lag)

    def set_paused(self, paused: bool) -> None:
        if paused != self.paused:
            what = "paused: it stops reading until there is room" if paused else "resumed"
            log.info("source of trigger %s %s", self.trigger, what, extra=fields(f"source {what}", trigger=self.trigger))
        self.paused = paused
        self.metrics.source_paused.labels(self.trigger).set(1 if paused else 0)

    def set_schedule(self, next_tick: float | None, last_tick: float | None) -> None:
        self.schedule = {"next_tick": rfc3339(next_tick) if next_tick is not None else None,
                         "last_tick": rfc3339(last_tick) if last_tick is not None else None}

    def dropped(self, reason: str, count: int = 1) -> None:
        self.metrics.events_dropped.labels(self.trigger, reason).inc(count)

    def set_backfill(self, done: float, total: float, unit: str) -> None:
        now = time.monotonic()
        if done >= total:
            if self.backfill is not None:
                self.backfill.update(done, total, now)
                log.info("source of trigger %s: backfill done: %s %s in %.1fs", self.trigger, f"{total:,.0f}", unit,
                         now - self.backfill.started)
            self.backfill = None
        elif self.backfill is None or self.backfill.unit != unit:
            self.backfill = Backfill(unit, done, total, now)
            log.info("source of trigger %s: backfill of %s %s begins", self.trigger, f"{total - done:,.0f}", unit)
        elif self.backfill.update(done, total, now):
            log.info("source of trigger %s: backfill: %s", self.trigger, self.backfill.describe(),
                     extra=fields(f"backfill: {self.backfill.describe()}", trigger=self.trigger,
                                  backfill=self.backfill.report()))

    # -- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._run_source)
                    await self.pipeline.run()
                    tg.cancel_scope.cancel()
            except* TriggerStopped as group:
                self.stopped = str(first_leaf(group))
                log.error("%s", self.stopped)
            except* SourceError as group:
                self.stopped = f"trigger {self.trigger!r} stopped: {first_leaf(group)}"
                log.error("%s", self.stopped)
        finally:
            self.ready = False
            self.http.remove_routes(self._handlers)
            self.done.set()

    @property
    def in_flight(self) -> int:
        """Batches of this trigger running now."""
        return self.metrics.counted(self.trigger).in_flight

    def fail_source(self, reason: str) -> None:
        """Stop the running source as if it had failed with a temporary error ``reason``: it saves what is
        settled, then restarts, and what it had not acknowledged comes again from its origin."""
        if self._failure is None:
            self._failure = reason
            self.metrics.source_errors.labels(self.trigger).inc()
        self.set_ready(False, reason)  # at once: /readyz says so while the source stops
        if self._source_scope is not None:
            self._source_scope.cancel()

    async def _run_source(self) -> None:
        """Run the source; restart it after a temporary error (or a bug), waiting longer each time."""
        delay = 1.0
        while True:
            self._failure = None
            started = time.monotonic()
            try:
                try:
                    with anyio.CancelScope() as self._source_scope:
                        if self.single_reader:
                            await self._lease()
                        await self.source.run(self)
                except BaseExceptionGroup as group:  # raised in a source's own task group: what went wrong
                    leaf = first_leaf(group)
                    raise leaf if isinstance(leaf, Exception) else group from None
                if self._failure is None:
                    return
                raise SourceError(self._failure)
            except (SourceError, StoreError) as exc:
                if not exc.temporary:
                    raise
                self.set_ready(False, str(exc))
                log.warning("source of trigger %s failed: %s; restarting in %.0fs", self.trigger, exc, delay,
                            extra=fields(f"source failed: {exc}; restarting in {delay:.0f}s", trigger=self.trigger))
            except Exception as exc:
                self.set_ready(False, f"{type(exc).__name__}: {exc}")
                log.exception("source of trigger %s crashed; restarting in %.0fs", self.trigger, delay,
                              extra=fields(f"source crashed; restarting in {delay:.0f}s", trigger=self.trigger))
            finally:
                self._source_scope = None
                await self._unlease()
                # Its routes answer 503 until it serves them again: nothing is accepted without a live source.
                self.http.remove_routes(self._handlers)
                self._handlers.clear()
            if self._failure is None:
                self.metrics.source_errors.labels(self.trigger).inc()  # (a failed acknowledgement counted already)
            if time.monotonic() - started > SOURCE_RESTART_MAX:
                delay = 1.0  # it ran well for a while: this is a new failure, not the same one again
            await anyio.sleep(delay)
            delay = min(delay * 2, SOURCE_RESTART_MAX)

    @property
    def single_reader(self) -> bool:
        """Whether the source must have one reader among the replicas (a folder, a chain): it runs under a lease."""
        return self.membership is not None and bool(getattr(self.source, "single_reader", False))

    @property
    def lease_name(self) -> str:
        return f"{LEASE_PREFIX}{self.trigger}"

    async def _lease(self) -> None:
        """Wait until this replica holds the source's lease; its checkpoint writes are fenced by its token."""
        assert self.membership is not None
        while (token := await self.membership.acquire(self.lease_name)) is None:
            holder = await self.membership.holder(self.lease_name)
            if holder is not None and holder != self.standby:
                log.info("source of trigger %s: replica %s reads it; this one stands by", self.trigger, holder,
                         extra=fields(f"standby: replica {holder} reads the source", trigger=self.trigger))
            self.standby = holder
            self.set_ready(True)  # (a replica standing by is ready: it serves what it can, and takes over if need be)
            await anyio.sleep(self.membership.every)
        if self.standby is not None:
            log.info("source of trigger %s: this replica holds its lease now (token %d)", self.trigger, token,
                     extra=fields("took the source's lease", trigger=self.trigger, token=token))
        self.standby = None
        self._checkpoints.lease = (self.lease_name, token)

    async def _unlease(self) -> None:
        """Free the lease when the source stops (another replica may take it at once). The checkpoints keep its
        token: a late write (a batch that was in flight) is refused, until this replica holds the lease again."""
        if self._checkpoints.lease is None or self.membership is None or self.lease_name not in self.membership.leases:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.membership.release(self.lease_name)
            except StoreError:
                pass  # it expires

    def lease_lost(self) -> None:
        """The heartbeat could not renew the lease (this replica was paused or cut off past it): the source stops
        here (what it held comes again from its checkpoint, where the new holder reads it)."""
        if self._checkpoints.lease is not None and self.membership is not None:
            self.membership.leases.pop(self.lease_name, None)  # (its token stays with the checkpoints: refused)
            self.fail_source(f"this replica lost the lease of trigger {self.trigger}'s source (not renewed within "
                             f"{self.membership.timeout:g}s)")

    def status(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "source": self.config.source.kind,  # type: ignore[attr-defined]
            "function": self.config.function,
            "state": "stopped" if self.stopped else ("standby" if self.standby is not None else
                                                     ("running" if self.ready else "starting")),
            "standby_for": self.standby,
            "ready": self.ready,
            "buffered": self.pipeline.depth,
            "in_flight": self.in_flight,
            "lag": self.lag,
            "lag_unit": self.lag_unit,
            "paused": self.paused,
            "backfill": self.backfill.report() if self.backfill else None,
            "schedule": self.schedule,
            # A source down for a reason says so first; else the last failed invocation, else the source's last error.
            "last_error": (self.stopped or (self.source_error if not self.ready else None) or self.dispatcher.last_error
                           or self.source_error),
            "last_error_at": rfc3339(self.dispatcher.last_error_at) if self.dispatcher.last_error_at else None,
            "last_error_invocation": self.dispatcher.last_error_invocation,
            "received": self.metrics.counted(self.trigger).received,
            "acked": self.metrics.counted(self.trigger).acked,
            "events_per_s": round(self.rate(), 2),
        }

    def sample(self, now: float) -> None:
        """Note how many events have come so far (every few seconds: the rate over the last minute)."""
        self._samples.append((now, self.metrics.counted(self.trigger).received))

    def rate(self) -> float:
        """Events received per second over the last minute (0 before two samples)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
