"""Process functions never outlive their invocation or the daemon: not after kill -9, not when they setsid."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.support import DaemonProcess, base_config, free_port, post, toml, wait_until


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def daemon_with(tmp_path: Path, script: str) -> DaemonProcess:
    port = free_port()
    doc = base_config(tmp_path, executor="process", port=port)
    doc["functions"]["f"] = {"command": ["sh", "-c", script], "env": {"DIR": str(tmp_path)}, "timeout": "120s"}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"}, "ordering": "none",
                            "batch": {"max_events": 1, "max_wait": "10ms"}}
    config = tmp_path / "eventswarm.toml"
    config.write_text(toml(doc))
    return DaemonProcess(config, port, tmp_path / "daemon.log")


# The first run of the event writes its pid and the pid of a child in a session of its own, then works for long;
# a run after that finishes at once. Every run that finishes says so in "finished".
LONG_FIRST_RUN = (
    'if [ ! -e "$DIR/started" ]; then touch "$DIR/started"; setsid sleep 300 & echo "$$ $!" > "$DIR/pids"; sleep 60; fi; '
    'echo "$EVENTSWARM_BATCH_ID" >> "$DIR/finished"'
)


def pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    text = path.read_text() if path.exists() else ""
    return [int(p) for p in text.split()] if len(text.split()) == 2 else []


def end(tmp_path: Path, daemon: DaemonProcess) -> None:
    """Stop the daemon and whatever the test's function left, by pid (if a test failed before they ended)."""
    for pid in pids(tmp_path):
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    daemon.stop()


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(p) for p in file.read().split()]


def cmdline(pid: int) -> str:
    """The process's command line; "" once it has ended (it may between being listed and being read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def test_kill_9_of_the_daemon_ends_its_function_and_what_the_function_started_in_another_session(tmp_path):
    daemon = daemon_with(tmp_path, LONG_FIRST_RUN).start()
    try:
        assert post(f"http://127.0.0.1:{daemon.port}/hooks/t", b"{}")[0] == 202
        function, escaped = wait_until(lambda: pids(tmp_path), timeout=20, what="the function to start")
        daemon.kill()
        wait_until(lambda: gone(function) and gone(escaped), timeout=10,
                   what="the daemon's reaper to end the function and its escaped child")
        # Restarted, the daemon runs the event again (it was never acknowledged), once, to its end.
        daemon.start()
        wait_until(lambda: (tmp_path / "finished").exists(), timeout=30, what="the event to run again")
        assert len((tmp_path / "finished").read_text().split()) == 1
    finally:
        end(tmp_path, daemon)


def test_a_restarted_daemon_ends_what_a_crashed_one_left_when_its_reaper_died_too(tmp_path):
    daemon = daemon_with(tmp_path, LONG_FIRST_RUN).start()
    try:
        assert post(f"http://127.0.0.1:{daemon.port}/hooks/t", b"{}")[0] == 202
        function, escaped = wait_until(lambda: pids(tmp_path), timeout=20, what="the function to start")
        assert daemon.proc is not None
        reaper = [pid for pid in children(daemon.proc.pid) if "reaper.py" in cmdline(pid)]
        assert len(reaper) == 1, [cmdline(pid) for pid in children(daemon.proc.pid)]
        os.kill(reaper[0], signal.SIGKILL)
        daemon.kill()
        assert not gone(function) and not gone(escaped), "the function ended although nothing was left to end it"
        daemon.start()
        wait_until(lambda: gone(function) and gone(escaped), timeout=10, what="the restarted daemon to end them")
        assert "processes left behind by an earlier run" in daemon.log.read_text()
    finally:
        end(tmp_path, daemon)


def test_what_a_function_starts_in_another_session_ends_with_its_invocation(tmp_path):
    script = 'setsid sleep 300 & echo "$!" > "$DIR/escaped"; (setsid sh -c "sleep 300" &) ; echo done'
    daemon = daemon_with(tmp_path, script).start()
    try:
        status, _, body = post(f"http://127.0.0.1:{daemon.port}/hooks/t", b"{}")
        assert status == 202
        escaped = int(wait_until(lambda: (tmp_path / "escaped").exists() and (tmp_path / "escaped").read_text().strip(),
                                 timeout=20, what="the function to run"))
        wait_until(lambda: gone(escaped), timeout=10, what="the escaped child to end with its invocation")
        assert daemon.proc is not None
        left = [cmdline(pid) for pid in children(daemon.proc.pid) if "reaper.py" not in cmdline(pid)]
        wait_until(lambda: not [p for p in children(daemon.proc.pid) if "reaper.py" not in cmdline(p) and not gone(p)],
                   timeout=10, what=f"no process but the reaper left under the daemon: {left}")
        assert json.loads(body)["id"]
    finally:
        daemon.stop()
