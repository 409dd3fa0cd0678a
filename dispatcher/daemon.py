"""The daemon: wires the config to connectors (entry points), triggers, the executor and the HTTP server, runs them,
and reloads them. A trigger at run time is ``dispatcher.trigger``; the replicas' heartbeat and takeover are
``dispatcher.takeover``."""

from __future__ import annotations

import gc
import hashlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from dispatcher import config as configuration
from dispatcher import telemetry
from dispatcher.api import Ack, Event, Outcome, rfc3339
from dispatcher.config import ConfigBase
from dispatcher.errors import ConfigError, ExecutorError, StoreError
from dispatcher.executors import Executor, create
from dispatcher.http import HttpServer
from dispatcher.lock import store_lock
from dispatcher.metrics import Metrics
from dispatcher.plugins import connectors
from dispatcher.replicas import Membership, default_id
from dispatcher.retention import Retention
from dispatcher.state import StateStore
from dispatcher.store import Database, abandon_unfinished, is_postgres, remove_dead_letter
from dispatcher.takeover import Takeover
from dispatcher.trigger import RATE_EVERY, Shared, Trigger

log = logging.getLogger("eventswarm")


def owner_id(state_path: str, replica: str = "") -> str:
    """Labels a daemon's containers, so that its ``gc`` at start removes only its own leftovers: by its store (the
    SQLite file's absolute path, or the PostgreSQL URL without its password, and the replica's id)."""
    if is_postgres(state_path):
        from dispatcher.postgres import redacted

        return hashlib.sha256(f"{redacted(state_path)}#{replica}".encode()).hexdigest()[:16]
    return hashlib.sha256(str(Path(state_path).resolve()).encode()).hexdigest()[:16]


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
            self.store = Database(config.daemon.state_path, check=True, password=config.daemon.state_password)
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
        self.takeover = Takeover(self.membership, self.state, self.executor, owner=self.owner,
                                 functions=lambda: self.config.functions, lease_lost=self._lease_lost)
        self.http = HttpServer(host, port, metrics=self.metrics, state=self.state, status=self._status, ready=self._ready,
                               replay=self._replay, reload=self._reload_request, letters=self._letters,
                               client_timeout=config.daemon.client_timeout,
                               max_connections=config.daemon.max_connections,
                               tokens=config.daemon.api_token.values() if config.daemon.api_token.given else (),
                               metrics_public=config.daemon.metrics_public)
        self.triggers: dict[str, Trigger] = {}
        self.limiter = anyio.CapacityLimiter(config.executor.max_in_flight)
        self.telemetry = telemetry.create(config.telemetry, self.metrics)
        self.http.telemetry = self.telemetry
        self.shared = Shared(self.executor, self.state, self.http, self.metrics, self.limiter, self.owner, self.replica,
                             self.membership, self.telemetry)
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
        source = connectors()[tconfig.source.kind](tconfig.source)
        return Trigger(name, tconfig, config.functions[tconfig.function], source, self.shared)

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
                trigger = self.triggers[letter.trigger]
                await trigger.emit(event, ack=self._forget(letter.id, trigger, event))

        self._tg.start_soon(feed)
        return {"replayed": len(letters)}

    def _forget(self, dead_letter_id: str, trigger: Trigger, event: Event) -> Ack:
        async def ack(outcome: Outcome) -> None:
            if outcome.settled:
                await self.state.write(remove_dead_letter(dead_letter_id))
            if outcome.status == "succeeded":
                try:
                    await trigger.source.replayed(event)
                except Exception as exc:  # (the event ran: what is left to tidy is said, never a failure)
                    log.warning("trigger %s: after the replay of %s: %s", trigger.trigger, event.id, exc)
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
                tg.start_soon(Retention(self.state, self.metrics, lambda: self.config.daemon).run)
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

    async def _heartbeat(self) -> None:
        """Run the heartbeat and takeovers; stop the daemon when another replica took this one over."""
        await self.takeover.run()
        if self.takeover.failure is not None:
            self.failure = self.takeover.failure
            self.stop()

    def _lease_lost(self, name: str) -> None:
        trigger = self.triggers.get(name)
        if trigger is not None:
            trigger.lease_lost()

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
        if self.telemetry is not None:
            await anyio.to_thread.run_sync(self.telemetry.shutdown)  # (what is queued goes out, within its timeout)
        self.store.close()
        self.lock.release()


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
