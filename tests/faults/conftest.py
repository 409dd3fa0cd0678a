"""Fixtures for the fault-injection suite: small file systems that fill up, and real daemons flooded with events."""

from __future__ import annotations

import errno
import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import DaemonProcess, base_config, free_port, toml


class SmallDisk:
    """A tmpfs of a few MiB: ``fill`` takes every free byte, ``free`` gives them back (files survive)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.size = size
        self._filler = path / "filler"

    def fill(self, leave: int = 0) -> None:
        """Take every free byte but ``leave``: the disk then fills up under the daemon's own writes."""
        chunk = b"\0" * 4096
        with self._filler.open("ab", buffering=0) as out:
            while True:
                try:
                    out.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
            out.truncate(max(0, out.tell() - leave))

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


@contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount`` (created) for the test; it fails, never skips, where none can be mounted."""
    mount.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs ({options}) for a fault test (they need root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 16 MiB tmpfs (as root, as CI runs).

    Not smaller: SQLite's write-ahead log is copied into the database only once it holds about 4 MiB,
    and on a disk smaller than that the log alone fills it, for good."""
    with tmpfs(tmp_path / "disk", "size=16m") as mount:
        yield SmallDisk(mount, "16m")


def recording_daemon(tmp_path: Path, state_dir: Path, *, sleep: str = "0.05", env: dict[str, str] | None = None,
                     **daemon: Any) -> tuple[DaemonProcess, Path]:
    """A daemon (process executor) whose webhook function writes each batch it gets to ``ran/<batch id>.json``,
    once the file ``gate`` beside ``ran`` is gone."""
    ran = tmp_path / "ran"
    ran.mkdir(exist_ok=True)
    port = free_port()
    doc = base_config(tmp_path, executor="process", port=port, **daemon)
    doc["daemon"]["state"] = f"sqlite:///{state_dir / 'state.db'}"
    gate = tmp_path / "gate"
    # While the gate file exists, functions wait at it (up to their timeout): events pile up unrun in the daemon.
    script = f'while [ -e "{gate}" ]; do sleep 0.02; done; sleep {sleep}; cat > "$RAN/$EVENTSWARM_BATCH_ID.json"'
    doc["functions"]["record"] = {"command": ["sh", "-c", script], "env": {"RAN": str(ran)}, "timeout": "60s"}
    doc["triggers"]["hooks"] = {"function": "record", "source": {"kind": "webhook", "path": "/hooks/in"},
                                "ordering": "none", "max_in_flight": 4, "buffer": 1000,
                                "batch": {"max_events": 20, "max_wait": "20ms"}}
    config = tmp_path / "eventswarm.toml"
    config.write_text(toml(doc))
    return DaemonProcess(config, port, tmp_path / "daemon.log", env=env), ran


def ran_counts(ran: Path) -> Counter[str]:
    """How often each event id reached the function (a file cut short by a kill counts for what it holds)."""
    counts: Counter[str] = Counter()
    for file in ran.glob("*.json"):
        try:
            doc = json.loads(file.read_text())
        except ValueError:
            continue  # the function was killed while writing: it did not finish this batch
        counts.update(event["id"] for event in doc["events"])
    return counts
