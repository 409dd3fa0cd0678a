"""The deployment: the Dockerfile on a local base, deploy/'s stack on the Swarm, a webhook in, a Swarm job out."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

from tests.support import BUSYBOX, ROOT, free_port, post, wait_until

STACK = f"eventswarm-test-{os.getpid()}"


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


def test_the_replicated_stack_runs_3_replicas_on_one_postgres_database(tmp_path: Path, daemon_image: str,
                                                                       postgres_database: str):
    """deploy/stack-replicated.yml on this single-node Swarm: 3 replicas (one port per slot, as its comment says for
    a single node) on the test's database; each takes webhooks and runs them, and each shows all three."""
    stack = f"{STACK}-replicated"
    prefix = 2000 + free_port() % 4000  # (slot n listens on prefix * 10 + n: from 20001 to 59993)
    config = tmp_path / "eventswarm.toml"
    config.write_text((ROOT / "deploy" / "eventswarm.toml").read_text())
    env = {"EVENTSWARM_IMAGE": daemon_image, "EVENTSWARM_PORT": f"{prefix}{{{{.Task.Slot}}}}",
           "EVENTSWARM_CONFIG_FILE": str(config), "EVENTSWARM_STATE": postgres_database,
           "EVENTSWARM_REPLICAS_PER_NODE": "3"}
    docker("stack", "deploy", "-c", str(ROOT / "deploy" / "stack-replicated.yml"), stack, env=env)
    bases = [f"http://127.0.0.1:{prefix}{slot}" for slot in (1, 2, 3)]
    try:
        for base in bases:
            wait_until(lambda base=base: (get_json(f"{base}/readyz") or {}).get("ready"), timeout=180,
                       what=f"the replica at {base}")
        names = {f"{stack}_daemon.{slot}" for slot in (1, 2, 3)}
        for base in bases:
            replicas = get_json(f"{base}/v1/status")["replicas"]
            assert {r["id"] for r in replicas} == names and all(r["state"] == "live" for r in replicas)
        accepted = {}
        for n, base in enumerate(bases * 3):
            status, _, body = post(f"{base}/hooks/echo", json.dumps({"n": n}).encode())
            assert status == 202
            accepted[json.loads(body)["id"]] = base

        def ran() -> set[str]:
            records = get_json(f"{bases[0]}/v1/invocations?trigger=echo&status=succeeded&limit=1000") or []
            return {event for r in records for event in r["event_ids"]}

        wait_until(lambda: set(accepted) <= ran(), timeout=180, what="every replica's webhooks to run")
        records = get_json(f"{bases[0]}/v1/invocations?trigger=echo&status=succeeded&limit=1000")
        assert {r["replica"] for r in records} == names  # each replica ran what it accepted
    finally:
        docker("stack", "rm", stack, check=False)
        wait_until(lambda: not docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={stack}").stdout.strip(),
                   timeout=120, what="the stack's containers to go")


def test_the_daemons_image_beside_the_engines_socket_runs_warm_and_cold_functions(tmp_path: Path, daemon_image: str):
    """The daemon in its own container with the engine's socket mounted, as deploy/ runs it: the engine does not see
    the container's files, so the warm runner and the cold input files are copied in (they were bind-mounted from
    paths the engine's host lacks: every warm batch failed). A synchronous webhook answers through each."""
    port = free_port()
    config = tmp_path / "eventswarm.toml"
    config.write_text(f"""
[daemon]
listen = "127.0.0.1:{port}"
state = "sqlite:////var/lib/eventswarm/state.db"

[executor]
kind = "docker"

[functions.warm]
image = "{BUSYBOX}"
command = ["sh", "-c", 'echo "warm $(cat "$EVENTSWARM_INPUT" | grep -c batch_id) $(cat | grep -c batch_id)"']
warm = {{ min_idle = 1, max = 2 }}

[functions.cold]
image = "{BUSYBOX}"
command = ["sh", "-c", 'echo "cold $(cat "$EVENTSWARM_INPUT" | grep -c batch_id)"']

[triggers.warm]
function = "warm"
source = {{ kind = "webhook", path = "/hooks/warm", mode = "sync" }}

[triggers.cold]
function = "cold"
source = {{ kind = "webhook", path = "/hooks/cold", mode = "sync" }}
""")
    name = f"eventswarm-test-image-{os.getpid()}"
    docker("run", "-d", "--name", name, "--network", "host", "--user", "0",
           "-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", f"{config}:/etc/eventswarm/eventswarm.toml:ro",
           daemon_image, "run")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: (get_json(f"{base}/readyz") or {}).get("ready"), timeout=120,
                   what="the daemon in its container", )
        for _ in range(3):  # (the same warm container, batch after batch)
            status, _, body = post(f"{base}/hooks/warm", b'{"hello": "warm"}')
            assert (status, body) == (200, b"warm 1 1\n"), (status, body, docker("logs", name, check=False).stderr[-2000:])
        status, _, body = post(f"{base}/hooks/cold", b'{"hello": "cold"}')
        assert (status, body) == (200, b"cold 1\n"), (status, body, docker("logs", name, check=False).stderr[-2000:])
        logs = docker("logs", name).stderr
        assert "does not see this process's files" in logs and "Traceback" not in logs, logs[-2000:]
        docker("stop", "-t", "60", name)  # SIGTERM, as a stack's update or removal sends it
        assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        left = docker("ps", "-aq", "--filter", "label=io.eventswarm.function=warm").stdout.split()
        assert not left, f"the daemon left its warm containers behind: {left}"
    finally:
        docker("rm", "-f", name, check=False)
        for container in docker("ps", "-aq", "--filter", "label=io.eventswarm.function=warm", check=False).stdout.split():
            docker("rm", "-f", "-v", container, check=False)  # (a failed test's leftovers, and their runner volume)
