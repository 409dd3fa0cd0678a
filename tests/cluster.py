"""The three-node Swarm of scripts/swarm-cluster.sh, as the tests drive it: each node's engine over TLS, the
node containers on the host engine (to kill and start them again), and the shared folder every node mounts."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker

from dispatcher.config import ExecutorConfig
from dispatcher.executors.engine import make_client

CERTS = Path(os.environ.get("EVENTSWARM_CLUSTER_CERTS", "/var/cache/eventswarm/cluster-certs"))
SHARED = Path(os.environ.get("EVENTSWARM_CLUSTER_SHARED", "/var/tmp/eventswarm-cluster-shared"))
NODES = {"eventswarm-node-1": "10.213.7.10", "eventswarm-node-2": "10.213.7.11", "eventswarm-node-3": "10.213.7.12"}
MANAGER = "eventswarm-node-1"
WORKERS = ("eventswarm-node-2", "eventswarm-node-3")
MANAGED = {"label": ["io.eventswarm.managed=true"]}


class Cluster:
    manager_url = f"tcp://{NODES[MANAGER]}:2376"
    shared = SHARED

    def executor(self, **more: Any) -> dict[str, Any]:
        """The ``[executor]`` table of a daemon that runs its functions on this Swarm."""
        return {"kind": "swarm", "docker_host": self.manager_url, "tls_ca": str(CERTS / "ca.pem"),
                "tls_cert": str(CERTS / "cert.pem"), "tls_key": str(CERTS / "key.pem"), "network": "host", **more}

    def engine(self, node: str, timeout: int = 10) -> docker.DockerClient:
        """A client of ``node``'s engine, made as the daemon makes its own."""
        config = ExecutorConfig(**{**self.executor(), "docker_host": f"tcp://{NODES[node]}:2376"})
        return make_client(config, timeout=timeout)

    def leftovers(self, node: str) -> list[str]:
        """What eventswarm made that is still on ``node``: containers, and (on the manager) services and configs."""
        client = self.engine(node)
        try:
            found = [f"container {c['Names'][0]}" for c in client.api.containers(all=True, filters=MANAGED)]
            if node == MANAGER:
                found += [f"service {s['Spec']['Name']}" for s in client.api.services(filters=MANAGED)]
                found += [f"config {c['Spec']['Name']}" for c in client.api.configs(filters=MANAGED)]
            return found
        finally:
            client.close()

    @contextlib.contextmanager
    def labelled(self, labels: dict[str, dict[str, str]]) -> Iterator[None]:
        """Node labels (``{node: {name: value}}``) set on the manager for the time of a ``with``, then removed."""
        client = self.engine(MANAGER)

        def relabel(hostname: str, change: Any) -> None:
            found = next(n for n in client.api.nodes() if n["Description"]["Hostname"] == hostname)
            spec = dict(found["Spec"])
            spec["Labels"] = change(dict(spec.get("Labels") or {}))
            client.api.update_node(found["ID"], found["Version"]["Index"], spec)

        try:
            for hostname, more in labels.items():
                relabel(hostname, lambda old, more=more: {**old, **more})
            yield
        finally:
            for hostname, more in labels.items():
                relabel(hostname, lambda old, more=more: {k: v for k, v in old.items() if k not in more})
            client.close()

    def node_states(self) -> dict[str, str]:
        """Each node's state as the manager sees it (``ready``, ``down``)."""
        client = self.engine(MANAGER)
        try:
            return {n["Description"]["Hostname"]: n["Status"]["State"] for n in client.api.nodes()}
        finally:
            client.close()

    def kill(self, node: str) -> None:
        """``docker kill`` of the node's container: its dockerd and every task on it go at once."""
        subprocess.run(["docker", "kill", node], check=True, capture_output=True, timeout=60)

    def start(self, node: str) -> None:
        subprocess.run(["docker", "start", node], check=True, capture_output=True, timeout=60)
