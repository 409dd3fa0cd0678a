"""The state database (SQLite in WAL mode, or PostgreSQL): invocation records and logs, dead letters, checkpoints
and the webhook inbox, and the writes the daemon makes to them.

``Database`` is synchronous: the CLI reads with it, and each write is a closure run in a transaction. The daemon
reaches it through ``dispatcher.state.StateStore``, which runs reads in a worker thread and group-commits writes.
The schema and its migrations are ``dispatcher.schema``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatcher import idpack
from dispatcher.errors import StoreError
from dispatcher.schema import MIGRATIONS, RECORD_OVERHEAD, RECORD_SIZE, Conn, Write, script, set_version

log = logging.getLogger("eventswarm.store")


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str) -> bool:
    return location.startswith(POSTGRES_SCHEMES)


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
    node: str | None = None
    """The Swarm node it ran on (swarm executor)."""
    trace: str | None = None
    """Its trace (``[telemetry]``): the invoke span's trace id and span id, as ``TRACE_ID/SPAN_ID`` in hex."""

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


_INVOCATION_COLUMNS = ("id, trigger, function, status, attempt, batch_size, event_ids, ids, exit_code, error, "
                       "queued_at, started_at, finished_at, executor_ref, replica, node, trace")
_REPLACE_INVOCATION = ", ".join(f"{c} = excluded.{c}" for c in _INVOCATION_COLUMNS.split(", ")[1:]) + \
    ", stdout = NULL, stderr = NULL"
"""(An invocation written again replaces the row, as a new one: its logs too.)"""

_COUNT_BYTES = ("INSERT INTO record_bytes (replica, bytes) VALUES (?, {}) "
                "ON CONFLICT (replica) DO UPDATE SET bytes = record_bytes.bytes + excluded.bytes")
"""Add to the records' bytes (``record_bytes``: a row per replica, so that replicas never wait on one row)."""


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


def event_ids_of(text: str, packed: bytes | None) -> list[str]:
    """A record's event ids: packed (``ids``), or as JSON in ``event_ids`` (records written before migration 3)."""
    if packed is None:
        return list(json.loads(text))
    try:
        return idpack.unpack(bytes(packed))
    except ValueError as exc:
        log.warning("a record's event ids cannot be read (%s): it shows none", exc)
        return []


def _invocation(row: tuple[Any, ...]) -> InvocationRecord:
    values = list(row)
    values[6] = event_ids_of(values[6], values.pop(7))
    return InvocationRecord(*values)


PRUNE_CHUNK = 200
"""Rows a prune (records, dedupe keys, checkpoints) deletes in one transaction: the group commit waits for one chunk,
never for a whole prune."""

WAL_SIZE_LIMIT = 8 * 1024 * 1024
"""After a checkpoint the write-ahead log is cut back to this size: a burst does not keep its disk space."""


class Database:
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
                if self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                    # A new file: pages freed by pruning can be given back (``incremental_vacuum``, by
                    # ``Retention``; set before WAL, which writes the file's header). An older file keeps auto_vacuum
                    # off (turning it on rewrites the file: VACUUM): its free pages are reused, not given back.
                    self.conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
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
                self.conn.migrate(MIGRATIONS)
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
        for number, text in enumerate(MIGRATIONS[version:], start=version + 1):
            self.transaction([script(text), set_version(number)])

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

    # -- what the records hold ---------------------------------------------------------------

    def records_bytes(self) -> int:
        """The bytes the invocation records are counted for (``schema.RECORD_SIZE``), on every replica."""
        return int(self.conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM record_bytes").fetchone()[0])

    def oldest_record(self) -> float | None:
        """When the oldest record kept was queued."""
        row = self.conn.execute("SELECT MIN(queued_at) FROM invocations").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def dead_letter_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def free_pages(self) -> tuple[int, int, int] | None:
        """SQLite with incremental vacuum: (free pages, pages, page size); None otherwise."""
        if self.postgres or self.conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return None
        return tuple(self.conn.execute(f"PRAGMA {name}").fetchone()[0]
                     for name in ("freelist_count", "page_count", "page_size"))



# -- writes, as closures the group commit runs in one transaction ----------------------------

def insert_invocation(record: InvocationRecord) -> Write:
    def write(conn: Conn) -> None:
        packed = idpack.pack(record.event_ids)
        # Counted first, less what the row it may replace was counted for: the count stays exact.
        conn.execute(_COUNT_BYTES.format(f"? - COALESCE((SELECT {RECORD_SIZE} FROM invocations WHERE id = ?), 0)"),
                     (record.replica, RECORD_OVERHEAD + len(packed), record.id))
        conn.execute(
            f"INSERT INTO invocations ({_INVOCATION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            f"ON CONFLICT (id) DO UPDATE SET {_REPLACE_INVOCATION}",
            (record.id, record.trigger, record.function, record.status, record.attempt, record.batch_size, "", packed,
             record.exit_code, record.error, record.queued_at, record.started_at, record.finished_at,
             record.executor_ref, record.replica, record.node, record.trace),
        )
    return write


def start_invocation(invocation_id: str, started_at: float) -> Write:
    def write(conn: Conn) -> None:
        conn.execute("UPDATE invocations SET status = 'running', started_at = ? WHERE id = ?", (started_at, invocation_id))
    return write


def finish_invocation(invocation_id: str, *, status: str, exit_code: int | None, error: str | None,
                      finished_at: float, executor_ref: str | None, stdout: bytes, stderr: bytes,
                      replica: str = "", node: str | None = None) -> Write:
    def write(conn: Conn) -> None:
        conn.execute(_COUNT_BYTES.format("COALESCE((SELECT ? - COALESCE(length(stdout), 0) - COALESCE(length(stderr), 0) "
                                         "FROM invocations WHERE id = ?), 0)"),
                     (replica, len(stdout) + len(stderr), invocation_id))
        conn.execute(
            "UPDATE invocations SET status = ?, exit_code = ?, error = ?, finished_at = ?, executor_ref = ?, "
            "node = ?, stdout = ?, stderr = ? WHERE id = ?",
            (status, exit_code, error, finished_at, executor_ref, node, stdout, stderr, invocation_id),
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


def forget_checkpoints(trigger: str, prefix: str, before: float, limit: int, removed: list[int]) -> Write:
    """Delete up to ``limit`` of the trigger's checkpoints whose key starts with ``prefix`` and that were saved before
    ``before``, oldest first; their number goes to ``removed``."""
    def write(conn: Conn) -> None:
        removed.append(len(conn.execute(
            "DELETE FROM checkpoints WHERE (trigger, key) IN (SELECT trigger, key FROM checkpoints WHERE trigger = ? "
            "AND updated_at < ? AND substr(key, 1, ?) = ? ORDER BY updated_at LIMIT ?) RETURNING 1",
            (trigger, before, len(prefix), prefix, limit)).fetchall()))
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


def prune_records(*, before: float | None, limit: int, replica: str, postgres: bool,
                  removed: list[tuple[float, int]]) -> Write:
    """Delete up to ``limit`` of the oldest finished records (queued before ``before``, when given), adding
    (queued at, bytes) of each to ``removed`` and taking their bytes off the count. Replicas pruning at once each
    delete other rows (PostgreSQL: ``SKIP LOCKED``)."""
    age = "" if before is None else "queued_at < ? AND "
    skip = " FOR UPDATE SKIP LOCKED" if postgres else ""

    def write(conn: Conn) -> None:
        rows = conn.execute(
            f"DELETE FROM invocations WHERE id IN (SELECT id FROM invocations WHERE {age}status NOT IN ('queued', "
            f"'running') ORDER BY queued_at LIMIT ?{skip}) RETURNING queued_at, {RECORD_SIZE}",
            (*(() if before is None else (before,)), limit)).fetchall()
        if rows:
            conn.execute(_COUNT_BYTES.format("?"), (replica, -sum(int(size) for _, size in rows)))
        removed.extend((float(at), int(size)) for at, size in rows)
    return write


def prune_dedupe(*, before: float, limit: int, removed: list[int]) -> Write:
    """Forget up to ``limit`` of the webhook dedupe keys seen before ``before``; their number goes to ``removed``."""
    def write(conn: Conn) -> None:
        removed.append(len(conn.execute(
            "DELETE FROM dedupe WHERE (trigger, key) IN (SELECT trigger, key FROM dedupe WHERE seen_at < ? "
            "ORDER BY seen_at LIMIT ?) RETURNING 1", (before, limit)).fetchall()))
    return write
