"""The state store (SQLite, WAL): invocation records and logs, dead letters, checkpoints, the webhook inbox.

``Store`` is the synchronous core the CLI reads with. ``StateStore`` is the daemon's async face:
reads run in a worker thread, writes are group-committed (every write waiting at the same time
goes into one transaction), so a burst of events costs one commit, not one each.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import msgspec

from dispatcher.errors import StoreError
from dispatcher.events import Event

log = logging.getLogger("eventswarm.store")

T = TypeVar("T")


class Conn(Protocol):
    """What a write runs on: a ``sqlite3.Connection``, or ``postgres.Connection`` (the same manner, ``?``
    placeholders; the SQL is the subset both databases speak)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...


Write = Callable[[Conn], None]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str) -> bool:
    return location.startswith(POSTGRES_SCHEMES)

_MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE invocations (
        id TEXT PRIMARY KEY,
        trigger TEXT NOT NULL,
        function TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        batch_size INTEGER NOT NULL,
        event_ids TEXT NOT NULL,
        exit_code INTEGER,
        error TEXT,
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        executor_ref TEXT,
        stdout BLOB,
        stderr BLOB
    );
    CREATE INDEX invocations_by_time ON invocations (queued_at);
    CREATE INDEX invocations_by_trigger ON invocations (trigger, queued_at);
    CREATE TABLE dead_letters (
        id TEXT PRIMARY KEY,
        trigger TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event TEXT NOT NULL,
        attempts TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX dead_letters_by_trigger ON dead_letters (trigger, created_at);
    CREATE TABLE checkpoints (
        trigger TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (trigger, key)
    );
    CREATE TABLE inbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        trigger TEXT NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        event BLOB NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX inbox_by_trigger ON inbox (trigger, seq);
    CREATE TABLE dedupe (
        trigger TEXT NOT NULL,
        key TEXT NOT NULL,
        event_id TEXT NOT NULL,
        seen_at REAL NOT NULL,
        PRIMARY KEY (trigger, key)
    );
    """,
    # 2: replicas sharing one store (PostgreSQL): who runs, the leases of single-reader sources (with a history of
    # their terms, to show that one replica at a time wrote), and which replica holds an invocation or an inbox row
    """
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        incarnation TEXT NOT NULL,
        owner TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        address TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        stopped_at REAL
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        incarnation TEXT NOT NULL,
        token INTEGER NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE lease_terms (
        name TEXT NOT NULL,
        token INTEGER NOT NULL,
        holder TEXT NOT NULL,
        incarnation TEXT NOT NULL,
        acquired_at REAL NOT NULL,
        first_write REAL,
        last_write REAL,
        writes INTEGER NOT NULL DEFAULT 0,
        refused INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, token)
    );
    ALTER TABLE invocations ADD COLUMN replica TEXT NOT NULL DEFAULT '';
    CREATE INDEX invocations_by_replica ON invocations (replica, status);
    ALTER TABLE inbox ADD COLUMN replica TEXT NOT NULL DEFAULT '';
    CREATE INDEX inbox_by_replica ON inbox (replica, trigger, seq);
    """,
]


@dataclass(frozen=True, slots=True)
class InvocationRecord:
    id: str
    trigger: str
    function: str
    status: str
    attempt: int
    batch_size: int
    event_ids: list[str]
    exit_code: int | None
    error: str | None
    queued_at: float
    started_at: float | None
    finished_at: float | None
    executor_ref: str | None
    replica: str = ""
    """The replica that ran it (its id; "" before replicas)."""

    def to_json(self) -> dict[str, Any]:
        doc = {k: getattr(self, k) for k in self.__slots__}
        for key in ("queued_at", "started_at", "finished_at"):
            doc[key] = _iso(doc[key])
        return doc


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    trigger: str
    event: dict[str, Any]
    attempts: list[dict[str, Any]]
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "trigger": self.trigger, "event": self.event, "attempts": self.attempts,
                "created_at": _iso(self.created_at)}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


_INVOCATION_COLUMNS = ("id, trigger, function, status, attempt, batch_size, event_ids, exit_code, error, "
                       "queued_at, started_at, finished_at, executor_ref, replica")
_REPLACE_INVOCATION = ", ".join(f"{c} = excluded.{c}" for c in _INVOCATION_COLUMNS.split(", ")[1:]) + \
    ", stdout = NULL, stderr = NULL"
"""(An invocation written again replaces the row, as a new one: its logs too.)"""


def describe(exc: BaseException, path: str) -> str:
    """One line for a failed SQLite or file operation, with what the user can do about it."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in lowered or "not a database" in lowered):
        return f"{text}: the file is damaged; move it away to start with an empty one, or put back a copy"
    if "readonly" in lowered or "unable to open" in lowered or isinstance(exc, PermissionError):
        return f"{text} (can this user create and write files in {Path(path).parent}?)"
    if "full" in lowered or getattr(exc, "errno", None) == errno.ENOSPC:
        return f"{text} (the disk holding {Path(path).parent} is full)"
    return text


def _script(script: str) -> Write:
    def write(conn: Conn) -> None:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    return write


def _set_version(number: int) -> Write:
    def write(conn: Conn) -> None:
        conn.execute(f"PRAGMA user_version={number}")
    return write


def _invocation(row: tuple[Any, ...]) -> InvocationRecord:
    values = list(row)
    values[6] = json.loads(values[6])
    return InvocationRecord(*values)


WAL_SIZE_LIMIT = 8 * 1024 * 1024
"""After a checkpoint the write-ahead log is cut back to this size: a burst does not keep its disk space."""


class Store:
    """The state database, opened and migrated; synchronous. SQLite (a file path, or ``sqlite:///path``) or
    PostgreSQL (``postgresql://…``, the shared state of several replicas; ``password`` from the config's secret).

    Every commit is durable (SQLite: ``synchronous=FULL``; PostgreSQL: ``synchronous_commit`` as the server has
    it, on by default): a 202 or an acknowledgement that follows a commit survives a power loss or an OS crash,
    not only a crash of the daemon. ``check`` runs SQLite's ``PRAGMA quick_check`` first, so that the daemon
    refuses a damaged file at start instead of half running on it. Any failure to open is a permanent
    ``StoreError`` saying what to do.
    """

    def __init__(self, path: str, *, check: bool = False, password: str | None = None) -> None:
        self.path = path
        self.postgres = is_postgres(path)
        self.conn: Any
        if self.postgres:
            self._open_postgres(password)
            return
        self.errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
        self._begin = "BEGIN IMMEDIATE"
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            try:
                if check:
                    self._check()
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
                self.conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
                self.conn.execute("PRAGMA foreign_keys=ON")
                self._migrate()
            except BaseException:
                self.conn.close()
                raise
        except StoreError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the state store {path}: {describe(exc, path)}", temporary=False) from None

    def _open_postgres(self, password: str | None) -> None:
        from dispatcher import postgres

        self.errors = postgres.ERRORS
        self._begin = "BEGIN"
        try:
            self.conn = postgres.Connection(self.path, password)
            try:
                self.conn.migrate(_MIGRATIONS)
            except BaseException:
                self.conn.close()
                raise
        except postgres.ERRORS as exc:
            raise StoreError(f"cannot open the state store {postgres.redacted(self.path)}: {self.describe(exc)}",
                             temporary=False) from None

    def describe(self, exc: BaseException) -> str:
        """What went wrong, and what to do about it when that is known."""
        if not self.postgres:
            return describe(exc, self.path)
        text = " ".join(str(exc).split()) or type(exc).__name__  # (one line: the server's DETAIL comes on another)
        if isinstance(exc, (OSError, TimeoutError)):
            return f"{text} (is the PostgreSQL server up, and reachable from here?)"
        return text

    @property
    def where(self) -> str:
        """The store's location, for messages (without a password)."""
        if self.postgres:
            from dispatcher import postgres

            return postgres.redacted(self.path)
        return self.path

    def _check(self) -> None:
        rows = self.conn.execute("PRAGMA quick_check(5)").fetchall()
        if rows != [("ok",)]:
            found = "; ".join(" ".join(str(row[0]).split()) for row in rows)  # (one line: SQLite's may hold several)
            raise StoreError(f"the state store {self.path} is damaged ({found}): move it away to start with an empty one, "
                             "or put back a copy", temporary=False)

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            self.transaction([_script(script), _set_version(number)])

    def close(self) -> None:
        self.conn.close()

    def transaction(self, writes: Iterable[Write]) -> None:
        self.conn.execute(self._begin)
        try:
            for write in writes:
                write(self.conn)
            self.conn.execute("COMMIT")
        except BaseException:
            # SQLite has already rolled back after some errors (SQLITE_FULL): a ROLLBACK then would
            # fail with "no transaction is active" and hide the error that matters.
            if self.conn.in_transaction:
                with contextlib.suppress(*self.errors):
                    self.conn.execute("ROLLBACK")
            raise

    # -- invocations ------------------------------------------------------------------------

    def invocations(self, *, trigger: str | None = None, status: str | None = None, limit: int = 50,
                    since: float | None = None) -> list[InvocationRecord]:
        where: list[str] = []
        params: list[Any] = []
        if trigger:
            where.append("trigger = ?")
            params.append(trigger)
        if status:
            where.append("status = ?")
            params.append(status)
        if since is not None:
            where.append("queued_at >= ?")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.conn.execute(
            f"SELECT {_INVOCATION_COLUMNS} FROM invocations {clause} ORDER BY queued_at DESC, id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_invocation(row) for row in rows]

    def resolve(self, table: str, prefix: str) -> list[str]:
        """The ids in ``table`` (``invocations`` or ``dead_letters``) that are ``prefix`` or begin with it: the id
        itself when it is whole; at most two otherwise (two mean: ambiguous)."""
        assert table in ("invocations", "dead_letters")
        if not prefix:
            return []
        exact = self.conn.execute(f"SELECT id FROM {table} WHERE id = ?", (prefix,)).fetchone()
        if exact:
            return [exact[0]]
        rows = self.conn.execute(  # a range, not LIKE: no wildcard in an id can widen it
            f"SELECT id FROM {table} WHERE id > ? AND id < ? ORDER BY id LIMIT 2", (prefix, prefix + "\uffff"))
        return [row[0] for row in rows]

    def invocation(self, invocation_id: str) -> InvocationRecord | None:
        row = self.conn.execute(f"SELECT {_INVOCATION_COLUMNS} FROM invocations WHERE id = ?", (invocation_id,)).fetchone()
        return _invocation(row) if row else None

    def logs(self, invocation_id: str) -> tuple[bytes, bytes] | None:
        row = self.conn.execute("SELECT stdout, stderr FROM invocations WHERE id = ?", (invocation_id,)).fetchone()
        return (row[0] or b"", row[1] or b"") if row else None

    # -- dead letters -----------------------------------------------------------------------

    def dead_letters(self, *, trigger: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        clause, params = ("WHERE trigger = ?", (trigger,)) if trigger else ("", ())
        rows = self.conn.execute(
            f"SELECT id, trigger, event, attempts, created_at FROM dead_letters {clause} ORDER BY created_at, id LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [DeadLetter(r[0], r[1], json.loads(r[2]), json.loads(r[3]), r[4]) for r in rows]

    def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        row = self.conn.execute(
            "SELECT id, trigger, event, attempts, created_at FROM dead_letters WHERE id = ?", (dead_letter_id,)
        ).fetchone()
        return DeadLetter(row[0], row[1], json.loads(row[2]), json.loads(row[3]), row[4]) if row else None

    def remove_dead_letters(self, ids: Iterable[str] | None = None) -> int:
        if ids is None:
            return int(self.conn.execute("DELETE FROM dead_letters").rowcount)
        return sum(self.conn.execute("DELETE FROM dead_letters WHERE id = ?", (i,)).rowcount for i in ids)

    # -- checkpoints and inbox --------------------------------------------------------------

    def checkpoint(self, trigger: str, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM checkpoints WHERE trigger = ? AND key = ?", (trigger, key)).fetchone()
        return row[0] if row else None

    def checkpoints_of(self, trigger: str, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for at in range(0, len(keys), 500):
            chunk = keys[at:at + 500]
            found.update(self.conn.execute(
                f"SELECT key, value FROM checkpoints WHERE trigger = ? AND key IN ({','.join('?' * len(chunk))})",
                (trigger, *chunk)).fetchall())
        return found

    def checkpoints(self, trigger: str, prefix: str, limit: int) -> dict[str, str]:
        rows = self.conn.execute("SELECT key, value FROM checkpoints WHERE trigger = ? AND substr(key, 1, ?) = ? "
                                 "ORDER BY key LIMIT ?", (trigger, len(prefix), prefix, limit)).fetchall()
        return dict(rows)

    def inbox_page(self, trigger: str, after: int, upto: int, limit: int, replica: str = "") -> list[tuple[int, bytes, float]]:
        """Rows of ``trigger`` held by ``replica``, after ``after`` up to ``upto``, oldest first."""
        return [tuple(row) for row in self.conn.execute(
            "SELECT seq, event, received_at FROM inbox WHERE replica = ? AND trigger = ? AND seq > ? AND seq <= ? "
            "ORDER BY seq LIMIT ?",
            (replica, trigger, after, upto, limit),
        ).fetchall()]

    def inbox_last(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM inbox").fetchone()[0])

    def inbox_size(self, trigger: str) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM inbox WHERE trigger = ?", (trigger,)).fetchone()[0])



# -- writes, as closures the group commit runs in one transaction ----------------------------

def insert_invocation(record: InvocationRecord) -> Write:
    def write(conn: Conn) -> None:
        conn.execute(
            f"INSERT INTO invocations ({_INVOCATION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            f"ON CONFLICT (id) DO UPDATE SET {_REPLACE_INVOCATION}",
            (record.id, record.trigger, record.function, record.status, record.attempt, record.batch_size,
             msgspec.json.encode(record.event_ids).decode(), record.exit_code, record.error, record.queued_at, record.started_at,
             record.finished_at, record.executor_ref, record.replica),
        )
    return write


def start_invocation(invocation_id: str, started_at: float) -> Write:
    def write(conn: Conn) -> None:
        conn.execute("UPDATE invocations SET status = 'running', started_at = ? WHERE id = ?", (started_at, invocation_id))
    return write


def finish_invocation(invocation_id: str, *, status: str, exit_code: int | None, error: str | None,
                      finished_at: float, executor_ref: str | None, stdout: bytes, stderr: bytes) -> Write:
    def write(conn: Conn) -> None:
        conn.execute(
            "UPDATE invocations SET status = ?, exit_code = ?, error = ?, finished_at = ?, executor_ref = ?, "
            "stdout = ?, stderr = ? WHERE id = ?",
            (status, exit_code, error, finished_at, executor_ref, stdout, stderr, invocation_id),
        )
    return write


def insert_dead_letter(dead_letter: DeadLetter) -> Write:
    def write(conn: Conn) -> None:
        conn.execute(
            "INSERT INTO dead_letters (id, trigger, event_id, event, attempts, created_at) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT (id) DO UPDATE SET trigger = excluded.trigger, event_id = excluded.event_id, "
            "event = excluded.event, attempts = excluded.attempts, created_at = excluded.created_at",
            (dead_letter.id, dead_letter.trigger, dead_letter.event.get("id", ""), json.dumps(dead_letter.event),
             json.dumps(dead_letter.attempts), dead_letter.created_at),
        )
    return write


def remove_dead_letter(dead_letter_id: str) -> Write:
    def write(conn: Conn) -> None:
        conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
    return write


def put_checkpoints(trigger: str, values: Mapping[str, str]) -> Write:
    now = time.time()

    def write(conn: Conn) -> None:
        conn.executemany(
            "INSERT INTO checkpoints (trigger, key, value, updated_at) VALUES (?,?,?,?) "
            "ON CONFLICT (trigger, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            [(trigger, k, v, now) for k, v in values.items()],
        )
    return write


def delete_checkpoints(trigger: str, keys: list[str]) -> Write:
    def write(conn: Conn) -> None:
        conn.executemany("DELETE FROM checkpoints WHERE trigger = ? AND key = ?", [(trigger, k) for k in keys])
    return write


def forget_checkpoints(trigger: str, prefix: str, before: float) -> Write:
    """Delete the trigger's checkpoints whose key starts with ``prefix`` and that were saved before ``before``."""
    def write(conn: Conn) -> None:
        conn.execute("DELETE FROM checkpoints WHERE trigger = ? AND substr(key, 1, ?) = ? AND updated_at < ?",
                     (trigger, len(prefix), prefix, before))
    return write


def abandon_unfinished(finished_at: float, replicas: Sequence[str] | None = None,
                       why: str = "the daemon stopped before it finished") -> Write:
    """Invocations a crashed daemon left queued or running did not finish; their events run again (at start: those
    of this replica, or of every one; at a takeover: those of the replica taken over)."""
    def write(conn: Conn) -> None:
        which = "" if replicas is None else f" AND replica IN ({', '.join('?' * len(replicas))})"
        conn.execute(f"UPDATE invocations SET status = 'failed', finished_at = ?, error = ? "
                     f"WHERE status IN ('queued', 'running'){which}",
                     (finished_at, f"interrupted: {why} (its events run again)", *(replicas or ())))
    return write


def prune(*, invocations_before: float, dedupe_before: float) -> Write:
    def write(conn: Conn) -> None:
        conn.execute("DELETE FROM invocations WHERE queued_at < ? AND status NOT IN ('queued', 'running')", (invocations_before,))
        conn.execute("DELETE FROM dedupe WHERE seen_at < ?", (dedupe_before,))
    return write


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
    """The daemon's async access to ``Store``: reads in a worker thread, writes group-committed.

    Group commit: writers add their writes to the open group. The first writer of a group leads it:
    it waits for the commit lock (the previous group's transaction), takes the group (opening a new
    one for later writers) and commits it in one transaction; the others wait for that, and return,
    or raise the same error: a write is reported stored only if the transaction that held it
    committed. The leader is shielded from cancellation, so that a group always ends.

    ``error`` says why the store failed last, until a transaction succeeds again (``/readyz``).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.error: str | None = None
        self.replica = ""
        """The replica this daemon is (its id): the inbox rows it stores are its own (``replicas``)."""
        self._orphans = anyio.Event()
        self._thread = anyio.CapacityLimiter(1)
        self._commit_lock = anyio.Lock()
        self._open = _Group()

    async def read(self, fn: Callable[[Store], T]) -> T:
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
