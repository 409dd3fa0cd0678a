"""``eventswarm init``: a commented starter config and a function skeleton to edit."""

from __future__ import annotations

import json
import os
from pathlib import Path

HANDLER = '''#!/usr/bin/env python3
"""An eventswarm function: one batch of events on stdin (and in the file $EVENTSWARM_INPUT).

Exit 0 and the batch is acknowledged; exit non-zero and it is retried, then kept as a dead letter.
What it prints on stdout and stderr is kept with the invocation: `eventswarm logs ID`.
"""
import json
import os
import sys

batch = json.load(sys.stdin)
for event in batch["events"]:
    # event is a CloudEvent: id, source, type, time, subject, data (or data_base64), extensions
    print(json.dumps({"id": event["id"], "type": event["type"], "data": event.get("data")}))
print(f"{len(batch['events'])} events in batch {os.environ['EVENTSWARM_BATCH_ID']}", file=sys.stderr)
'''

DOCKERFILE = '''# Build: docker build -t hello-fn:latest functions/hello
FROM python:3.12-slim
COPY handler.py /handler.py
USER 65534
ENTRYPOINT ["python3", "/handler.py"]
'''

CONFIG = '''# eventswarm: event streams to container functions. Every key: docs/configuration.md in the project,
# or `eventswarm schema`. Check this file with `eventswarm validate -c {config}`.

[daemon]
state = {state}        # invocation records, logs, dead letters, checkpoints (paths are relative to this file's folder)
listen = "127.0.0.1:8080"          # webhooks, the status page (/), /metrics, /v1 (a token is needed beyond loopback:
                                   # api_token_env = "EVENTSWARM_TOKEN")

[executor]
kind = "{executor}"{executor_note}
max_in_flight = 8                  # invocations at once, all triggers together

[functions.hello]
{function}
timeout = "30s"                    # then SIGTERM, 5 s later SIGKILL; the attempt fails
env = {{ GREETING = "hello" }}

[triggers.hello]
function = "hello"
source = {{ kind = "webhook", path = "/hooks/hello" }}    # curl -d '{{"n": 1}}' http://127.0.0.1:8080/hooks/hello
batch = {{ max_events = 100, max_wait = "200ms" }}        # events per invocation, and how long a batch waits for more
retry = {{ max_attempts = 5 }}                           # then the events are kept as dead letters: eventswarm dlq list

# Other sources, for later:
# source = {{ kind = "kafka", bootstrap_servers = ["127.0.0.1:9092"], topics = ["orders"], group_id = "eventswarm" }}
# source = {{ kind = "file", path = "./drop", patterns = ["*.json"], on_success = "move:done/" }}
# source = {{ kind = "ethereum", rpc_url = "http://127.0.0.1:8545", addresses = ["0x…"],
#            events = ["Transfer(address indexed from, address indexed to, uint256 value)"], confirmations = 12 }}
'''


def docker_answers() -> bool:
    """Whether a Docker engine answers here (then functions run as containers)."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def write(folder: Path, executor: str, force: bool) -> list[Path]:
    """Write the starter files into ``folder``; raises ``FileExistsError`` naming a file that would be replaced."""
    folder = folder.resolve()
    config = folder / "eventswarm.toml"
    if executor == "process":
        handler = folder / "functions" / "hello.py"
        files = {config: "", handler: HANDLER}
        function = ('command = ["python3", "functions/hello.py"]   # a local process (no Docker): a program and its '
                    'arguments,\n                                                # run in this file\'s folder (workdir)')
        note = "                 # functions run as local processes (no Docker engine answered)"
    else:
        handler = folder / "functions" / "hello" / "handler.py"
        files = {config: "", handler: HANDLER, handler.parent / "Dockerfile": DOCKERFILE}
        function = ('image = "hello-fn:latest"          # docker build -t hello-fn:latest functions/hello\n'
                    'memory = "256MiB"                  # each container: no network, capabilities dropped')
        note = "                  # one container per batch on this engine ('swarm' on a Swarm manager)"
    files[config] = CONFIG.format(config=config, state=json.dumps("sqlite:///eventswarm.db"), executor=executor,
                                  executor_note=note, function=function)
    if not force:
        existing = [path for path in files if path.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists (--force to replace it)")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    os.chmod(handler, 0o755)
    return list(files)
