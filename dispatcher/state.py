"""The daemon's access to the state database: reads in a worker thread, writes group-committed (every write waiting
at the same time goes into one transaction, so a burst of events costs one commit, not one each), and the inbox of
the sources that must keep accepted events across a crash (webhooks)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import anyio

from dispatcher.errors import StoreError
from dispatcher.events import Event
from dispatcher.schema import Conn, Write
from dispatcher.store import Database, put_checkpoints

log = logging.getLogger("eventswarm.store")

T = TypeVar("T")


_COLLECTING: contextvars.ContextVar[list[Write] | None] = contextvars.ContextVar("eventswarm_collecting", default=None)


class _Group:
    """The writes of one group commit, and how their transaction ended (for every writer in it)."""

    __slots__ = ("done", "error", "led", "writes")

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.led = False
        self.done = anyio.Event()
        self.error: StoreError | None = None


class StateStore:
    """The daemon's async access to ``Database``: reads in a worker thread, writes group-committed.

    Group commit: writers add their writes to the open group. The first writer of a group leads it:
    it waits for the commit lock (the previous group's transaction), takes the group (opening a new
    one for later writers) and commits it in one transaction; the others wait for that, and return,
    or raise the same error: a write is reported stored only if the transaction that held it
    committed. The leader is shielded from cancellation, so that a group always ends.

    ``error`` says why the store failed last, until a transaction succeeds again (``/readyz``).
    """

    def __init__(self, store: Database) -> None:
        self.store = store
        self.error: str | None = None
        self.replica = ""
        """The replica this daemon is (its id): the inbox rows it stores are its own (``replicas``)."""
        self._orphans = anyio.Event()
        self._thread = anyio.CapacityLimiter(1)
        self._commit_lock = anyio.Lock()
        self._open = _Group()

    async def read(self, fn: Callable[[Database], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, self.store, limiter=self._thread)
        except self.store.errors as exc:
            raise self._failed(exc) from None

    @contextlib.contextmanager
    def collecting(self) -> Iterator[list[Write]]:
        """Within it, ``write`` only collects its writes in the list given, for the caller to commit them all
        at once (``Dispatcher.ack_all``: a thousand acknowledgements, one transaction instead of a thousand)."""
        writes: list[Write] = []
        token = _COLLECTING.set(writes)
        try:
            yield writes
        finally:
            _COLLECTING.reset(token)

    async def write(self, *writes: Write) -> None:
        """Run ``writes`` in a transaction shared with every write waiting at the same time; return once committed.

        Raises ``StoreError`` when that transaction failed: then none of its writes is stored.
        """
        collected = _COLLECTING.get()
        if collected is not None:
            collected.extend(writes)
            return
        group = self._open
        group.writes.extend(writes)
        if group.led:
            await group.done.wait()
        else:
            group.led = True
            with anyio.CancelScope(shield=True):
                async with self._commit_lock:
                    self._open = _Group()
                    try:
                        await anyio.to_thread.run_sync(self.store.transaction, group.writes, limiter=self._thread)
                    except self.store.errors as exc:
                        group.error = self._failed(exc)
                    else:
                        if self.error is not None:
                            log.warning("the state store works again")
                            self.error = None
                    finally:
                        group.done.set()
        if group.error is not None:
            raise group.error

    async def alone(self, write: Write) -> None:
        """Run ``write`` in a transaction of its own, not in a group commit (a lease taken or given up: it locks one
        lease row and nothing else, so that replicas taking leases at once never wait on each other in a cycle)."""
        async with self._commit_lock:
            try:
                await anyio.to_thread.run_sync(self.store.transaction, [write], limiter=self._thread)
            except self.store.errors as exc:
                raise self._failed(exc) from None

    async def probe(self) -> str | None:
        """``error``, after a small write has tried whether the store works again (an idle daemon writes nothing)."""
        if self.error is not None:
            with contextlib.suppress(StoreError):
                await self.write(put_checkpoints("", {"store-probe": str(time.time())}))
        return self.error

    def _failed(self, exc: BaseException) -> StoreError:
        message = f"the state store failed: {self.store.describe(exc)}"
        if message != self.error:
            log.error("%s", message)  # once per kind of failure, not once per write
            self.error = message
        return StoreError(message)

    # -- the inbox, for sources that must keep accepted events across a crash ---------------

    async def inbox_put(self, trigger: str, event: Event, dedupe_key: str | None) -> str | None:
        """Store ``event`` durably; with a ``dedupe_key`` already seen, store nothing and return the earlier id."""
        encoded = event.encode()
        earlier: list[str] = []

        def write(conn: Conn) -> None:
            if dedupe_key is not None:
                row = conn.execute("SELECT event_id FROM dedupe WHERE trigger = ? AND key = ?", (trigger, dedupe_key)).fetchone()
                if row is not None:
                    earlier.append(row[0])
                    return
                conn.execute("INSERT INTO dedupe (trigger, key, event_id, seen_at) VALUES (?,?,?,?)",
                             (trigger, dedupe_key, event.id, event.received))
            conn.execute("INSERT INTO inbox (trigger, event_id, event, received_at, replica) VALUES (?,?,?,?,?) "
                         "ON CONFLICT DO NOTHING",
                         (trigger, event.id, encoded, event.received, self.replica))

        await self.write(write)
        return earlier[0] if earlier else None

    async def inbox_remove(self, trigger: str, event_id: str, *, forget_dedupe: bool = False) -> None:
        """Remove an event settled here (a row another replica claimed meanwhile stays: it runs there)."""
        def write(conn: Conn) -> None:
            conn.execute("DELETE FROM inbox WHERE event_id = ? AND replica = ?", (event_id, self.replica))
            if forget_dedupe:
                conn.execute("DELETE FROM dedupe WHERE trigger = ? AND event_id = ?", (trigger, event_id))

        await self.write(write)

    async def inbox_pending(self, trigger: str, page: int = 500) -> AsyncIterator[Event]:
        """Events this replica stored for ``trigger`` before this call, oldest first, read a page at a time."""
        upto = await self.read(lambda s: s.inbox_last())
        return self._inbox_pages(trigger, upto, page)

    async def _inbox_pages(self, trigger: str, upto: int, page: int) -> AsyncIterator[Event]:
        after = 0
        while True:
            rows = await self.read(lambda s, after=after: s.inbox_page(trigger, after, upto, page, self.replica))  # type: ignore[misc]
            if not rows:
                return
            for seq, raw, received in rows:
                after = seq
                yield Event.decode(bytes(raw), received=received)

    async def inbox_claim(self, trigger: str, page: int = 500) -> list[Event]:
        """Take over up to ``page`` of ``trigger``'s events stored by replicas that are gone (no row in ``replicas``:
        taken over, see ``replicas.Membership``), oldest first. Replicas claiming together each get other rows
        (PostgreSQL: ``FOR UPDATE SKIP LOCKED``)."""
        claimed: list[tuple[int, bytes, float]] = []
        skip = " FOR UPDATE SKIP LOCKED" if self.store.postgres else ""

        def write(conn: Conn) -> None:
            claimed.extend(tuple(row) for row in conn.execute(
                "UPDATE inbox SET replica = ? WHERE seq IN (SELECT seq FROM inbox WHERE trigger = ? AND replica NOT IN "
                f"(SELECT id FROM replicas) ORDER BY seq LIMIT ?{skip}) RETURNING seq, event, received_at",
                (self.replica, trigger, page)).fetchall())

        await self.write(write)
        return [Event.decode(bytes(raw), received=received) for _, raw, received in sorted(claimed)]

    async def orphaned(self) -> None:
        """Return when inbox rows may have lost their replica (one was taken over): time to ``inbox_claim``."""
        await self._orphans.wait()

    def orphans(self) -> None:
        """Wake ``orphaned`` (after a replica was taken over)."""
        self._orphans.set()
        self._orphans = anyio.Event()
