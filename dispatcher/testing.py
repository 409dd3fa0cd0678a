"""A stub ``SourceContext`` for connector tests: a source runs against it as it would in the daemon.

It records what the source emits, settles it when and how the test says (in parts, in any order,
with the outcome the test chooses, through the source's own acknowledgements, as the dispatcher
does), keeps checkpoints and the inbox in memory, and serves the source's routes to the test::

    ctx = StubContext()
    async with ctx.running(source):  # started, ready; stopped (cancelled) on the way out
        await ctx.wait_emitted(10)
        await ctx.settle(ctx.unsettled()[1:])  # all but the first, which is still in flight
        ...

Nothing here talks to a broker, a disk or a container: the source does, for real.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Literal

import anyio

from dispatcher.api import Ack, Event, HttpHandler, HttpRequest, HttpResponse, Outcome, Run, Source

Status = Literal["succeeded", "dead-lettered", "dropped"]


class MemoryCheckpoints:
    """``Checkpoints`` in a dict; ``history`` keeps every ``put``, in order."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.saved: dict[str, float] = {}
        self.history: list[dict[str, str]] = []

    async def get(self, key: str) -> str | None:
        return self.values.get(key)

    async def get_many(self, keys: list[str]) -> dict[str, str]:
        return {k: self.values[k] for k in keys if k in self.values}

    async def put(self, values: Mapping[str, str]) -> None:
        now = time.time()
        self.values.update(values)
        self.saved.update(dict.fromkeys(values, now))
        self.history.append(dict(values))

    async def forget(self, prefix: str, before: float) -> None:
        await self.delete([k for k, at in self.saved.items() if k.startswith(prefix) and at < before])

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.values.pop(key, None)
            self.saved.pop(key, None)

    async def items(self, prefix: str, limit: int = 100_000) -> dict[str, str]:
        return {k: self.values[k] for k in sorted(self.values) if k.startswith(prefix)}


class MemoryInbox:
    """``Inbox`` in a dict (insertion order is oldest first), with dedupe keys."""

    def __init__(self) -> None:
        self.events: dict[str, Event] = {}
        self.dedupe: dict[str, str] = {}

    async def put(self, event: Event, dedupe_key: str | None = None) -> str | None:
        if dedupe_key is not None:
            if dedupe_key in self.dedupe:
                return self.dedupe[dedupe_key]
            self.dedupe[dedupe_key] = event.id
        self.events[event.id] = event
        return None

    async def remove(self, event_id: str, *, forget_dedupe: bool = False) -> None:
        self.events.pop(event_id, None)
        if forget_dedupe:
            self.dedupe = {k: v for k, v in self.dedupe.items() if v != event_id}

    async def pending(self) -> AsyncIterator[Event]:
        snapshot = list(self.events.values())

        async def each() -> AsyncIterator[Event]:
            for event in snapshot:
                yield event
        return each()

    async def claim(self) -> list[Event]:
        return []  # (one replica: nobody else's events to take over)

    async def orphaned(self) -> None:
        await anyio.sleep_forever()


class _Emitted:
    """A run the source handed over, and which of its events are not settled yet."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.open = dict.fromkeys(range(len(run)))


class StubContext:
    """A ``SourceContext`` whose events settle only when the test calls ``settle``.

    ``buffer`` bounds the events emitted and not yet settled: past it ``offer`` says no and ``emit``
    waits, as a full trigger buffer does. ``invoke`` (``mode = "sync"``) returns ``invoke_outcome``.
    """

    def __init__(self, trigger: str = "t", *, buffer: int = 100_000,
                 invoke_outcome: Outcome | None = None) -> None:
        self.trigger = trigger
        self.replica = "stub"
        self.checkpoints = MemoryCheckpoints()
        self.inbox = MemoryInbox()
        self.buffer = buffer
        self.invoke_outcome = invoke_outcome or Outcome("succeeded", stdout=b"{}", exit_code=0)
        self.emitted: list[str] = []
        """Every event id emitted, in order (an event emitted again after a restart is listed again)."""
        self.settled: dict[str, str] = {}
        """Event ids settled so far, with their outcome's status."""
        self.invoked: list[Event] = []
        self.routes: dict[tuple[str, str], HttpHandler] = {}
        self.ready = False
        self.errors: list[str] = []
        self.lag = 0.0
        self.lag_unit = "events"
        self.paused = False
        self.backfills: list[tuple[float, float, str]] = []
        """Every ``set_backfill`` call, in order."""
        self.drops: dict[str, int] = {}
        self.schedule: tuple[float | None, float | None] = (None, None)
        """The last ``set_schedule``: (next tick, last tick)."""
        """What ``dropped`` counted, by reason."""
        self._runs: list[_Emitted] = []
        self._where: dict[str, tuple[Run, int]] = {}
        self._changed = anyio.Event()

    # -- SourceContext ------------------------------------------------------------------------

    async def emit(self, event: Event, ack: Ack | None = None) -> None:
        await self.emit_run(Run.single(event, ack))

    async def offer(self, event: Event, ack: Ack | None = None) -> bool:
        return await self.offer_run(Run.single(event, ack))

    async def emit_run(self, run: Run) -> None:
        while not self._has_room(len(run)):
            await self._wait()
        self._take(run)

    async def offer_run(self, run: Run) -> bool:
        if not self._has_room(len(run)):
            return False
        self._take(run)
        return True

    async def invoke(self, event: Event) -> Outcome:
        self.invoked.append(event)
        return self.invoke_outcome

    def add_route(self, method: str, path: str, handler: HttpHandler, *, max_body: int) -> None:
        self.routes[(method.upper(), path)] = handler

    def set_ready(self, ready: bool, error: str | None = None) -> None:
        self.ready = ready
        if error:
            self.errors.append(error)
        self._notify()

    def set_lag(self, lag: float, unit: str = "events") -> None:
        self.lag, self.lag_unit = lag, unit

    def set_paused(self, paused: bool) -> None:
        self.paused = paused

    def set_backfill(self, done: float, total: float, unit: str) -> None:
        self.backfills.append((done, total, unit))

    def set_schedule(self, next_tick: float | None, last_tick: float | None) -> None:
        self.schedule = (next_tick, last_tick)

    def dropped(self, reason: str, count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count

    # -- for the test -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self, source: Source[Any]) -> AsyncIterator[None]:
        """Run ``source`` against this context until the block ends, then stop it as the daemon does (a
        cancel); the block begins once the source says it is ready. A single error (an assertion of the
        block, the source's own) comes out as itself, not in an exception group."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(source.run, self)
                await self.wait_ready()
                yield
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    def unsettled(self) -> list[str]:
        """Ids emitted and not settled yet, in the order they were emitted."""
        return [e.run.ids[i] for e in self._runs for i in e.open]

    async def settle(self, ids: Iterable[str] | None = None, status: Status = "succeeded") -> None:
        """Settle the events ``ids`` (default: every one not settled yet) with ``status``, through the
        source's acknowledgements: one call per run with the part of it that ``ids`` names, as the
        dispatcher does when a batch ends. An id emitted twice (after a restart) settles both."""
        wanted = set(self.unsettled() if ids is None else ids)
        outcome = Outcome(status, invocation_id="stub")
        for emitted in list(self._runs):
            indexes = [i for i in emitted.open if emitted.run.ids[i] in wanted]
            if not indexes:
                continue
            for i in indexes:
                del emitted.open[i]
                self.settled[emitted.run.ids[i]] = status
            if not emitted.open:
                self._runs.remove(emitted)
            if emitted.run.ack is not None:
                whole = len(indexes) == len(emitted.run)
                await emitted.run.ack(emitted.run if whole else emitted.run.select(indexes), outcome)
        self._notify()

    def forget(self) -> None:
        """Drop every unsettled event without acknowledging it (what a daemon that stops hands back)."""
        self._runs.clear()
        self._notify()

    async def wait_emitted(self, count: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until ``count`` events are emitted in all (fails after ``timeout`` seconds)."""
        with anyio.fail_after(timeout):
            while len(self.emitted) < count:
                await self._wait()

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while not self.ready:
                await self._wait()

    async def request(self, method: str, path: str, body: bytes | Any = b"",
                      headers: Mapping[str, str] | None = None) -> HttpResponse:
        """Call the source's route as the daemon's HTTP server would (``body`` other than bytes is sent as JSON)."""
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        handler = self.routes.get((method.upper(), path))
        if handler is None:
            return HttpResponse(404)
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        return await handler(HttpRequest(method.upper(), path, lowered, body))

    # -- inside -------------------------------------------------------------------------------

    def _has_room(self, count: int) -> bool:
        held = sum(len(e.open) for e in self._runs)
        return not held or held + count <= self.buffer

    def _take(self, run: Run) -> None:
        self._runs.append(_Emitted(run))
        self.emitted.extend(run.ids)
        self._where.update((event_id, (run, index)) for index, event_id in enumerate(run.ids))
        self._notify()

    def event(self, event_id: str) -> Event:
        """An event emitted (the latest under that id), as the source made it."""
        run, index = self._where[event_id]
        return run.event(index)

    async def _wait(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
