"""One daemon per state store: an exclusive OS lock (``flock``) on ``<state>.lock``, held while it runs (on
PostgreSQL, one daemon per replica id: a session advisory lock, ``PostgresLock``; see ``replicas``).

A second daemon on the same store would mark the first one's running invocations interrupted and
remove its containers as leftovers. The lock is taken before anything is touched; the kernel drops
it when the process ends, however it ends (``kill -9`` included), so a stale lock never blocks a
restart. The file holds who holds the lock, for the error a second daemon prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from dispatcher.errors import EventswarmError, StoreError


class StoreLocked(EventswarmError):
    """Another process holds the state store's lock (a usage error: exit 2)."""


class StoreLock:
    def __init__(self, state_path: str) -> None:
        self.state_path = state_path
        self.path = Path(f"{state_path}.lock")
        self._fd: int | None = None

    def acquire(self, what: str = "a daemon") -> StoreLock:
        """Take the lock, or raise ``StoreLocked`` naming its holder; ``what`` says who takes it, for that error."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # (as the store makes its folder)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StoreError(f"cannot lock the state store {self.state_path}: {exc.filename} is not a folder",
                             temporary=False) from None
        except OSError:
            pass  # (said below, by the open)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot lock the state store {self.state_path}: {self.path}: {exc.strerror}",
                             temporary=False) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreLocked(f"the state store {self.state_path} is in use by {holder} (lock: {self.path}): one "
                              "daemon per state store; stop that one first, or give this one its own "
                              "daemon.state") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what}, pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)  # (closing drops the lock)


class PostgresLock:
    """One daemon per replica id on a PostgreSQL database (several replicas share it, each under its own id): a
    session advisory lock, held by a connection of its own while the daemon runs. The server drops it when that
    connection ends, however the process ended (``kill -9`` included): the other replicas read a free lock as the
    replica gone. A table says who holds it, for the error a second daemon prints."""

    def __init__(self, url: str, password: str | None, replica: str = "") -> None:
        from dispatcher import postgres
        from dispatcher.replicas import lock_key

        self.url = url
        self.where = postgres.redacted(url)
        self.replica = replica
        self.key = lock_key(replica)
        self._password = password
        self._conn: postgres.Connection | None = None

    def acquire(self, what: str = "a daemon") -> PostgresLock:
        from dispatcher import postgres

        try:
            conn = postgres.Connection(self.url, self._password)
        except postgres.ERRORS as exc:
            raise StoreError(f"cannot lock the state store {self.where}: {exc or type(exc).__name__} (is the "
                             "PostgreSQL server up, and reachable from here?)", temporary=False) from None
        try:
            if not self._try(conn):
                try:
                    row = conn.execute("SELECT holder FROM eventswarm_holder WHERE key = ?", (self.key,)).fetchone()
                except postgres.ERRORS:
                    row = None
                holder = row[0] if row else "another process"
                raise StoreLocked(f"replica {self.replica!r} of the state store {self.where} is in use by {holder}: "
                                  "each daemon sharing a database needs its own daemon.replica (or stop that one "
                                  "first)")
            conn.execute("CREATE TABLE IF NOT EXISTS eventswarm_holder (key BIGINT PRIMARY KEY, holder TEXT NOT NULL)")
            holder = (f"{what}, pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}")
            conn.execute("INSERT INTO eventswarm_holder (key, holder) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                         "SET holder = excluded.holder", (self.key, holder))
        except BaseException as exc:
            conn.close()
            if isinstance(exc, postgres.ERRORS):
                raise StoreError(f"cannot lock the state store {self.where}: {exc}", temporary=False) from None
            raise
        self._conn = conn
        return self

    def _try(self, conn: Any) -> bool:
        """Take the lock (a replica checking whether this id's process is gone holds it for a moment: tried again)."""
        for _ in range(5):
            if conn.execute("SELECT pg_try_advisory_lock(?)", (self.key,)).fetchone()[0]:
                return True
            time.sleep(0.1)
        return False

    def release(self) -> None:
        from dispatcher import postgres

        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute("DELETE FROM eventswarm_holder WHERE key = ?", (self.key,))
            except postgres.ERRORS:
                pass  # (closing drops the lock all the same)
            conn.close()


def store_lock(state: str, password: str | None = None, replica: str = "") -> StoreLock | PostgresLock:
    """The lock of the state store at ``state`` (a SQLite path), or of ``replica`` on it (a PostgreSQL URL)."""
    if state.startswith(("postgresql://", "postgres://")):
        return PostgresLock(state, password, replica)
    return StoreLock(state)
