"""The three-node Swarm of scripts/swarm-cluster.sh, as the tests drive it: each node's engine over TLS, the
node containers on the host engine (to kill and start them again), and the shared folder every node mounts."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import threading
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
GATEWAY = "10.213.7.1"
"""This host, as the nodes reach it (the cluster network's gateway)."""


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

    def cli(self, *args: str, node: str = MANAGER, env: dict[str, str] | None = None, check: bool = True,
            stdin: Any = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The docker CLI against ``node``'s engine, over TLS."""
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, stdin=stdin,
                              env={**os.environ, "DOCKER_HOST": f"tcp://{NODES[node]}:2376", "DOCKER_TLS_VERIFY": "1",
                                   "DOCKER_CERT_PATH": str(CERTS), **(env or {})})
        if check:
            assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
        return done

    def load(self, image: str, tmp: Path) -> None:
        """The host engine's ``image`` loaded into every node, at once (no registry: docker save, docker load)."""
        archive = tmp / "image.tar"
        subprocess.run(["docker", "save", "-o", str(archive), image], check=True, capture_output=True, timeout=300)
        failures: list[BaseException] = []

        def load_into(node: str) -> None:
            try:
                with archive.open("rb") as data:
                    self.cli("load", "-q", node=node, stdin=data)
            except BaseException as exc:  # (reported by the test's thread below)
                failures.append(exc)

        loads = [threading.Thread(target=load_into, args=(node,)) for node in NODES]
        for thread in loads:
            thread.start()
        for thread in loads:
            thread.join()
        archive.unlink()
        if failures:
            raise failures[0]

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
        """``docker start`` of the node's container (nothing if it runs)."""
        subprocess.run(["docker", "start", node], check=True, capture_output=True, timeout=60)


class Forwarder:
    """A TCP forwarder the test owns, from ``listen`` (an address the nodes reach, e.g. the gateway) to ``target`` on
    this host's loopback (PostgreSQL listens there only). Threads, one per connection, 64 connections at most;
    ``close`` ends them all."""

    LIMIT = 64

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self._server = socket.create_server(listen)
        self.address = self._server.getsockname()
        self._target = target
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="forwarder").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self._closed or len(self._sockets) >= 2 * self.LIMIT:
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(self._target, timeout=10)
                except OSError:
                    client.close()
                    continue
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in selector.select(timeout=1):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
                if self._closed:
                    return
        except OSError:
            return
        finally:
            selector.close()
            with self._lock:
                self._sockets -= {a, b}
            a.close()
            b.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
