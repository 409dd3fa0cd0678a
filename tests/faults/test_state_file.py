"""A damaged state file and an unwritable state directory: one clear line and exit 1, never a half-running daemon
or a traceback; what the damaged store holds is not silently ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dispatcher.store import Database
from tests.faults.conftest import recording_daemon, tmpfs
from tests.support import base_config, post, toml


def eventswarm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatcher", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_damaged_state_file_stops_the_daemon_at_start_with_one_line(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    daemon, _ = recording_daemon(tmp_path, state_dir, shutdown_grace="1s")
    gate = tmp_path / "gate"
    gate.touch()  # the 20 events stay in the inbox: their function never gets past the gate
    daemon.start()
    url = f"http://127.0.0.1:{daemon.port}/hooks/in"
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: post(url, json.dumps({"n": n, "pad": "p" * 3000}).encode()), range(20)))
    assert [status for status, _, _ in answers] == [202] * 20
    assert daemon.stop() == 0

    state = state_dir / "state.db"
    data = bytearray(state.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle:middle + 3072] = os.urandom(3072)
    state.write_bytes(bytes(data))

    done = eventswarm("run", "-c", str(daemon.config_file))
    assert_one_line(done, "damaged", str(state))
    # A reader either reads what is still readable, or says in one line that it cannot.
    done = eventswarm("invocations", "-c", str(daemon.config_file))
    assert "Traceback" not in done.stderr
    if done.returncode:
        assert_one_line(done, str(state_dir))


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only file system (root ignores permission bits, so a mode of 0555 would prove nothing)."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        yield mount


@pytest.mark.parametrize("where", ["state.db", "missing/dir/state.db"])
def test_an_unwritable_state_directory_is_one_line_for_run_and_for_readers(tmp_path, read_only_dir, where):
    doc = base_config(tmp_path, executor="process", port=0)
    doc["daemon"]["state"] = f"sqlite:///{read_only_dir / where}"
    config = tmp_path / "eventswarm.toml"
    config.write_text(toml(doc))
    assert_one_line(eventswarm("run", "-c", str(config)), "state store")
    done = eventswarm("invocations", "-c", str(config))
    assert "Traceback" not in done.stderr
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_state_file_on_a_read_only_file_system_is_one_line(tmp_path):
    """A store that exists but cannot be written (its file system was remounted read-only)."""
    with tmpfs(tmp_path / "disk", "size=4m") as mount:
        doc = base_config(tmp_path, executor="process", port=0)
        doc["daemon"]["state"] = f"sqlite:///{mount / 'state.db'}"
        config = tmp_path / "eventswarm.toml"
        config.write_text(toml(doc))
        Database(str(mount / "state.db")).close()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        assert_one_line(eventswarm("run", "-c", str(config)), "state store")
        done = eventswarm("invocations", "-c", str(config))
        assert "Traceback" not in done.stderr
