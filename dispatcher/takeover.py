"""Replicas that share a PostgreSQL state store: this one's heartbeat (which renews its sources' leases), and the
takeover of one that is gone: its unfinished invocations abandoned, the jobs it left running adopted (followed to
their end, or their result taken) and what it left on the engine removed. ``docs/replicas.md`` tells the rules."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import anyio
from anyio.abc import TaskGroup

from dispatcher.config import FunctionConfig
from dispatcher.dispatch import outcome_of
from dispatcher.errors import ExecutorError, StoreError
from dispatcher.events import trace_ids
from dispatcher.executors import Executor, Invocation, Result
from dispatcher.logs import fields
from dispatcher.replicas import LEASE_PREFIX, Membership, Unfinished
from dispatcher.state import StateStore
from dispatcher.store import abandon_unfinished, finish_invocation

log = logging.getLogger("eventswarm")


class Takeover:
    """Runs this replica's heartbeat and takes over the replicas that are gone."""

    def __init__(self, membership: Membership, state: StateStore, executor: Executor, *, owner: str,
                 functions: Callable[[], Mapping[str, FunctionConfig]], lease_lost: Callable[[str], None]) -> None:
        self.membership = membership
        self.state = state
        self.executor = executor
        self.replica = membership.me.id
        self.owner = owner
        self.functions = functions
        """The functions of the config running now (a reload may change them)."""
        self.lease_lost = lease_lost
        """Called with a trigger's name when the heartbeat could not renew its source's lease."""
        self.failure: str | None = None
        """Why this replica must stop: another one took it over."""
        self._taking_over: set[str] = set()
        """Replicas this one is taking over now (each in a task of its own)."""

    async def run(self) -> None:
        """Beat (and renew the leases held); take over replicas that are gone. Return when this one was taken over
        itself (``failure`` says why)."""
        async with anyio.create_task_group() as tg:
            await self._beat(tg)
            tg.cancel_scope.cancel()

    async def _beat(self, tg: TaskGroup) -> None:
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
                    return
                for name in [n for n in membership.leases if n not in held]:
                    self.lease_lost(name.removeprefix(LEASE_PREFIX))
                for replica, incarnation, owner in await membership.dead():
                    if replica not in self._taking_over:
                        # (in a task of its own: removing its jobs can take seconds, and beats must go on meanwhile)
                        self._taking_over.add(replica)
                        tg.start_soon(self._take_over, replica, incarnation, owner)
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
        function = self.functions().get(unfinished.function)
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
                    stdout=result.stdout, stderr=result.stderr, replica=self.state.replica, node=result.node))
                log.info("adopted invocation %s of replica %s (%d events): %s", unfinished.id, replica,
                         len(unfinished.event_ids), status,
                         extra=fields(f"adopted an invocation of replica {replica}: {status}", trigger=unfinished.trigger,
                                      invocation_id=unfinished.id, events=len(unfinished.event_ids),
                                      **trace_ids(unfinished.trace)))
            await self.membership.settle_adopted(unfinished.event_ids, result is not None and result.ok)
        except StoreError:
            return  # (the rows stay held by this replica: they run after its restart, or where it is taken over)
        self.state.orphans()
