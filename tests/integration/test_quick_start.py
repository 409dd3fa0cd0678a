"""The README's quick start: the example config runs the echo function in a container for a curl."""

from __future__ import annotations

import json
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
