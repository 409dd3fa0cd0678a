"""The state store on PostgreSQL (``state = "postgresql://…"``), through asyncpg.

``Database`` is synchronous (the CLI reads with it; the daemon runs it in a worker thread), and its
writes are closures over a connection with ``execute``/``executemany`` in SQLite's manner. Here
one asyncpg connection runs on an event loop of its own, in a thread of its own, behind a small
connection object of that manner: ``?`` placeholders become ``$1…``, a statement that returns
rows is fetched, any other reports the rows it touched. Within a transaction, writes are held back
and sent with the next statement that returns rows, or with the COMMIT, in one hop to the loop (a
run of the same statement as one pipelined ``executemany``): a group commit of a thousand inbox
rows costs a few round trips, not a thousand. The SQL itself is written once, in the
subset both databases speak (upserts with ``ON CONFLICT``, ``substr``, ``COALESCE``).

Schema migrations are store.py's, in PostgreSQL's types (``dialect``), versioned in a table of their
own and run under an advisory lock, so that replicas starting together migrate once.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

T = TypeVar("T")

ERRORS: tuple[type[BaseException], ...] = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                                           asyncio.TimeoutError)
"""What a PostgreSQL store raises when the server fails or is out of reach."""
TIMEOUT = 30.0
"""Seconds a statement (or the connection) may take."""
MIGRATION_LOCK = 0x6576656E74  # "event": the advisory lock key replicas migrate under

_TYPES = [("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
          (" REAL", " DOUBLE PRECISION"), (" BLOB", " BYTEA")]


def dialect(script: str) -> str:
    """A migration of the SQLite schema in PostgreSQL's types (the schema is written once, in store.py)."""
    for sqlite, postgres in _TYPES:
        script = script.replace(sqlite, postgres)
    return script


_PLACEHOLDER = re.compile(r"'[^']*'|\?")


def translate(sql: str) -> str:
    """SQLite's ``?`` placeholders as PostgreSQL's ``$1``, ``$2``… (not inside string literals)."""
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group(0) != "?":
            return match.group(0)
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, sql)


def redacted(url: str) -> str:
    """``url`` without its password (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Cursor:
    """What a statement gave: its rows, or how many rows it touched."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows

    def __iter__(self) -> Any:
        return iter(self.rows)


class Connection:
    """One asyncpg connection, used from synchronous code (one caller at a time: the store's thread)."""

    def __init__(self, url: str, password: str | None = None) -> None:
        self.url = url
        self.in_transaction = False
        self._loop = asyncio.new_event_loop()
        # (a thread with a loop of its own: the store's callers are synchronous, in the writer's and readers' threads;
        # ``close`` stops the loop and joins it)
        self._thread = threading.Thread(target=self._loop.run_forever, name="postgres", daemon=True)
        self._thread.start()
        self._sql: dict[str, str] = {}
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        """Writes of the open transaction not sent yet (``execute``)."""
        self._password = password
        try:
            self._conn: asyncpg.Connection = self._connect()
        except BaseException:
            self._stop()
            raise

    def _connect(self) -> asyncpg.Connection:
        return self._run(asyncpg.connect(self.url, password=self._password, timeout=TIMEOUT))

    def _ready(self) -> None:
        """A connection the server closed (a restart, a failover) is opened again, between transactions only."""
        if self._conn.is_closed():
            self._conn = self._connect()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(TIMEOUT + 5)

    def _translated(self, sql: str) -> str:
        found = self._sql.get(sql)
        if found is None:
            if len(self._sql) > 1000:
                self._sql.clear()
            found = self._sql[sql] = translate(sql)
        return found

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        word = sql.lstrip()[:9].upper()
        if not self.in_transaction and word != "ROLLBACK":
            self._ready()
        if word in ("BEGIN", "COMMIT", "ROLLBACK"):
            pending, self._pending = self._pending, []
            try:
                self._run(self._send([] if word == "ROLLBACK" else pending, word))
            except BaseException:
                # (a write held back failed at the COMMIT: the transaction is still open, to be rolled back)
                self.in_transaction = word == "COMMIT" and not self._conn.is_closed()
                raise
            self.in_transaction = word == "BEGIN"
            return Cursor([], 0)
        query = self._translated(sql)
        returns = word.startswith("SELECT") or " RETURNING " in sql.upper()
        if self.in_transaction and not returns:
            # Sent with the next statement that returns rows, or the COMMIT: one hop for many writes.
            self._pending.append((query, tuple(params)))
            return Cursor([], -1)
        pending, self._pending = self._pending, []
        if returns:
            rows = self._run(self._send(pending, None, fetch=(query, params)))
            return Cursor(list(rows), len(rows))
        status = self._run(self._send(pending, None, statement=(query, params)))
        last = status.rsplit(" ", 1)[-1]
        return Cursor([], int(last) if last.isdigit() else 0)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        query = self._translated(sql)
        if self.in_transaction:
            self._pending.extend((query, tuple(row)) for row in rows)
        else:
            self._run(self._conn.executemany(query, [tuple(row) for row in rows], timeout=TIMEOUT))

    async def _send(self, pending: list[tuple[str, tuple[Any, ...]]], then: str | None, *,
                    fetch: tuple[str, Sequence[Any]] | None = None,
                    statement: tuple[str, Sequence[Any]] | None = None) -> Any:
        """The writes held back (runs of one statement as one pipelined ``executemany``), then ``then`` or the
        statement asked for now: on the connection's loop, in one hop from the caller's thread."""
        conn = self._conn
        at = 0
        while at < len(pending):
            query = pending[at][0]
            end = at + 1
            while end < len(pending) and pending[end][0] == query:
                end += 1
            if end - at > 1:
                await conn.executemany(query, [params for _, params in pending[at:end]], timeout=TIMEOUT)
            else:
                await conn.execute(query, *pending[at][1], timeout=TIMEOUT)
            at = end
        if then is not None:
            return await conn.execute(then)
        if fetch is not None:
            return await conn.fetch(fetch[0], *fetch[1], timeout=TIMEOUT)
        if statement is not None:
            return await conn.execute(statement[0], *statement[1], timeout=TIMEOUT)
        return None

    def migrate(self, migrations: Sequence[str]) -> None:
        """Bring the schema to the last of ``migrations`` (SQLite's, in PostgreSQL's types), once, whichever replica
        gets there first."""
        async def run() -> None:
            conn = self._conn
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute("CREATE TABLE IF NOT EXISTS eventswarm_schema (version INTEGER NOT NULL)")
                version = await conn.fetchval("SELECT version FROM eventswarm_schema")
                if version is None:
                    await conn.execute("INSERT INTO eventswarm_schema (version) VALUES (0)")
                    version = 0
                for number, script in enumerate(migrations[version:], start=version + 1):
                    await conn.execute(dialect(script))
                    await conn.execute("UPDATE eventswarm_schema SET version = $1", number)

        self._run(run())

    def close(self) -> None:
        try:
            self._run(self._conn.close(timeout=5))
        except ERRORS:
            pass
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
