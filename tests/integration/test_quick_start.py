"""The README's quick start: the example config runs the echo function in a container for a curl."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import docker

from dispatcher.store import Database
from tests.support import ROOT, DaemonProcess, free_port, post


def test_the_example_config_echoes_a_webhook_through_a_container(tmp_path, docker_engine):
    port = free_port()
    state = tmp_path / "eventswarm.db"
    env = {"EVENTSWARM_DAEMON__LISTEN": f"127.0.0.1:{port}", "EVENTSWARM_DAEMON__STATE": f"sqlite:///{state}"}
    daemon = DaemonProcess(ROOT / "config.example.toml", port, tmp_path / "daemon.log", env).start()
    try:
        # What `curl -d '{"hello":"world"}' localhost:8080/hooks/echo` sends: a form content type.
        status, _, body = post(f"http://127.0.0.1:{port}/hooks/echo", b'{"hello":"world"}',
                               {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200, body
        echoed = json.loads(body)
        assert echoed["trigger"] == "echo" and echoed["events"][0]["data"] == {"hello": "world"}
        listed = subprocess.run([sys.executable, "-m", "dispatcher", "invocations", "-c", str(ROOT / "config.example.toml")],
                                capture_output=True, text=True, timeout=60,
                                env={"EVENTSWARM_DAEMON__STATE": f"sqlite:///{state}", "PATH": "/usr/bin:/bin"})
        assert listed.returncode == 0, listed.stderr
        assert echoed["batch_id"] in listed.stdout and "succeeded" in listed.stdout
        ref = Database(str(state)).invocation(echoed["batch_id"]).executor_ref
        client = docker.from_env()
        try:
            assert ref and not client.containers.list(all=True, sparse=True, filters={"id": ref})
        finally:
            client.close()
    finally:
        assert daemon.stop() == 0


OUTSIDE_MAKE = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
"""(`make test` runs the tests inside make: a make they start must not think it is a sub-make.)"""


def test_make_run_installs_and_starts_only_what_the_example_needs():
    """The README's first command: the project (without the dev extra), the runner, the engine and the images;
    none of the test suite's services (Kafka, the Ethereum node, chromium, PostgreSQL, npm, stunnel)."""
    plan = subprocess.run(["make", "--no-print-directory", "-n", "-B", "run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=OUTSIDE_MAKE)
    assert plan.returncode == 0, plan.stderr
    steps = plan.stdout
    assert "scripts/services.sh" in steps and "scripts/images.sh" in steps and "scripts/runner.sh" in steps
    assert steps.strip().endswith("eventswarm run -c config.example.toml")
    assert "[dev]" not in steps
    for service in ("kafka.sh", "ethereum.sh", "browser.sh", "postgres.sh", "senders.sh", "tools.sh"):
        assert service not in steps, service
    for script in ("services.sh", "images.sh", "runner.sh"):
        text = (ROOT / "scripts" / script).read_text().lower()
        assert not [word for word in ("kafka", "tansu", "anvil", "chromium", "postgres", "npm") if word in text], script
    named = set(re.findall(r"`make ([a-z-]+)`", (ROOT / "config.example.toml").read_text()))
    assert named, "the example names no make target"
    for target in named:  # every target the example's comments name exists
        assert subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, timeout=60,
                              env=OUTSIDE_MAKE).returncode == 0, target
