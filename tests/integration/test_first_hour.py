"""The first hour of a new user, through the real CLI: reading commands without a source's secrets, paths that
mean the config file's folder wherever the command runs, `dlq replay`'s exit status, `-o json` on every listing,
a URL without a scheme, an environment override's error, and what `validate` warns about."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import DaemonProcess, free_port, post, toml, wait_until

SECRET_VARIABLE = "FIRST_HOUR_SECRET"
SECRET = "It's a Secret to Everybody"
HANDLER = """\
if grep -q fail "$EVENTSWARM_INPUT" && [ ! -e fixed ]; then echo "failing on purpose" >&2; exit 1; fi
echo "ran in $(pwd)"
"""


def cli(*args: str, cwd: Path | str = "/", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``eventswarm ARGS`` from ``cwd``, in an environment without the webhook's secret (as an operator's shell)."""
    environment = {k: v for k, v in os.environ.items() if k != SECRET_VARIABLE and not k.startswith("EVENTSWARM_")}
    return subprocess.run([sys.executable, "-m", "dispatcher", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**environment, **(env or {})})


WEBHOOK = {"kind": "webhook", "path": "/hooks/t", "signature": {"scheme": "github", "secret_env": SECRET_VARIABLE}}


def app(tmp_path: Path, port: int, source: dict[str, Any] = WEBHOOK) -> Path:
    """A config whose every path is relative: the state, the function's program (in its workdir), the source's."""
    folder = tmp_path / "app"
    (folder / "fn").mkdir(parents=True)
    (folder / "fn" / "handle.sh").write_text(HANDLER)
    doc: dict[str, Any] = {
        "daemon": {"state": "sqlite:///state/eventswarm.db", "listen": f"127.0.0.1:{port}", "shutdown_grace": "10s"},
        "executor": {"kind": "process"},
        "functions": {"f": {"command": ["sh", "fn/handle.sh"], "timeout": "30s"}},
        "triggers": {"t": {"function": "f", "retry": {"max_attempts": 1}, "source": source}},
    }
    (folder / "eventswarm.toml").write_text(toml(doc))
    return folder / "eventswarm.toml"


def signed(port: int, doc: dict[str, Any]) -> int:
    body = json.dumps(doc).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    status, _, answer = post(f"http://127.0.0.1:{port}/hooks/t", body, {"X-Hub-Signature-256": signature})
    assert status == 202, answer
    return status


def listed(*args: str) -> list[dict[str, Any]]:
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_operator_without_the_secrets_reads_and_steers_from_any_folder(tmp_path, monkeypatch):
    port = free_port()
    config = app(tmp_path, port)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the daemon runs from another folder: its paths are still the config's
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log", env={SECRET_VARIABLE: SECRET}).start()
    try:
        assert (config.parent / "state" / "eventswarm.db").is_file()
        assert not (elsewhere / "state").exists()
        signed(port, {"n": 1})
        ran = wait_until(lambda: [r for r in listed("invocations", "-c", str(config), "-o", "json")
                                  if r["status"] == "succeeded"], timeout=30, what="the first invocation")
        logs = cli("logs", "-c", str(config), ran[0]["id"])
        assert logs.returncode == 0 and logs.stdout == f"ran in {config.parent}\n", logs.stderr  # (its workdir)
        assert cli("logs", "-c", str(config), "--last", "t").returncode == 0

        signed(port, {"n": 2, "fail": True})
        (letter,) = wait_until(lambda: listed("dlq", "list", "-c", str(config), "-o", "json"), timeout=30,
                               what="the dead letter")
        assert listed("dlq", "list", "-c", str(config), "--json") == [letter]  # (--json: the same as -o json)
        shown = listed("dlq", "show", "-c", str(config), letter["id"][:12], "-o", "json")
        assert shown["id"] == letter["id"] and shown["event"]["data"] == {"n": 2, "fail": True}
        table = cli("dlq", "show", "-c", str(config), letter["id"])
        assert table.returncode == 0 and f"dead letter {letter['id']}" in table.stdout, table.stderr
        assert "failing on purpose" in table.stdout

        again = cli("dlq", "replay", "-c", str(config), letter["id"], "--timeout", "60s")
        assert again.returncode == 1, again.stdout + again.stderr
        assert "0 ran, 1 failed again" in again.stdout
        (letter,) = listed("dlq", "list", "-c", str(config), "-o", "json")
        (config.parent / "fixed").write_text("")  # (the function's workdir: it succeeds from now on)
        fixed = cli("dlq", "replay", "-c", str(config), letter["id"], "--timeout", "60s")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert "1 ran, 0 failed again" in fixed.stdout
        assert listed("dlq", "list", "-c", str(config), "-o", "json") == []

        report = listed("status", "-c", str(config), "-o", "json")
        assert [t["trigger"] for t in report["triggers"]] == ["t"]
        schemeless = cli("status", "--url", f"127.0.0.1:{port}", "-o", "json")
        assert schemeless.returncode == 0 and json.loads(schemeless.stdout)["triggers"], schemeless.stderr
        table = cli("status", "-c", str(config))
        assert table.returncode == 0 and "TRIGGER" in table.stdout, table.stderr
        reloaded = cli("reload", "-c", str(config))
        assert reloaded.returncode == 0 and "reloaded" in reloaded.stdout, reloaded.stderr
        for done in (logs, again, fixed, reloaded):
            assert SECRET_VARIABLE not in done.stderr
    finally:
        assert daemon.stop() == 0
    cleaned = cli("gc", "-c", str(config))
    assert cleaned.returncode == 0 and SECRET_VARIABLE not in cleaned.stderr, cleaned.stderr
    # run and validate still need it
    refused = cli("validate", "-c", str(config))
    assert refused.returncode == 2 and f"environment variable {SECRET_VARIABLE} is not set" in refused.stderr


def test_an_environment_overrides_mistake_names_the_variable_not_the_file(tmp_path):
    config = app(tmp_path, free_port())
    done = cli("validate", "-c", str(config), env={"EVENTSWARM_EXECUTOR__MAX_INFLIGHT": "3", SECRET_VARIABLE: "x"})
    assert done.returncode == 2
    assert done.stderr.strip() == "$EVENTSWARM_EXECUTOR__MAX_INFLIGHT: executor.max_inflight: unknown key"
    file_mistake = config.read_text().replace('kind = "process"', 'kind = "process"\nmax_inflight = 3')
    config.write_text(file_mistake)
    done = cli("validate", "-c", str(config), env={SECRET_VARIABLE: "x"})
    assert done.returncode == 2 and done.stderr.strip() == f"{config}: executor.max_inflight: unknown key"


@pytest.mark.parametrize("engine", ["reachable", "unreachable"])
def test_validate_warns_of_what_can_only_fail_at_run_time(tmp_path, engine):
    folder = tmp_path / "app"
    folder.mkdir()
    docker_host = {} if engine == "reachable" else {"docker_host": f"tcp://127.0.0.1:{free_port()}"}
    doc: dict[str, Any] = {
        "daemon": {"state": "sqlite:///state/x.db", "listen": "127.0.0.1:0"},
        "executor": {"kind": "docker", **docker_host},
        "functions": {"f": {"image": "eventswarm-no-such-image:1", "mounts": ["/srv:/srv"]}},
        "triggers": {"t": {"function": "f", "source": {"kind": "file", "path": "drop"}}},
    }
    (folder / "a.toml").write_text(toml(doc))
    done = cli("validate", "-c", str(folder / "a.toml"))
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.splitlines()
    assert f"warning: triggers.t.source.path: {folder / 'drop'} does not exist: the source fails at start until it is there" in warnings
    assert any(w.startswith(f"warning: daemon.state: the state store is {folder / 'state' / 'x.db'}") for w in warnings)
    if engine == "reachable":
        assert ("warning: functions.f.image: eventswarm-no-such-image:1 is not on the engine: build or pull it before "
                "`run` (on Swarm, every node that may run it needs it)") in warnings
    else:
        assert any(w.startswith("warning: executor: cannot reach the Docker engine") for w in warnings), warnings
    # the process executor: a program, or a relative argument, that is not there
    doc["executor"] = {"kind": "process"}
    doc["functions"] = {"f": {"command": ["no-such-program-here", "x"]}, "g": {"command": ["sh", "fn/missing.sh"]}}
    doc["triggers"] = {"t": {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"}},
                       "u": {"function": "g", "source": {"kind": "webhook", "path": "/hooks/u"}}}
    (folder / "a.toml").write_text(toml(doc))
    done = cli("validate", "-c", str(folder / "a.toml"))
    assert done.returncode == 0, done.stderr
    assert "warning: functions.f.command: no-such-program-here is not found on PATH" in done.stderr
    assert (f"warning: functions.g.command: fn/missing.sh is not in {folder} (its workdir: a relative path is taken "
            "from there)") in done.stderr


def test_a_dropped_file_whose_replay_succeeds_leaves_the_failed_folder(tmp_path, monkeypatch):
    port = free_port()
    config = app(tmp_path, port, {"kind": "file", "path": "drop", "stable_for": "100ms"})
    folder = config.parent
    (folder / "drop").mkdir()
    monkeypatch.chdir(tmp_path)
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log").start()
    try:
        (folder / "drop" / "order.json").write_text('{"fail": true}')
        failed = folder / "drop" / "failed" / "order.json"
        wait_until(lambda: failed.exists() and failed.with_name("order.json.error.json").exists(), timeout=30,
                   what="the file in the failed folder, with its reason")
        (letter,) = wait_until(lambda: listed("dlq", "list", "-c", str(config), "-o", "json"), timeout=30,
                               what="its dead letter")
        (folder / "fixed").write_text("")
        replayed = cli("dlq", "replay", "-c", str(config), letter["id"], "--timeout", "60s")
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        done = folder / "drop" / "done" / "order.json"
        wait_until(lambda: done.exists() and not failed.exists(), timeout=30, what="the file moved to done/")
        assert not failed.with_name("order.json.error.json").exists()
        assert done.read_text() == '{"fail": true}'
        assert not (folder / "drop" / "order.json").exists()  # (not put back to run again)
    finally:
        assert daemon.stop() == 0
