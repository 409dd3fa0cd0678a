"""Ending what process functions leave running: by their ``EVENTSWARM_OWNER`` mark, even after the daemon died.

Run as a script (``python reaper.py MARK``), this is the process executor's reaper: a small process,
in a session of its own, that waits for its standard input to close, which happens when the daemon
exits in any way, ``kill -9`` included, and then kills every process still carrying the daemon's
mark. Standard library only, so that it starts in milliseconds and holds little memory.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator

OWNER_VARIABLE = "EVENTSWARM_OWNER"
"""Set in every process function's environment (and inherited by what it starts): ``<owner>.<incarnation>``."""
PASSES = 3
"""Scans of /proc per sweep: a process forked while a scan ran is found by the next."""


def marked(match: Callable[[str], bool]) -> Iterator[int]:
    """Pids of the processes whose ``EVENTSWARM_OWNER`` satisfies ``match`` (readable ones; this one excepted)."""
    own = os.getpid()
    prefix = OWNER_VARIABLE.encode() + b"="
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == own:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                environ = file.read()
        except OSError:
            continue  # gone, or not ours to read
        for entry in environ.split(b"\0"):
            if entry.startswith(prefix):
                if match(entry[len(prefix):].decode(errors="replace")):
                    yield int(name)
                break


def sweep(match: Callable[[str], bool]) -> int:
    """SIGKILL every process whose mark satisfies ``match``; how many were killed."""
    killed: set[int] = set()
    for _ in range(PASSES):
        found = [pid for pid in marked(match) if pid not in killed]
        if not found:
            break
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
    return len(killed)


def main() -> None:
    mark = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the daemon does not end its reaper
    try:
        while os.read(0, 4096):  # nothing is ever written: this returns b"" once the daemon has gone
            pass
    except OSError:
        pass
    sweep(lambda found: found == mark)


if __name__ == "__main__":
    main()
