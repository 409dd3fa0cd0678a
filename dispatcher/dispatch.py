"""Delivering batches: in-flight limits, invocation records, retries with backoff, bisect, dead letters, acks."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import anyio

from dispatcher.api import Outcome
from dispatcher.config import FunctionConfig, RetryConfig, TriggerBase
from dispatcher.errors import ExecutorError, SourceError, StoreError
from dispatcher.events import Event, Run, new_id, trace_ids
from dispatcher.executors import Executor, Invocation, Result
from dispatcher.logs import fields
from dispatcher.metrics import Metrics
from dispatcher.schema import Write
from dispatcher.state import StateStore
from dispatcher.store import (
    DeadLetter,
    InvocationRecord,
    finish_invocation,
    insert_dead_letter,
    insert_invocation,
    start_invocation,
)
from dispatcher.telemetry import Telemetry, ids_of, traceparent_of

log = logging.getLogger("eventswarm.dispatch")

STDERR_TAIL = 2048
"""Bytes of stderr kept with each attempt of a dead letter."""
STORE_RETRY = (0.5, 10.0)
"""While the state store fails (a full disk): the first and the longest wait before a write is tried again."""

_TEMPLATE = re.compile(r"\{([A-Za-z_][\w.]*)\}")


class TriggerStopped(Exception):
    """Retries ran out with ``on_exhausted = "stop"``: the trigger stops, its events unacknowledged."""


Fault = Literal["", "permanent", "unavailable"]
"""How an invocation's executor error counts: an ordinary try, retries are pointless, or nothing could start."""


class HandedBack(Exception):
    """The daemon is draining while the state store fails: the batch goes back to its source, unacknowledged."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed try of an event, as kept with its dead letter."""

    invocation_id: str
    attempt: int
    exit_code: int | None
    duration: float
    stderr_tail: str
    error: str | None


class Delivery:
    """A run of events on its way through the dispatcher, with the failed attempts they share."""

    __slots__ = ("attempts", "run")

    def __init__(self, run: Run, attempts: list[Attempt] | None = None) -> None:
        self.run = run
        self.attempts = attempts if attempts is not None else []

    def part(self, run: Run) -> Delivery:
        """Some of this delivery's events, with a copy of their attempts so far."""
        return Delivery(run, list(self.attempts))


def halves(deliveries: list[Delivery]) -> tuple[list[Delivery], list[Delivery]]:
    """``deliveries`` cut in two with as many events on each side as can be (a run is cut if need be)."""
    middle = sum(len(d.run) for d in deliveries) // 2
    first: list[Delivery] = []
    for index, delivery in enumerate(deliveries):
        if middle == 0:
            return first, deliveries[index:]
        size = len(delivery.run)
        if size <= middle:
            first.append(delivery)
            middle -= size
            continue
        return ([*first, delivery.part(delivery.run.slice(0, middle))],
                [delivery.part(delivery.run.slice(middle)), *deliveries[index + 1:]])
    return first, []


def backoff(attempt: int, retry: RetryConfig, rand: random.Random | None = None) -> float:
    """Seconds to wait before try number ``attempt`` (2, 3, …): doubling from ``initial`` up to ``max``, jittered."""
    delay = min(retry.max, retry.initial * 2 ** max(attempt - 2, 0))
    if retry.jitter:
        delay *= (rand or random).uniform(0.5, 1.0)
    return float(delay)


def failed_ids(stdout: bytes, batch_ids: Callable[[], set[str]]) -> set[str] | None:
    """The partial-failure result: ids of the batch (``batch_ids()``) named in a ``{"failed": [...]}`` last line of stdout."""
    tail = stdout.rstrip()[-65536:]
    line = tail.rsplit(b"\n", 1)[-1].strip()
    if not line.startswith(b"{"):
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("failed"), list):
        return None
    return {str(i) for i in doc["failed"]} & batch_ids()


def render_args(args: Sequence[str], event: Event) -> list[str]:
    """Fill ``{data.x}``-style templates from the event; a missing field is a ``KeyError``."""
    def fill(match: re.Match[str]) -> str:
        value = event.field(match.group(1), _ABSENT)
        if value is _ABSENT:
            raise KeyError(match.group(1))
        return value if isinstance(value, str) else json.dumps(value)

    return [_TEMPLATE.sub(fill, arg) for arg in args]


_ABSENT = object()


def input_document(trigger: str, function: str, batch_id: str, attempt: int, runs: Sequence[Run]) -> bytes:
    head = json.dumps({"trigger": trigger, "function": function, "batch_id": batch_id, "attempt": attempt},
                      separators=(",", ":"))
    events = list(itertools.chain.from_iterable(run.encoded for run in runs))
    if not events:
        return head[:-1].encode() + b',"events":[]}'
    # One join, so the document (megabytes for a big batch) is copied once: the head and tail ride on the ends.
    events[0] = b"".join((head[:-1].encode(), b',"events":[', events[0]))
    events[-1] = events[-1] + b"]}"
    return b",".join(events)


class Dispatcher:
    """Runs one trigger's batches through the executor until every event in them is settled."""

    def __init__(self, *, trigger: str, config: TriggerBase, function_name: str, function: FunctionConfig,
                 executor: Executor, state: StateStore, metrics: Metrics, limiter: anyio.CapacityLimiter,
                 owner: str = "", replica: str = "", ack_failed: Callable[[str], None] = lambda reason: None,
                 telemetry: Telemetry | None = None) -> None:
        self.trigger = trigger
        self.config = config
        self.function_name = function_name
        self.function = function
        self.executor = executor
        self.state = state
        self.metrics = metrics
        self.limiter = limiter
        self.owner = owner
        self.replica = replica
        self.draining = anyio.Event()
        self._latency = metrics.event_latency.labels(trigger)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_error_invocation: str | None = None
        """When the last failed invocation ended, and which one it was (the status page links to its logs)."""
        self.ack_failed = ack_failed
        """Called when a source's acknowledgement raised: the trigger fails its source, which restarts."""
        self.telemetry = telemetry
        """Traces; None when export is off (then nothing of it is on the path)."""

    async def deliver(self, batch: list[Run]) -> None:
        """Run ``batch`` with retries and bisect until each event is acknowledged or handed back.

        Bisect splits a batch whose function failed into halves without using up attempts
        (like AWS Lambda's bisect), so one poison event ends alone; attempts count the tries
        of an event once it cannot be split further. Engine errors retry the whole batch.
        """
        try:
            await self._deliver(batch)
        except HandedBack:
            log.warning("a batch of trigger %s is handed back to its source: the daemon stops while the state "
                        "store fails", self.trigger, extra=fields("a batch is handed back to its source: the daemon "
                                                                  "stops while the state store fails",
                                                                  trigger=self.trigger, events=sum(map(len, batch))))

    async def _deliver(self, batch: list[Run]) -> None:
        retry = self.config.retry
        queue: deque[tuple[list[Delivery], int]] = deque([([Delivery(run) for run in batch], 1)])
        while queue:
            if self.draining.is_set():
                return  # handed back: unacknowledged, the source delivers them again
            deliveries, attempt = queue.popleft()
            result, error, fault, invocation_id = await self._invoke([d.run for d in deliveries], attempt)
            if fault == "unavailable":  # nothing ran: wait for the executor, without using up an attempt
                if not await self._pause(backoff(attempt + 1, retry)):
                    return
                queue.appendleft((deliveries, attempt))
                continue
            succeeded, failed = self._failed(deliveries, result)
            if succeeded:
                outcome = Outcome("succeeded", invocation_id, result.stdout if result else b"", 0)
                await self.ack_all(succeeded, outcome)
            if not failed:
                continue
            record = Attempt(invocation_id, attempt, result.exit_code if result else None,
                             round(result.duration, 3) if result else 0.0,
                             (result.stderr[-STDERR_TAIL:] if result else b"").decode("utf-8", "replace"), error)
            for delivery in failed:
                delivery.attempts.append(record)
            function_failed = result is not None and not result.ok
            if retry.bisect and function_failed and failed is deliveries and sum(len(d.run) for d in failed) > 1:
                first, second = halves(failed)
                queue.appendleft((second, attempt))
                queue.appendleft((first, attempt))
                continue
            now = time.time()
            exhausted = failed if (fault == "permanent" or attempt >= retry.max_attempts) else \
                [d for d in failed if now - d.run.received > retry.max_event_age]
            for delivery in exhausted:
                await self._exhaust(delivery)
            gone = {id(d) for d in exhausted}
            again = [d for d in failed if id(d) not in gone]
            if again:
                if not await self._pause(backoff(attempt + 1, retry)):
                    return
                queue.append((again, attempt + 1))

    async def invoke_once(self, event: Event) -> Outcome:
        """One attempt of ``event`` alone, no retries (a sync webhook's caller is waiting and retries itself)."""
        result, _, _, invocation_id = await self._invoke([Run.of([event])], 1)
        if result is not None and result.ok:
            self.metrics.acked(self.trigger)
            return Outcome("succeeded", invocation_id, result.stdout, 0)
        return Outcome("failed", invocation_id, result.stdout if result else b"", result.exit_code if result else None)

    def _failed(self, deliveries: list[Delivery], result: Result | None) -> tuple[list[Run], list[Delivery]]:
        """What succeeded and what failed: all or nothing, unless a partial-failure line names events.

        The failed list is ``deliveries`` itself when all of them failed.
        """
        if result is None or not result.ok:
            return [], deliveries
        named = failed_ids(result.stdout, lambda: {i for d in deliveries for i in d.run.ids})
        if not named:
            return [d.run for d in deliveries], []
        succeeded: list[Run] = []
        failed: list[Delivery] = []
        for delivery in deliveries:
            run = delivery.run
            good: list[int] = []
            bad: list[int] = []
            for index, event_id in enumerate(run.ids):
                (bad if event_id in named else good).append(index)
            if not bad:
                succeeded.append(run)
                continue
            if good:
                succeeded.append(run.select(good))
            failed.append(delivery if len(bad) == len(run) else delivery.part(run.select(bad)))
        return succeeded, failed

    async def _pause(self, delay: float) -> bool:
        """Wait ``delay`` before a retry; False when the daemon starts draining meanwhile."""
        with anyio.move_on_after(delay):
            await self.draining.wait()
        return not self.draining.is_set()

    async def _invoke(self, runs: list[Run], attempt: int) -> tuple[Result | None, str | None, Fault, str]:
        """Run one invocation; returns (result, error, what kind of executor error, invocation id)."""
        ids = list(itertools.chain.from_iterable(run.ids for run in runs))
        if self.telemetry is None:
            return await self._invoke_traced(runs, ids, attempt, new_id(), None)
        invocation_id = new_id()
        source = self.config.source.kind  # type: ignore[attr-defined]
        with self.telemetry.invocation(self.trigger, source, self.function_name, invocation_id, attempt, runs,
                                       len(ids)) as span:
            if attempt == 1:  # (a retry's wait is its backoff, not the buffer)
                self.telemetry.phases([("wait in the buffer", min(run.received for run in runs), time.time())])
            outcome = await self._invoke_traced(runs, ids, attempt, invocation_id, span)
            result, error = outcome[0], outcome[1]
            self.telemetry.ended(span, result is not None and result.ok, error, result.exit_code if result else None)
            return outcome

    async def _invoke_traced(self, runs: list[Run], ids: list[str], attempt: int, invocation_id: str, span: Any,
                             ) -> tuple[Result | None, str | None, Fault, str]:
        queued = time.time()
        count = len(ids)
        trace = traceparent_of(span) if span is not None else next((run.trace for run in runs if run.trace), None)
        record = insert_invocation(InvocationRecord(invocation_id, self.trigger, self.function_name, "queued", attempt,
                                                    count, ids, None, None, queued, None, None, None,
                                                    self.replica, trace=trace))
        # Without a free slot the record is stored now, visible as queued while it waits; with one, it is
        # stored in one transaction with the start (or the finish) below: one transaction less per batch.
        pending: tuple[Write, ...] = (record,)
        if not self.limiter.available_tokens:
            await self.durably(record)
            pending = ()
        self.metrics.batch_size.labels(self.trigger).observe(count)
        result: Result | None = None
        error: str | None = None
        fault: Fault = ""
        try:
            args = render_args(self.function.args, runs[0].event(0)) if self.function.templated else list(self.function.args)
        except KeyError as exc:
            error, fault = f"cannot fill the function's args: event has no field {exc.args[0]!r}", "permanent"
        if error is None:
            invocation = Invocation(
                id=invocation_id, trigger=self.trigger, function_name=self.function_name, function=self.function,
                input=input_document(self.trigger, self.function_name, invocation_id, attempt, runs),
                env={"EVENTSWARM_TRIGGER": self.trigger, "EVENTSWARM_FUNCTION": self.function_name,
                     "EVENTSWARM_BATCH_ID": invocation_id, "EVENTSWARM_ATTEMPT": str(attempt),
                     "EVENTSWARM_EVENT_COUNT": str(count),
                     **({"TRACEPARENT": trace} if trace else {})},
                args=args, owner=self.owner,
            )
            waiting = self.telemetry.phase("wait for a slot") if self.telemetry is not None and span is not None \
                else contextlib.nullcontext()
            with waiting:
                await self.limiter.acquire()
            try:
                await self.durably(*pending, start_invocation(invocation_id, time.time()))
                pending = ()
                self.metrics.running(self.trigger, 1)
                try:
                    result = await self.executor.run(invocation)
                    if self.telemetry is not None and span is not None:
                        self.telemetry.phases(result.phases)
                except ExecutorError as exc:
                    error = str(exc)
                    fault = "unavailable" if exc.unavailable else ("" if exc.temporary else "permanent")
                finally:
                    self.metrics.running(self.trigger, -1)
            finally:
                self.limiter.release()
        status = "succeeded" if result is not None and result.ok else ("timed_out" if result and result.timed_out else "failed")
        if result is not None:
            self.metrics.invocation_seconds.labels(self.trigger).observe(result.duration)
            status, error = outcome_of(result, self.function.timeout)
        self.metrics.batches.labels(self.trigger, status).inc()
        if status != "succeeded":
            self.last_error = error
            self.last_error_at, self.last_error_invocation = time.time(), invocation_id
            log.warning("invocation %s of trigger %s failed (attempt %d, %d events): %s",
                        invocation_id, self.trigger, attempt, count, error,
                        extra=fields(f"invocation failed: {error}", trigger=self.trigger, invocation_id=invocation_id,
                                     events=count, attempt=attempt, **trace_ids(trace)))
        with anyio.CancelScope(shield=True):
            await self.durably(*pending, finish_invocation(
                invocation_id, status=status, exit_code=result.exit_code if result else None, error=error,
                finished_at=time.time(), executor_ref=result.ref if result else None,
                stdout=result.stdout if result else b"", stderr=result.stderr if result else (error or "").encode(),
                replica=self.replica, node=result.node if result else None))
        return result, error, fault, invocation_id

    async def durably(self, *writes: Write) -> None:
        """Commit ``writes``; while the state store fails (a full disk), wait and try again.

        The batch waits meanwhile, so its trigger's buffer fills and its source pauses: nothing is
        lost, and everything resumes once the store works.
        """
        await self._until_stored(lambda: self.state.write(*writes))

    async def _until_stored(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` until it does not raise ``StoreError``, waiting longer each time up to ``STORE_RETRY``'s
        cap; a daemon that starts draining meanwhile hands the batch back (``HandedBack``)."""
        delay = STORE_RETRY[0]
        while True:
            try:
                await step()
                return
            except StoreError as exc:
                self.last_error = str(exc)
                if self.draining.is_set():
                    raise HandedBack from None
            with anyio.move_on_after(delay):
                await self.draining.wait()
            delay = min(delay * 2, STORE_RETRY[1])

    async def _exhaust(self, delivery: Delivery) -> None:
        policy = self.config.on_exhausted
        run, tries = delivery.run, len(delivery.attempts)
        what = f"event {run.ids[0]}" if len(run) == 1 else f"{len(run)} events (from {run.ids[0]})"
        if policy == "stop":
            raise TriggerStopped(f"trigger {self.trigger!r} stopped: {what} failed {tries} times "
                                 f"(on_exhausted = \"stop\")")
        final = delivery.attempts[-1]
        last = final.invocation_id
        why = final.error or (f"exit code {final.exit_code}" if final.exit_code is not None else None)
        span = None if self.telemetry is None else self.telemetry.gave_up(
            self.trigger, run, "dropped" if policy == "drop" else "dead-lettered", why, tries, last)
        if policy == "drop":
            self.metrics.events_dropped.labels(self.trigger, "exhausted").inc(len(run))
            log.warning("%s of trigger %s dropped after %d attempts", what, self.trigger, tries,
                        extra=fields(f"dropped after {tries} attempts", trigger=self.trigger, invocation_id=last,
                                     events=len(run), first_event=run.ids[0], **ids_of(span)))
            await self.ack(run, Outcome("dropped", last, exit_code=final.exit_code, error=why))
            return
        attempts = [asdict(a) for a in delivery.attempts]
        letters = [DeadLetter(new_id(), self.trigger, event.to_dict(), attempts, time.time()) for event in run.events()]
        await self.durably(*map(insert_dead_letter, letters))  # one transaction
        self.metrics.dead_letters.labels(self.trigger).inc(len(letters))
        log.warning("%s of trigger %s stored as dead letter%s %s after %d attempts", what, self.trigger,
                    "s" if len(letters) > 1 else "", ", ".join(letter.id for letter in letters[:3]) +
                    (", …" if len(letters) > 3 else ""), tries,
                    extra=fields(f"stored as dead letters after {tries} attempts", trigger=self.trigger,
                                 invocation_id=last, events=len(run), first_event=run.ids[0],
                                 dead_letters=[letter.id for letter in letters[:10]], **ids_of(span)))
        await self.ack(run, Outcome("dead-lettered", last, exit_code=final.exit_code, error=why))

    async def ack_all(self, runs: list[Run], outcome: Outcome) -> None:
        """Acknowledge ``runs``, committing what their acknowledgements write (the webhook inbox deletes each
        of its events) in one transaction after them, instead of one commit after another.

        Those writes are about events already settled: should the daemon crash before they are stored,
        the events run again after the restart (at least once).
        """
        if len(runs) == 1:
            await self.ack(runs[0], outcome)
            return
        with self.state.collecting() as writes:
            for run in runs:
                await self.ack(run, outcome)
        if writes:
            await self.durably(*writes)

    async def ack(self, run: Run, outcome: Outcome) -> None:
        """Count ``run`` as acknowledged and hand ``outcome`` to its source.

        An acknowledgement that needs the state store (the webhook inbox) is tried again while the
        store fails, as ``durably`` does; if the daemon stops meanwhile, the events stay unacknowledged
        and run again after the restart. Any other error fails the source (``ack_failed``): it
        restarts, and the events it could not acknowledge come again from their origin.
        """
        self.metrics.acked(self.trigger, len(run))
        self._latency.observe(time.time() - run.received)
        ack = run.ack
        if ack is None:
            return
        try:
            await self._until_stored(lambda: ack(run, outcome))
        except HandedBack:
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
            log.error("acknowledging %d events of trigger %s (from %s) failed: %s", len(run), self.trigger,
                      run.ids[0], reason, exc_info=not isinstance(exc, SourceError),
                      extra=fields(f"acknowledging events failed: {reason}", trigger=self.trigger, events=len(run),
                                   first_event=run.ids[0]))
            self.ack_failed(f"acknowledging events failed: {reason}")


def outcome_of(result: Result, timeout: float) -> tuple[str, str | None]:
    """An invocation's status and error from what its executor gave back."""
    if result.ok:
        return "succeeded", None
    if result.timed_out:
        return "timed_out", f"timed out after {timeout:g}s"
    if result.oom_killed:
        return "failed", "killed: out of memory"
    code = f"exit code {result.exit_code}" if result.exit_code is not None else "no exit code"
    return "failed", f"{code}: {'; '.join(result.notes)}" if result.notes else code

