"""Every way `eventswarm run` can be kept from starting that a user meets first ends in one line, without a
traceback, and that line has an entry in docs/troubleshooting.md (its headings are the lines' words)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, DaemonProcess, free_port, toml

HEADINGS = re.findall(r"^### `([^`]+)`", (ROOT / "docs" / "troubleshooting.md").read_text(), re.MULTILINE)


def config(tmp_path: Path, **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "daemon": {"state": "sqlite:///state/eventswarm.db", "listen": f"127.0.0.1:{free_port()}"},
        "executor": {"kind": "process"},
        "functions": {"f": {"command": ["true"]}},
        "triggers": {"t": {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"}}},
    }
    for section, values in changes.items():
        doc[section] = {**doc[section], **values}
    path = tmp_path / "eventswarm.toml"
    path.write_text(toml(doc))
    return path


def started(path: Path | str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatcher", "run", "-c", str(path)], capture_output=True,
                          text=True, timeout=120, env=env)


def prepared(case: str, tmp_path: Path) -> Path:
    if case == "no file":
        return tmp_path / "nowhere.toml"
    if case == "not TOML":
        (tmp_path / "bad.toml").write_text('listen = 127.0.0.1:8080\n')
        return tmp_path / "bad.toml"
    if case == "unknown key":
        return config(tmp_path, executor={"max_inflight": 3})
    if case == "secret unset":
        signature = {"scheme": "github", "secret_env": "ES_TEST_NEVER_SET"}
        return config(tmp_path, triggers={"t": {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t",
                                                                            "signature": signature}}})
    if case == "open to the network":
        return config(tmp_path, daemon={"listen": f"0.0.0.0:{free_port()}"})
    if case == "damaged":
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "eventswarm.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
        return config(tmp_path)
    if case == "not a database":
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "eventswarm.db").write_text("these are not the pages of a database\n" * 200)
        return config(tmp_path)
    if case == "a file for a folder":
        (tmp_path / "state").write_text("a file")
        return config(tmp_path)
    if case == "postgres not there":
        return config(tmp_path, daemon={"state": f"postgresql://postgres@127.0.0.1:{free_port()}/x"})
    if case == "engine not there":
        return config(tmp_path, executor={"kind": "docker", "docker_host": f"tcp://127.0.0.1:{free_port()}"},
                      functions={"f": {"image": "busybox"}})
    raise AssertionError(case)


CASES = ["no file", "not TOML", "unknown key", "secret unset", "open to the network", "damaged", "not a database",
         "a file for a folder", "postgres not there", "engine not there"]


@pytest.mark.parametrize("case", CASES)
def test_a_start_error_is_one_line_with_an_entry_in_troubleshooting(tmp_path, case):
    done = started(prepared(case, tmp_path))
    assert done.returncode in (1, 2), done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert [h for h in HEADINGS if h in lines[0]], f"no entry in docs/troubleshooting.md for: {lines[0]}"


def test_a_second_daemon_and_a_taken_port_are_one_line_with_an_entry_each(tmp_path):
    path = config(tmp_path)
    port = int(path.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])
    first = DaemonProcess(path, port, tmp_path / "first.log").start()
    try:
        second = tmp_path / "second"
        second.mkdir()
        (second / "eventswarm.toml").write_text(path.read_text().replace(f":{port}", f":{free_port()}")
                                                .replace("sqlite:///state/", f"sqlite:///{tmp_path}/state/"))
        done = started(second / "eventswarm.toml")
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert [h for h in HEADINGS if h in done.stderr], done.stderr
    finally:
        assert first.stop() == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        path.write_text(path.read_text().replace(f":{port}", f":{busy}"))
        done = started(path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot listen on 127.0.0.1" in done.stderr and [h for h in HEADINGS if h in done.stderr]
