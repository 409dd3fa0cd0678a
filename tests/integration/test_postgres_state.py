"""A daemon whose state is on PostgreSQL (state = "postgresql://…"), through the real config, server and CLI:
it takes webhooks and runs them, the CLI reads its records from the database, a second daemon on the same
database is refused, and after a kill -9 a restart takes over and runs what was accepted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import base_config, free_port, post, wait_until


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "dispatcher", *args, "-c", str(config)], capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_a_daemon_on_postgres_runs_webhooks_and_the_cli_reads_them(tmp_path, daemon_process, postgres_database):
    marks = tmp_path / "ran"
    doc = base_config(tmp_path, executor="process", port=free_port())
    doc["daemon"]["state"] = postgres_database
    doc["functions"]["f"] = {"command": ["sh", "-c", f"cat > /dev/null; echo ran >> {marks}; echo done"]}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "batch": {"max_events": 5, "max_wait": "50ms"}}
    config = tmp_path / "eventswarm.toml"
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{daemon.port}/hooks/t"
    accepted = {json.loads(post(url, json.dumps({"n": i}).encode())[2])["id"] for i in range(20)}

    def ran() -> set[str]:
        listed = json.loads(cli(config, "invocations", "--json", "--status", "succeeded").stdout or "[]")
        return {event for record in listed for event in record["event_ids"]}

    wait_until(lambda: accepted <= ran(), timeout=60, what="every accepted event to run, as the CLI reads it")
    some = json.loads(cli(config, "invocations", "--json").stdout)[0]["id"]
    logs = cli(config, "logs", some[:10])
    assert logs.returncode == 0 and "done" in logs.stdout

    second = cli(config, "run")
    assert second.returncode == 2 and "is in use by a daemon, pid" in second.stderr, second.stderr
    assert daemon.stop() == 0


def test_after_a_kill_9_a_restart_on_the_same_database_runs_what_was_accepted(tmp_path, daemon_process,
                                                                              postgres_database):
    doc = base_config(tmp_path, executor="process", port=free_port())
    doc["daemon"]["state"] = postgres_database
    doc["functions"]["f"] = {"command": ["sh", "-c", "sleep 300"]}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "batch": {"max_events": 1}, "max_in_flight": 2}
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{daemon.port}/hooks/t"
    accepted = {json.loads(post(url, json.dumps({"n": i}).encode())[2])["id"] for i in range(4)}
    config = tmp_path / "eventswarm.toml"
    wait_until(lambda: len(json.loads(cli(config, "invocations", "--json", "--status", "running").stdout)) == 2,
               timeout=30, what="two invocations running")
    daemon.kill()
    doc["functions"]["f"]["command"] = ["sh", "-c", "cat > /dev/null"]
    restarted = daemon_process(doc).start()  # the lock went with the killed daemon's connection
    wait_until(lambda: accepted <= {e for r in json.loads(cli(config, "invocations", "--json", "--status",
                                                                  "succeeded").stdout) for e in r["event_ids"]},
               timeout=60, what="every accepted event to run after the restart")
    interrupted = json.loads(cli(config, "invocations", "--json", "--status", "failed").stdout)
    assert len(interrupted) == 2 and all("interrupted" in r["error"] for r in interrupted)
    assert restarted.stop() == 0
