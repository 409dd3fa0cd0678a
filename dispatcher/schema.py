"""The state database's schema: the migrations that build it, in order, and what a write runs on.

Both databases run the same SQL (the subset SQLite and PostgreSQL share, with ``?`` placeholders). A migration is
never edited once released: a new one is appended. SQLite keeps the version in ``PRAGMA user_version``; PostgreSQL
in a table of its own (``dispatcher.postgres``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol


class Conn(Protocol):
    """What a write runs on: a ``sqlite3.Connection``, or ``postgres.Connection`` (the same manner, ``?``
    placeholders; the SQL is the subset both databases speak)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...


Write = Callable[[Conn], None]


MIGRATIONS: list[str] = [
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
    # 3: bounded records: a batch's event ids packed (``dispatcher.idpack``; ``event_ids`` is '' in a row that has
    # them), the bytes the records hold counted per replica (what ``max_records_size`` bounds; the records written
    # before are counted here once), and dedupe keys and checkpoints found by age (forgotten in chunks)
    """
    ALTER TABLE invocations ADD COLUMN ids BLOB;
    CREATE TABLE record_bytes (
        replica TEXT PRIMARY KEY,
        bytes BIGINT NOT NULL
    );
    INSERT INTO record_bytes (replica, bytes) SELECT '', COALESCE(SUM(400 + length(event_ids)
        + COALESCE(length(stdout), 0) + COALESCE(length(stderr), 0)), 0) FROM invocations;
    CREATE INDEX dedupe_by_time ON dedupe (seen_at);
    CREATE INDEX checkpoints_by_time ON checkpoints (trigger, updated_at);
    """,
    # 4: the Swarm node an invocation ran on (swarm executor; NULL elsewhere and before)
    """
    ALTER TABLE invocations ADD COLUMN node TEXT;
    """,
    # 5: the trace an invocation ran in (its span's W3C ids as trace_id/span_id; NULL without telemetry and before)
    """
    ALTER TABLE invocations ADD COLUMN trace TEXT;
    """,
]

RECORD_OVERHEAD = 400
"""The bytes a record is counted for besides its event ids and logs: its other columns and its index entries (measured:
``docs/capacity.md``). Migration 3 counted the records before it with this number: change it there too, in a new
migration."""

RECORD_SIZE = (f"({RECORD_OVERHEAD} + length(event_ids) + COALESCE(length(ids), 0) + COALESCE(length(stdout), 0) "
               "+ COALESCE(length(stderr), 0))")
"""The bytes a record row is counted for, in SQL (``record_bytes`` holds their sum)."""


def script(script: str) -> Write:
    def write(conn: Conn) -> None:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    return write


def set_version(number: int) -> Write:
    def write(conn: Conn) -> None:
        conn.execute(f"PRAGMA user_version={number}")
    return write
