"""Replicas: several daemons sharing one state store (PostgreSQL), each with its share of the work.

Each replica has an id (``daemon.replica``; by default its host name and listen port) and an incarnation, new at
every start. It holds a row in ``replicas`` and beats in it every ``replica_timeout / 5``. Its id is held by a lock
(on PostgreSQL a session advisory lock, gone with its connection however the process ended), so that two daemons
cannot be the same replica, and a replica that restarts takes up its own work at once.

A replica is dead when its heartbeat is older than ``replica_timeout``, or when it stopped, or (PostgreSQL) when the
lock of its id is free: its process is gone. (On SQLite, one daemon per file: any other row is a name this daemon
had before, and dead.) The first live replica to see it takes it over (``bury``, one winner:
the row is deleted): its unfinished invocations are marked interrupted, the Swarm jobs it was running are adopted
(followed to their end; a job that succeeded settles its webhook events, whose inbox rows the adopter holds meanwhile),
then what is left of its containers and jobs is removed, its leases are freed, and its other inbox rows, which no
replica holds any more, are claimed by the others' webhook triggers. What it had in flight and did not finish comes
again from its sources (the inbox, Kafka's committed offsets, a file source's claims, a chain's checkpoint): at least
once.

A source that must have one reader (a file folder, a chain) runs only on the holder of its lease: a row with an
expiry and a fencing token, renewed with the heartbeat. Every checkpoint write of that source runs in a transaction
that first checks its token and expiry (``fenced``): a holder paused past its lease, whose source another replica
now reads, writes nothing when it resumes. ``lease_terms`` keeps each term's writes, so that one reader at a time
can be shown.

Times are the database's clock (``now``), so that replicas on hosts whose clocks differ agree on expiries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dispatcher.errors import SourceError
from dispatcher.schema import Conn, Write
from dispatcher.state import StateStore
from dispatcher.store import event_ids_of

log = logging.getLogger("eventswarm")

LEASE_PREFIX = "trigger/"


def now_sql(postgres: bool) -> str:
    """The database's clock in seconds since the epoch, as SQL."""
    if postgres:
        return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    return "((julianday('now') - 2440587.5) * 86400.0)"


def default_id(port: int) -> str:
    """A replica's id when the config gives none: the host name (on Swarm, the task's container) and the port."""
    return f"{socket.gethostname()}:{port}" if port else f"{socket.gethostname()}:pid{os.getpid()}"


def lock_key(replica: str) -> int:
    """The advisory lock key of a replica id (a signed 64-bit integer)."""
    return int.from_bytes(hashlib.sha256(f"eventswarm replica {replica}".encode()).digest()[:8], "big", signed=True)


class LeaseLost(SourceError):
    """A fenced write was refused: this replica no longer holds the source's lease (temporary: the source stops,
    and runs again here once it holds the lease again)."""


@dataclass(frozen=True, slots=True)
class Unfinished:
    """An invocation a replica that is gone left queued or running."""

    id: str
    trigger: str
    function: str
    event_ids: list[str]
    status: str
    trace: str | None = None
    """Its trace (``InvocationRecord.trace``)."""


@dataclass(frozen=True, slots=True)
class Me:
    id: str
    incarnation: str
    owner: str
    address: str


class Membership:
    """This replica among the others: its row and heartbeat, the leases it holds, the takeover of dead ones."""

    def __init__(self, state: StateStore, replica: str, owner: str, address: str, timeout: float) -> None:
        self.state = state
        self.me = Me(replica, uuid.uuid4().hex[:12], owner, address)
        self.timeout = timeout
        self.postgres = state.store.postgres
        self.now = now_sql(self.postgres)
        self.leases: dict[str, int] = {}
        """Leases held: name -> fencing token."""
        state.replica = replica

    @property
    def every(self) -> float:
        """Seconds between two heartbeats."""
        return max(self.timeout / 5, 0.2)

    async def join(self) -> None:
        me = self.me

        def write(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO replicas (id, incarnation, owner, host, pid, address, started_at, heartbeat_at, stopped_at) "
                f"VALUES (?, ?, ?, ?, ?, ?, {self.now}, {self.now}, NULL) ON CONFLICT (id) DO UPDATE SET "
                "incarnation = excluded.incarnation, owner = excluded.owner, host = excluded.host, pid = excluded.pid, "
                "address = excluded.address, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
                "stopped_at = NULL",
                (me.id, me.incarnation, me.owner, socket.gethostname(), os.getpid(), me.address))

        await self.state.write(write)

    async def beat(self) -> tuple[bool, dict[str, int]]:
        """The heartbeat, with the leases renewed: whether this replica is still one (not taken over by another
        after a pause), and the leases it still holds (those missing were lost: past their expiry)."""
        me = self.me
        alive: list[Any] = []
        held: list[Any] = []

        def write(conn: Conn) -> None:
            alive.extend(conn.execute(f"UPDATE replicas SET heartbeat_at = {self.now} WHERE id = ? AND incarnation = ? "
                                      "RETURNING id", (me.id, me.incarnation)).fetchall())
            if alive and self.leases:
                held.extend(conn.execute(
                    f"UPDATE leases SET expires_at = {self.now} + ? WHERE holder = ? AND incarnation = ? AND "
                    f"expires_at > {self.now} RETURNING name, token", (self.timeout, me.id, me.incarnation)).fetchall())

        await self.state.write(write)
        still = {name: token for name, token in held if self.leases.get(name) == token}
        return bool(alive), still

    async def dead(self) -> list[tuple[str, str, str]]:
        """Other replicas that are gone: (id, incarnation, owner)."""
        me = self.me

        def read(store: Any) -> list[tuple[str, str, str, bool]]:
            rows = store.conn.execute(
                f"SELECT id, incarnation, owner, CASE WHEN stopped_at IS NOT NULL OR heartbeat_at < {self.now} - ? "
                "THEN 1 ELSE 0 END FROM replicas WHERE id <> ?", (self.timeout, me.id)).fetchall()
            found = []
            for replica, incarnation, owner, stale in rows:
                if not self.postgres:
                    stale = 1  # (one daemon per SQLite file, by its lock: another row is a name this one had before)
                elif not stale:  # its process is gone when the lock of its id is free
                    key = lock_key(replica)
                    if store.conn.execute("SELECT pg_try_advisory_lock(?)", (key,)).fetchone()[0]:
                        store.conn.execute("SELECT pg_advisory_unlock(?)", (key,))
                        stale = 1
                found.append((replica, incarnation, owner, bool(stale)))
            return found

        return [(r, i, o) for r, i, o, stale in await self.state.read(read) if stale]

    async def bury(self, replica: str, incarnation: str, abandon: Callable[[Sequence[str]], Write]
                   ) -> list[Unfinished] | None:
        """Take over the dead ``replica``: its row goes (whoever deletes it is the one to take it over; None for the
        others), its unfinished invocations are marked interrupted (``abandon``), its leases are freed. Returns those
        invocations; the inbox rows of the events of those that were running are held by this replica, for their
        jobs to be adopted (``settle_adopted``), while its other rows are left for any replica to claim."""
        won: list[Any] = []
        unfinished: list[Unfinished] = []

        def write(conn: Conn) -> None:
            won.extend(conn.execute("DELETE FROM replicas WHERE id = ? AND incarnation = ? RETURNING id",
                                    (replica, incarnation)).fetchall())
            if not won:
                return
            unfinished.extend(Unfinished(i, t, f, event_ids_of(e, p), s, r) for i, t, f, e, p, s, r in conn.execute(
                "SELECT id, trigger, function, event_ids, ids, status, trace FROM invocations WHERE replica = ? AND status IN "
                "('queued', 'running') ORDER BY queued_at", (replica,)).fetchall())
            abandon([replica])(conn)
            conn.execute("UPDATE leases SET expires_at = 0 WHERE holder = ? AND incarnation = ?",
                         (replica, incarnation))
            held = [(self.me.id, event, replica) for u in unfinished if u.status == "running" for event in u.event_ids]
            if held:
                conn.executemany("UPDATE inbox SET replica = ? WHERE event_id = ? AND replica = ?", held)

        await self.state.alone(write)
        return unfinished if won else None

    async def settle_adopted(self, events: Sequence[str], settled: bool) -> None:
        """The events of an adopted job whose inbox rows this replica holds: removed when the job succeeded (they
        ran), else let go (any replica claims them, and they run again)."""
        me = self.me.id

        def write(conn: Conn) -> None:
            if settled:
                conn.executemany("DELETE FROM inbox WHERE event_id = ? AND replica = ?", [(e, me) for e in events])
            else:
                conn.executemany("UPDATE inbox SET replica = '' WHERE event_id = ? AND replica = ?",
                                 [(e, me) for e in events])

        await self.state.write(write)

    async def present(self, replica: str) -> bool:
        """Whether ``replica`` has a row (it is back, under a new incarnation, after it was taken over)."""
        return bool(await self.state.read(lambda s: s.conn.execute("SELECT 1 FROM replicas WHERE id = ?",
                                                                   (replica,)).fetchall()))

    async def leave(self) -> None:
        """At a clean stop: the row says stopped (the others take over what is left at once), the leases are freed."""
        me = self.me

        def write(conn: Conn) -> None:
            conn.execute(f"UPDATE replicas SET stopped_at = {self.now} WHERE id = ? AND incarnation = ?",
                         (me.id, me.incarnation))
            conn.execute("UPDATE leases SET expires_at = 0 WHERE holder = ? AND incarnation = ?",
                         (me.id, me.incarnation))

        await self.state.alone(write)
        self.leases.clear()

    # -- leases -----------------------------------------------------------------------------

    async def acquire(self, name: str) -> int | None:
        """Take the lease ``name`` if it is free (expired, or this replica's): its new fencing token, or None."""
        me = self.me
        got: list[Any] = []

        def write(conn: Conn) -> None:
            got.extend(conn.execute(
                f"INSERT INTO leases (name, holder, incarnation, token, expires_at) VALUES (?, ?, ?, 1, {self.now} + ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, incarnation = excluded.incarnation, "
                "token = leases.token + 1, expires_at = excluded.expires_at "
                f"WHERE leases.expires_at < {self.now} OR leases.holder = excluded.holder RETURNING token",
                (name, me.id, me.incarnation, self.timeout)).fetchall())
            if got:
                conn.execute("INSERT INTO lease_terms (name, token, holder, incarnation, acquired_at) "
                             f"VALUES (?, ?, ?, ?, {self.now})", (name, got[0][0], me.id, me.incarnation))
                conn.execute("DELETE FROM lease_terms WHERE name = ? AND token < ?", (name, got[0][0] - TERMS_KEPT))

        await self.state.alone(write)
        if not got:
            return None
        self.leases[name] = int(got[0][0])
        return self.leases[name]

    async def release(self, name: str) -> None:
        token = self.leases.pop(name, None)
        if token is None:
            return

        def write(conn: Conn) -> None:
            conn.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND token = ?", (name, token))

        await self.state.alone(write)

    async def holder(self, name: str) -> str | None:
        """Who holds the lease ``name`` now (None: nobody)."""
        row = await self.state.read(lambda s: s.conn.execute(
            f"SELECT holder FROM leases WHERE name = ? AND expires_at > {self.now}", (name,)).fetchone())
        return row[0] if row else None

    def fenced(self, name: str, token: int, writes: Sequence[Write], refused: list[bool]) -> Write:
        """``writes``, made only if this replica still holds the lease ``name`` under ``token`` at the commit (the
        lease row stays locked until then); else nothing is written and ``refused`` gets True."""
        def write(conn: Conn) -> None:
            if not conn.execute(f"UPDATE leases SET token = token WHERE name = ? AND token = ? AND expires_at > {self.now} "
                                "RETURNING token", (name, token)).fetchall():
                conn.execute("UPDATE lease_terms SET refused = refused + 1 WHERE name = ? AND token = ?", (name, token))
                refused.append(True)
                return
            conn.execute(f"UPDATE lease_terms SET writes = writes + 1, first_write = COALESCE(first_write, {self.now}), "
                         f"last_write = {self.now} WHERE name = ? AND token = ?", (name, token))
            for each in writes:
                each(conn)
        return write

    # -- status -----------------------------------------------------------------------------

    async def report(self) -> list[dict[str, Any]]:
        """Every replica: its id, host, address, heartbeat age, state and the leases it holds."""
        def read(store: Any) -> tuple[list[Any], list[Any]]:
            replicas = store.conn.execute(
                f"SELECT id, incarnation, host, pid, address, started_at, {self.now} - heartbeat_at, stopped_at "
                "FROM replicas ORDER BY id").fetchall()
            leases = store.conn.execute(f"SELECT name, holder, incarnation, token, expires_at - {self.now} FROM leases "
                                        f"WHERE expires_at > {self.now} ORDER BY name").fetchall()
            return replicas, leases

        replicas, leases = await self.state.read(read)
        out = []
        for replica, incarnation, host, pid, address, started, age, stopped in replicas:
            state = "stopped" if stopped is not None else ("stale" if age > self.timeout else "live")
            out.append({
                "id": replica, "incarnation": incarnation, "host": host, "pid": pid, "address": address,
                "started_at": started, "heartbeat_age": round(max(age, 0.0), 3), "state": state,
                "me": replica == self.me.id and incarnation == self.me.incarnation,
                "leases": [{"name": name, "token": token, "expires_in": round(left, 3)}
                           for name, holder, inc, token, left in leases if holder == replica and inc == incarnation],
            })
        return out


TERMS_KEPT = 1000
"""Lease terms kept per lease (older ones are deleted as new ones begin)."""
