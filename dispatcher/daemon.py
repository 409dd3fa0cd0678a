"""The daemon: wires the config to connectors (entry points), pipelines, the executor and the HTTP server."""

from __future__ import annotations

import gc
import hashlib
import logging
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from dispatcher import config as configuration
from dispatcher.api import Ack, Checkpoints, Event, HttpHandler, Inbox, Outcome, Run, Source, rfc3339
from dispatcher.config import ConfigBase, TriggerBase
from dispatcher.dispatch import Dispatcher, TriggerStopped, outcome_of
from dispatcher.errors import ConfigError, ExecutorError, SourceError, StoreError, first_leaf
from dispatcher.executors import Executor, Invocation, Result, create
from dispatcher.http import HttpServer
from dispatcher.lock import store_lock
from dispatcher.logs import fields
from dispatcher.metrics import Metrics
from dispatcher.pipeline import Pipeline
from dispatcher.plugins import connectors
from dispatcher.progress import Backfill
from dispatcher.replicas import LEASE_PREFIX, LeaseLost, Membership, Unfinished, default_id
from dispatcher.store import (
    StateStore,
    Store,
    Write,
    abandon_unfinished,
    delete_checkpoints,
    finish_invocation,
    forget_checkpoints,
    is_postgres,
    prune,
    put_checkpoints,
    remove_dead_letter,
)

log = logging.getLogger("eventswarm")

SOURCE_RESTART_MAX = 60.0
"""Longest wait between restarts of a source that failed with a temporary error."""
HOUSEKEEPING_EVERY = 600.0
DEDUPE_WINDOW = 7 * 86400.0


def owner_id(state_path: str, replica: str = "") -> str:
    """Labels a daemon's containers, so that its ``gc`` at start removes only its own leftovers: by its store (the
    SQLite file's absolute path, or the PostgreSQL URL without its password, and the replica's id)."""
    if is_postgres(state_path):
        from dispatcher.postgres import redacted

        return hashlib.sha256(f"{redacted(state_path)}#{replica}".encode()).hexdigest()[:16]
    return hashlib.sha256(str(Path(state_path).resolve()).encode()).hexdigest()[:16]


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
        await self._write(forget_checkpoints(self.trigger, prefix, before))

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

    def __init__(self, name: str, config: TriggerBase, source: Source[Any], pipeline: Pipeline,
                 dispatcher: Dispatcher, state: StateStore, http: HttpServer, metrics: Metrics,
                 membership: Membership | None = None) -> None:
        self.trigger = name
        self.config = config
        self.source = source
        self.pipeline = pipeline
        self.dispatcher = dispatcher
        self.http = http
        self.metrics = metrics
        self.membership = membership
        self._checkpoints = TriggerCheckpoints(name, state, membership)
        self.checkpoints: Checkpoints = self._checkpoints
        self.inbox: Inbox = TriggerInbox(name, state)
        self.standby: str | None = None
        """A single-reader source that another replica reads: that replica's id (this one waits for the lease)."""
        self.ready = False
        self.stopped: str | None = None
        self.source_error: str | None = None
        self.lag = 0.0
        self.lag_unit = "events"
        self.paused = False
        self.backfill: Backfill | None = None
        self._samples: deque[tuple[float, float]] = deque(maxlen=RATE_WINDOW // RATE_EVERY + 1)
        self.done = anyio.Event()
        self._handlers: set[HttpHandler] = set()
        self._sync = anyio.CapacityLimiter(config.max_in_flight)
        self._source_scope: anyio.CancelScope | None = None
        self._failure: str | None = None
        dispatcher.ack_failed = self.fail_source

    # -- SourceContext ----------------------------------------------------------------------

    async def emit(self, event: Event, ack: Ack | None = None) -> None:
        await self.pipeline.emit(event, ack)

    async def offer(self, event: Event, ack: Ack | None = None) -> bool:
        return await self.pipeline.offer(event, ack)

    async def emit_run(self, run: Run) -> None:
        await self.pipeline.emit_run(run)

    async def offer_run(self, run: Run) -> bool:
        return await self.pipeline.offer_run(run)

    async def invoke(self, event: Event) -> Outcome:
        self.metrics.received(self.trigger)
        predicate = self.pipeline.filter
        if predicate is not None and not predicate(event):  # (as the pipeline filters what is emitted)
            self.metrics.events_dropped.labels(self.trigger, "filtered").inc()
            return Outcome("dropped", error="filtered out by the trigger's filter")
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


GC_THRESHOLDS = (10_000, 10, 10)
"""The collector's thresholds in the daemon process. With the interpreter's default (700 new objects
start a collection) a busy trigger runs hundreds of collections a second, each walking the lists
that hold the buffered events: measured at up to a fifth of the event loop's time with 50,000 Kafka
records buffered. Garbage without cycles is freed at once either way."""


def tune_gc() -> None:
    """Set ``GC_THRESHOLDS`` unless the process already chose its own (``eventswarm run`` calls this)."""
    if gc.get_threshold()[0] == 700:
        gc.set_threshold(*GC_THRESHOLDS)


class Daemon:
    """Everything one ``eventswarm run`` runs."""

    def __init__(self, config: ConfigBase, config_path: str | None = None, *, exclusive: bool = True) -> None:
        self.config = config
        self.config_path = config_path
        """The file ``reload`` reads again (None: a config given in code, which cannot be reloaded)."""
        self.loaded = _Loaded.of(config_path)
        self.metrics = Metrics()
        host, port = config.daemon.host_port
        self.replica = config.daemon.replica or default_id(port)
        self.owner = owner_id(config.daemon.state_path, self.replica)
        self.lock = store_lock(config.daemon.state_path, config.daemon.state_password, self.replica)
        if exclusive:  # (``invoke`` runs one invocation beside a running daemon: it takes no lock)
            self.lock.acquire()  # before anything is touched
        try:
            self.store = Store(config.daemon.state_path, check=True, password=config.daemon.state_password)
            self.state = StateStore(self.store)
            self.membership = Membership(self.state, self.replica, self.owner, config.daemon.listen,
                                         config.daemon.replica_timeout)
            self.executor: Executor = create(config, self.owner)
            self.metrics.pools.source = self.pools
        except BaseException:
            self.lock.release()
            raise
        self.failure: str | None = None
        """Why the daemon stopped on its own (taken over by another replica), for ``run``'s exit status."""
        self._joined = False
        self._taking_over: set[str] = set()
        """Replicas this one is taking over now (each in a task of its own)."""
        self.http = HttpServer(host, port, metrics=self.metrics, state=self.state, status=self._status, ready=self._ready,
                               replay=self._replay, reload=self._reload_request, letters=self._letters,
                               client_timeout=config.daemon.client_timeout,
                               max_connections=config.daemon.max_connections,
                               tokens=config.daemon.api_token.values() if config.daemon.api_token.given else (),
                               metrics_public=config.daemon.metrics_public)
        self.triggers: dict[str, Trigger] = {}
        self.limiter = anyio.CapacityLimiter(config.executor.max_in_flight)
        self.started = anyio.Event()
        self._stop = anyio.Event()
        self._tg: TaskGroup | None = None
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._reloading = anyio.Lock()

    def build_triggers(self) -> None:
        for name in self.config.triggers:
            self.triggers[name] = self._build(self.config, name)

    def _build(self, config: ConfigBase, name: str) -> Trigger:
        tconfig = config.triggers[name]
        function = config.functions[tconfig.function]
        dispatcher = Dispatcher(
            trigger=name, config=tconfig, function_name=tconfig.function, function=function,
            executor=self.executor, state=self.state, metrics=self.metrics, limiter=self.limiter, owner=self.owner,
            replica=self.replica)
        pipeline = Pipeline(name, tconfig, dispatcher, self.metrics, single_events=function.templated)
        source = connectors()[tconfig.source.kind](tconfig.source)
        return Trigger(name, tconfig, source, pipeline, dispatcher, self.state, self.http, self.metrics, self.membership)

    def _start(self, trigger: Trigger) -> None:
        assert self._tg is not None
        scope = self._scopes[trigger.trigger] = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await trigger.run()

        self._tg.start_soon(run)

    async def reload(self) -> dict[str, Any]:
        """Read the config file again and apply it trigger by trigger (SIGHUP, ``eventswarm reload``): added
        triggers start; removed ones stop taking events, finish what they hold, and stop; changed ones (their
        table, or their function's) do the same, then start again under the new config. Unchanged triggers are
        not touched. An invalid config changes nothing: raises ``ConfigError`` (and logs every error)."""
        if self.config_path is None:
            raise ConfigError([("", "this daemon was not started from a config file: nothing to reload")])
        async with self._reloading:
            try:
                config = configuration.load(self.config_path)
            except ConfigError as exc:
                for line in exc.lines():
                    log.error("reload refused, the running config stays: %s", line)
                raise
            old = self.config
            for section in ("daemon", "executor"):
                if getattr(old, section).model_dump() != getattr(config, section).model_dump():
                    log.warning("reload: the [%s] section changed; it takes effect at the next start", section)
            added = [n for n in config.triggers if n not in old.triggers]
            removed = [n for n in old.triggers if n not in config.triggers]
            changed = [n for n in config.triggers if n in old.triggers and _setup(config, n) != _setup(old, n)]
            new = {n: self._build(config, n) for n in [*changed, *added]}  # (before anything stops: may raise)
            self.config = config.model_copy(update={"daemon": old.daemon, "executor": old.executor})
            self.loaded = _Loaded.of(self.config_path)
            log.info("reload: %d triggers added, %d changed, %d removed, %d unchanged (config %s)", len(added),
                     len(changed), len(removed), len(config.triggers) - len(added) - len(changed), self.loaded.hash[:12])
            async with anyio.create_task_group() as tg:
                for name in [*removed, *changed]:
                    tg.start_soon(self._retire, name)
            await self._prepare()
            for name, trigger in new.items():
                self.triggers[name] = trigger
                self._start(trigger)
            return {"added": added, "changed": changed, "removed": removed, "config": self.loaded.report()}

    async def _retire(self, name: str) -> None:
        """Stop trigger ``name`` without losing what it took: it takes nothing more (its routes answer 503), what
        it holds runs (within ``shutdown_grace``; past it, batches in flight are handed back), then it stops."""
        trigger = self.triggers[name]
        self.http.remove_routes(trigger._handlers)
        grace = self.config.daemon.shutdown_grace
        with anyio.move_on_after(grace) as scope:
            # (requests it was answering finish first: what they accepted is in its buffer then)
            await self.http.answered(trigger._handlers)
            await trigger.pipeline.emptied()
        trigger.pipeline.drain()
        with anyio.move_on_after(0 if scope.cancelled_caught else grace):
            await trigger.done.wait()
        if not trigger.done.is_set():
            log.warning("trigger %s: what it held after %gs is handed back to its source", name, grace)
            self._scopes[name].cancel()
            await trigger.done.wait()
        trigger.pipeline.close()
        del self.triggers[name]
        self._scopes.pop(name, None)

    async def invoke_once(self, trigger: str, event: Event) -> Outcome:
        """One invocation of ``event`` through ``trigger``'s function and executor, as the daemon would run it."""
        try:
            await self.executor.start()
            self.build_triggers()
            return await self.triggers[trigger].dispatcher.invoke_once(event)
        finally:
            await self.close()

    async def _prepare(self) -> None:
        """Warm functions' pools begin to fill (an executor without warm containers has nothing to do)."""
        await self.executor.prepare(self.config.functions, self.owner)

    def pools(self) -> list[dict[str, Any]]:
        return self.executor.pools()

    async def _status(self) -> dict[str, Any]:
        try:
            replicas = await self.membership.report()
        except StoreError:
            replicas = []
        return {"triggers": [t.status() for t in self.triggers.values()], "executor": self.executor.kind,
                "pools": self.pools(), "config": self.loaded.report(), "replica": self.replica, "replicas": replicas}

    async def _ready(self) -> dict[str, Any]:
        executor_ok = await self.executor.ping()
        sources = {name: t.ready for name, t in self.triggers.items() if not t.stopped}
        store = await self.state.probe()
        return {"ready": executor_ok and all(sources.values()) and store is None, "executor": executor_ok,
                "sources": sources, "store": store or "ok"}

    async def _replay(self, ids: list[str], trigger: str | None) -> dict[str, Any]:
        """Send dead letters back through their trigger; each is deleted once its event is settled again."""
        letters = await self.state.read(lambda s: [d for d in s.dead_letters(trigger=trigger, limit=100_000)
                                                   if not ids or d.id in ids])
        letters = [d for d in letters if d.trigger in self.triggers and not self.triggers[d.trigger].stopped]
        if self._tg is None:
            raise RuntimeError("the daemon is not running")

        async def feed() -> None:
            for letter in letters:
                event = Event.from_dict(letter.event)
                await self.triggers[letter.trigger].emit(event, ack=self._forget(letter.id))

        self._tg.start_soon(feed)
        return {"replayed": len(letters)}

    def _forget(self, dead_letter_id: str) -> Ack:
        async def ack(outcome: Outcome) -> None:
            if outcome.settled:
                await self.state.write(remove_dead_letter(dead_letter_id))
        return ack

    def stop(self) -> None:
        """Begin a clean shutdown (what SIGTERM does)."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        try:
            await self.executor.start()
            # Reconcile: what an earlier run left behind is removed; its unacknowledged events come back
            # from their sources and run again as new invocations (never under an old invocation id).
            await self.membership.join()
            self._joined = True
            removed = await self.executor.gc(self.owner)
            if removed:
                log.info("removed %d containers, services, configs or processes left behind by an earlier run", removed)
            # (this replica's, under its earlier incarnation; on SQLite, one daemon: all of them)
            await self.state.write(abandon_unfinished(time.time(), [self.replica, ""] if self.store.postgres else None))
            await self._prepare()
            self.build_triggers()
            await self.http.start()
        except BaseException:
            await self.close()
            raise
        log.info("eventswarm listening on %s:%d with %d triggers (executor: %s)", self.http.host, self.http.port,
                 len(self.triggers), self.executor.kind)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for trigger in self.triggers.values():
                    self._start(trigger)
                if handle_signals:
                    tg.start_soon(self._watch_signals)
                tg.start_soon(self._housekeeping)
                tg.start_soon(self._sampling)
                tg.start_soon(self._heartbeat)
                self.started.set()
                await self._stop.wait()
                await self._shutdown()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()
        log.info("eventswarm stopped")

    async def _shutdown(self) -> None:
        grace = self.config.daemon.shutdown_grace
        log.info("shutting down: intake stopped, waiting up to %gs for batches in flight", grace)
        # Intake stops by backpressure: webhooks are refused, and no new batch is cut, so the buffers
        # fill and the sources wait. Each source is cancelled (and commits) once its trigger's batches
        # in flight are done, so that what they finished is committed too.
        self.http.accepting = False
        for trigger in self.triggers.values():
            trigger.pipeline.drain()
        with anyio.move_on_after(grace) as scope:
            for trigger in self.triggers.values():
                await trigger.done.wait()
        if scope.cancelled_caught:
            log.warning("batches still in flight after %gs are handed back to their sources", grace)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    assert self._tg is not None
                    self._tg.start_soon(self._reload_quietly)
                    continue
                self.stop()
                return

    async def _letters(self, trigger: str | None, limit: int) -> list[dict[str, Any]]:
        letters = await self.state.read(lambda s: s.dead_letters(trigger=trigger, limit=limit))
        return [letter.to_json() for letter in letters]

    async def _reload_request(self) -> tuple[int, dict[str, Any]]:
        """``POST /v1/reload``: 200 with what changed, or 422 with every error of the config (nothing changed)."""
        try:
            return 200, await self.reload()
        except ConfigError as exc:
            return 422, {"error": "the config is invalid: the running one stays", "problems": exc.lines()}

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except ConfigError:
            pass  # (logged, line by line)

    async def _sampling(self) -> None:
        while True:
            now = time.monotonic()
            for trigger in list(self.triggers.values()):
                trigger.sample(now)
            await anyio.sleep(RATE_EVERY)

    async def _housekeeping(self) -> None:
        while True:
            now = time.time()
            try:
                await self.state.write(prune(invocations_before=now - self.config.daemon.keep_invocations,
                                             dedupe_before=now - DEDUPE_WINDOW))
            except StoreError:
                pass  # the store said why, once; the next round tries again
            await anyio.sleep(HOUSEKEEPING_EVERY)

    async def _heartbeat(self) -> None:
        """Beat (and renew the leases held); take over replicas that are gone. Stop when this one was taken over."""
        membership = self.membership
        while True:
            asleep = time.monotonic()
            await anyio.sleep(membership.every)
            began = time.monotonic()
            try:
                alive, held = await membership.beat()
                took = time.monotonic() - began
                if took + (began - asleep - membership.every) > membership.timeout / 2:
                    log.warning("heartbeat late: %.1fs to wake, %.1fs to write (replica_timeout %gs): this replica "
                                "or the state store is slow; its leases may be lost", began - asleep - membership.every,
                                took, membership.timeout)
                if not alive:
                    self.failure = (f"replica {self.replica} was taken over by another replica (its heartbeat was "
                                    f"older than {membership.timeout:g}s: paused, or cut off from the state store); "
                                    "it stops so that its work runs once, where it is now")
                    log.error("%s", self.failure)
                    self.stop()
                    return
                for name in [n for n in membership.leases if n not in held]:
                    trigger = self.triggers.get(name.removeprefix(LEASE_PREFIX))
                    if trigger is not None:
                        trigger.lease_lost()
                for replica, incarnation, owner in await membership.dead():
                    if replica not in self._taking_over and self._tg is not None:
                        # (in a task of its own: removing its jobs can take seconds, and beats must go on meanwhile)
                        self._taking_over.add(replica)
                        self._tg.start_soon(self._take_over, replica, incarnation, owner)
            except StoreError:
                pass  # the store said why, once; the next beat tries again

    async def _take_over(self, replica: str, incarnation: str, owner: str) -> None:
        """Take over the work of ``replica``, gone: unless another replica was first."""
        try:
            await self._bury(replica, incarnation, owner)
        except StoreError:
            pass  # the store said why; the next beat sees it gone again
        finally:
            self._taking_over.discard(replica)

    async def _bury(self, replica: str, incarnation: str, owner: str) -> None:
        why = f"replica {replica} stopped before it finished"
        unfinished = await self.membership.bury(replica, incarnation,
                                                lambda which: abandon_unfinished(time.time(), which, why))
        if unfinished is None:
            return
        log.warning("replica %s is gone: this replica (%s) takes over its work", replica, self.replica,
                    extra=fields(f"took over replica {replica}", replica=replica))
        self.state.orphans()  # its webhook events, but those of jobs that may still run, are claimed at once
        running = [u for u in unfinished if u.status == "running"]
        if running:
            async with anyio.create_task_group() as tg:
                for each in running:
                    tg.start_soon(self._adopt, replica, each)
        # (a process executor's children are on that host; on SQLite the name this daemon had before shares its
        # owner label: its leftovers went at start, and what carries the label now is this daemon's own)
        # (nor when it is back under the same id: its containers carry the same label, and it removed its own
        # leftovers as it started)
        if self.executor.kind in ("docker", "swarm", "auto") and owner != self.owner \
                and not await self.membership.present(replica):
            try:
                removed = await self.executor.gc(owner)
            except ExecutorError as exc:
                log.warning("cannot remove what replica %s left running: %s", replica, exc)
            else:
                if removed:
                    log.info("removed %d containers, services or configs that replica %s left behind", removed, replica)

    async def _adopt(self, replica: str, unfinished: Unfinished) -> None:
        """The job of an invocation that a replica now gone was running: if it is still there, followed to its end
        (or its result taken), its record finished, and its webhook events settled when it succeeded; else (or when
        it failed) its events run again here or at another replica."""
        function = self.config.functions.get(unfinished.function)
        result: Result | None = None
        if function is not None and function.warm is None:
            invocation = Invocation(id=unfinished.id, trigger=unfinished.trigger, function_name=unfinished.function,
                                    function=function, input=b"", env={}, args=(), owner="")
            try:
                result = await self.executor.adopt(invocation)
            except ExecutorError:
                result = None
        try:
            if result is not None:
                status, error = outcome_of(result, function.timeout if function else 0.0)
                note = f"adopted by replica {self.replica}: the job ran on after replica {replica} was gone"
                await self.state.write(finish_invocation(
                    unfinished.id, status=status, exit_code=result.exit_code,
                    error=f"{error}; {note}" if error else note, finished_at=time.time(), executor_ref=result.ref,
                    stdout=result.stdout, stderr=result.stderr))
                log.info("adopted invocation %s of replica %s (%d events): %s", unfinished.id, replica,
                         len(unfinished.event_ids), status,
                         extra=fields(f"adopted an invocation of replica {replica}: {status}", trigger=unfinished.trigger,
                                      invocation_id=unfinished.id, events=len(unfinished.event_ids)))
            await self.membership.settle_adopted(unfinished.event_ids, result is not None and result.ok)
        except StoreError:
            return  # (the rows stay held by this replica: they run after its restart, or where it is taken over)
        self.state.orphans()

    async def close(self) -> None:
        await self.http.stop()
        for trigger in self.triggers.values():
            trigger.pipeline.close()
        try:
            await self.executor.close()
        except ExecutorError:
            pass
        if self._joined and self.failure is None:
            with anyio.CancelScope(shield=True):
                try:
                    await self.membership.leave()
                except StoreError:
                    pass  # its heartbeat goes stale: the others take over all the same
        self.store.close()
        self.lock.release()


RATE_EVERY = 5
"""Seconds between two samples of each trigger's events received (for its events/s)."""
RATE_WINDOW = 60
"""The rate in status is over this many seconds."""


def _setup(config: ConfigBase, name: str) -> Any:
    """What a trigger runs with: its table and its function's (a change to either restarts it)."""
    trigger = config.triggers[name]
    return trigger.model_dump(), config.functions[trigger.function].model_dump()


class _Loaded:
    """Which config the daemon runs: its file, the hash of its text, when it was read."""

    def __init__(self, file: str | None, digest: str, at: float) -> None:
        self.file = file
        self.hash = digest
        self.at = at

    @classmethod
    def of(cls, path: str | None) -> _Loaded:
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
        except OSError:
            digest = ""
        return cls(path, digest, time.time())

    def report(self) -> dict[str, Any]:
        return {"file": self.file, "hash": self.hash, "loaded_at": rfc3339(self.at)}
