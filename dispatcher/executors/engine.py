"""What every executor on a Docker engine shares (docker, its warm pools, swarm): the client, the labels of what
eventswarm made and their removal, the sweeper that removes containers off a batch's path, engine errors as
``ExecutorError``, and the worker-thread runner of invocations (the SDK is blocking)."""

from __future__ import annotations

import os
import queue
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import docker
import docker.errors
import docker.tls
import requests.exceptions

from dispatcher.config import ExecutorConfig
from dispatcher.errors import ExecutorError
from dispatcher.executors.base import LABEL_MANAGED, LABEL_OWNER, ExecutorDefaults, Invocation, Result

T = TypeVar("T")

ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)
"""What a call to the engine raises when the engine refuses or cannot be reached."""


def make_client(config: ExecutorConfig, timeout: int = 60, pool: int = 10) -> docker.DockerClient:
    """A client for ``executor.docker_host`` with its TLS settings (default: ``DOCKER_HOST`` and Docker's TLS
    variables, then the local socket). Not yet checked."""
    if not config.docker_host:
        return docker.DockerClient.from_env(timeout=timeout, max_pool_size=pool)
    tls: docker.tls.TLSConfig | bool = False
    if config.tls_ca or config.tls_cert:
        tls = docker.tls.TLSConfig(client_cert=(config.tls_cert, config.tls_key) if config.tls_cert else None,
                                   ca_cert=config.tls_ca or None, verify=bool(config.tls_ca))
    if tls:
        return _TLSClient(base_url=config.docker_host, tls=tls, timeout=timeout, max_pool_size=pool)
    return docker.DockerClient(base_url=config.docker_host, timeout=timeout, max_pool_size=pool)


class _EngineAPI(docker.APIClient):  # type: ignore[misc]
    """The SDK's client, except that the engine's CA is ``tls_ca`` whatever the environment says: requests lets
    ``REQUESTS_CA_BUNDLE`` (or ``CURL_CA_BUNDLE``) replace the CA it was given (psf/requests#3829)."""

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None or verify is True:
            settings["verify"] = self.verify
        return settings


class _TLSClient(docker.DockerClient):  # type: ignore[misc]
    def __init__(self, **kwargs: Any) -> None:  # (DockerClient's own __init__ only makes its APIClient)
        self.api = _EngineAPI(**kwargs)


def where(config: ExecutorConfig) -> str:
    """The engine's address as the daemon looks for it (for messages)."""
    return config.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


async def connect(config: ExecutorConfig) -> docker.DockerClient:
    """A client for ``executor.docker_host`` (``make_client``), checked with a ping."""
    try:
        client = await anyio.to_thread.run_sync(lambda: make_client(config, pool=config.max_in_flight + 4))
        await anyio.to_thread.run_sync(client.api.ping)
    except ENGINE_ERRORS as exc:
        raise ExecutorError(f"cannot reach the Docker engine at {where(config)}: {exc} (is dockerd running, and may "
                            "this user use it? executor.docker_host or DOCKER_HOST say where it is; a remote engine "
                            "needs tls_ca, tls_cert and tls_key)") from exc
    return client


def missing_images(config: ExecutorConfig, images: list[str]) -> list[str]:
    """Of ``images``, those the engine does not have (``validate``); ``ExecutorError`` when it cannot be asked."""
    try:
        client = make_client(config, timeout=10)
    except ENGINE_ERRORS as exc:
        raise ExecutorError(f"cannot reach the Docker engine at {where(config)}: {exc}") from exc
    missing = []
    try:
        for image in images:
            try:
                client.api.inspect_image(image)
            except docker.errors.ImageNotFound:
                missing.append(image)
    except ENGINE_ERRORS as exc:
        raise ExecutorError(f"cannot reach the Docker engine at {where(config)}: {exc}") from exc
    finally:
        client.close()
    return missing


def labels(owner: str | None) -> dict[str, list[str]]:
    """The label filter for what eventswarm made: ``owner``'s only, or every daemon's."""
    return {"label": [f"{LABEL_MANAGED}=true"] + ([f"{LABEL_OWNER}={owner}"] if owner else [])}


def remove_containers(api: Any, filters: dict[str, list[str]]) -> int:
    """Remove the containers ``filters`` select; how many went. One already gone is not an error, nor one whose
    removal is under way (the engine answers 409: Swarm removes a job's task container as its service goes, and a
    replica taking over removes what a gone one left while that one, restarted, sweeps its own)."""
    removed = 0
    for container in api.containers(all=True, filters=filters):
        try:
            api.remove_container(container["Id"], force=True, v=True)  # (a warm container's copied runner is a volume)
            removed += 1
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            removed += 1  # (going already)
    return removed


class Sweeper:
    """Removes containers off the invocation's path: a removal costs the engine ~10 ms that the batch's result need
    not wait for. Bounded: past ``limit`` waiting, the caller removes its own; ``close`` removes what is left (and
    what a crash leaves, ``gc`` at the next start does)."""

    def __init__(self, api: Any, limit: int = 256) -> None:
        self.api = api
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=limit)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def remove(self, container_id: str) -> None:
        with self._lock:
            if self._thread is None:
                # (a thread: the SDK blocks; ``close`` ends and joins it)
                self._thread = threading.Thread(target=self._sweep, name="container-sweeper", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(container_id)
        except queue.Full:
            self.remove_now(container_id)

    def remove_now(self, container_id: str) -> None:
        try:
            self.api.remove_container(container_id, force=True, v=True)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            pass  # gc at the next start sweeps it

    def _sweep(self) -> None:
        while (container_id := self._queue.get()) is not None:
            self.remove_now(container_id)

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=120)


def engine_error(exc: Exception, what: str) -> ExecutorError:
    """An SDK error as an ``ExecutorError``: client errors (bad image, bad spec) are permanent."""
    if isinstance(exc, docker.errors.ImageNotFound):
        return ExecutorError(f"{what}: image not found ({exc.explanation})", temporary=False)
    if isinstance(exc, docker.errors.APIError) and exc.status_code is not None and 400 <= exc.status_code < 500 \
            and exc.status_code not in (404, 409, 429):
        return ExecutorError(f"{what}: {exc.explanation or exc}", temporary=False)
    return ExecutorError(f"{what}: {exc}", temporary=True)


class EngineExecutor(ExecutorDefaults):
    """What the docker and swarm executors share: the engine client, and invocations run in worker threads."""

    kind = "engine"

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self._limiter = anyio.CapacityLimiter(config.max_in_flight + 2)
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise ExecutorError(f"the {self.kind} executor is not started")
        return self._client

    async def ping(self) -> bool:
        try:
            return bool(await anyio.to_thread.run_sync(self.client.api.ping))
        except Exception:
            return False

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()

    async def run(self, invocation: Invocation) -> Result:
        return await self._in_thread(self._run, invocation)

    async def _in_thread(self, work: Callable[[Invocation, threading.Event], T], invocation: Invocation) -> T:
        """``work`` in a worker thread; cancelled, the thread is told (it stops what runs and cleans up on its own)."""
        cancelled = threading.Event()
        try:
            return await anyio.to_thread.run_sync(work, invocation, cancelled, limiter=self._limiter,
                                                  abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    def _run(self, invocation: Invocation, cancelled: threading.Event) -> Result:
        raise NotImplementedError


class AttachStream:
    """Demultiplexes Docker's attach stream (a container without a TTY): 8-byte headers (stream, 0, 0, 0, a 4-byte
    big-endian size), then the payload; each whole frame goes to ``sink(stream, payload)`` (1 stdout, 2 stderr)."""

    __slots__ = ("_buffer", "_sink")

    def __init__(self, sink: Callable[[int, bytes], None]) -> None:
        self._buffer = bytearray()
        self._sink = sink

    def feed(self, chunk: bytes) -> None:
        buffer = self._buffer
        buffer += chunk
        start = 0
        while len(buffer) - start >= 8:
            size = struct.unpack_from(">I", buffer, start + 4)[0]
            if len(buffer) - start < 8 + size:
                break
            self._sink(buffer[start], bytes(buffer[start + 8:start + 8 + size]))
            start += 8 + size
        del buffer[:start]
