"""The deployment: the Dockerfile on a local base, deploy/'s stack on the Swarm, a webhook in, a Swarm job out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support import ROOT, free_port, post, wait_until

STACK = f"eventswarm-test-{os.getpid()}"


@pytest.fixture(scope="module")
def daemon_image(docker_engine) -> str:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "daemon-image.sh"), "eventswarm:test"], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=1500)
    if done.returncode != 0:
        pytest.fail(f"scripts/daemon-image.sh failed:\n{done.stdout}\n{done.stderr}")
    return "eventswarm:test"


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def docker(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_the_stack_runs_the_daemon_which_runs_a_webhook_as_a_swarm_job(tmp_path: Path, daemon_image: str):
    port = free_port()
    config = tmp_path / "eventswarm.toml"
    config.write_text((ROOT / "deploy" / "eventswarm.toml").read_text())
    env = {"EVENTSWARM_IMAGE": daemon_image, "EVENTSWARM_PORT": str(port), "EVENTSWARM_CONFIG_FILE": str(config)}
    docker("stack", "deploy", "-c", str(ROOT / "deploy" / "stack.yml"), STACK, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: (get_json(f"{base}/readyz") or {}).get("ready"), timeout=180, what="the daemon in the stack")
        assert get_json(f"{base}/v1/status")["executor"] == "swarm"
        status, _, body = post(f"{base}/hooks/echo", b'{"hello": "stack"}')
        assert status == 202
        event_id = json.loads(body)["id"]

        def ran():
            records = get_json(f"{base}/v1/invocations?trigger=echo&status=succeeded") or []
            return [r for r in records if event_id in r["event_ids"]]

        record = wait_until(ran, timeout=120, what="the function to run")[0]
        logs = get_json(f"{base}/v1/invocations/{record['id']}/logs")
        # echo prints its input document: on a Swarm job, the input file (a Swarm config).
        document = json.loads(logs["stdout"])
        assert document["events"][0]["data"] == {"hello": "stack"} and document["batch_id"] == record["id"]
        services = docker("service", "ls", "--format", "{{.Name}}").stdout.split()
        assert f"{STACK}_daemon" in services
        assert record["executor_ref"] and record["executor_ref"] not in services  # the job ran and was removed
    finally:
        docker("stack", "rm", STACK, check=False)
        wait_until(lambda: not docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}").stdout.strip(),
                   timeout=120, what="the stack's containers to go")
        docker("volume", "rm", f"{STACK}_state", check=False)
