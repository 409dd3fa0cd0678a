"""One daemon per state store: an exclusive OS lock (``flock``) on ``<state>.lock``, held while it runs.

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
