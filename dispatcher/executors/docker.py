"""The docker executor: one container per batch on one Docker engine, through the Docker SDK.

The SDK is blocking, so each invocation runs in a worker thread (bounded by ``max_in_flight``).
One attach socket carries the input document to the function's stdin and its stdout/stderr
back, so a run costs what ``containers.run`` costs: create, attach, start, wait, remove.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import docker
import docker.errors
import requests.exceptions

from dispatcher.config import ExecutorConfig, FunctionConfig
from dispatcher.errors import ExecutorError
from dispatcher.executors.base import (
    INPUT_PATH,
    LIVE,
    STOP_GRACE,
    Capture,
    Invocation,
    Phases,
    Result,
    environment,
    hardened_host_config,
    tar_file,
)
from dispatcher.executors.engine import (
    AttachStream,
    EngineExecutor,
    Sweeper,
    connect,
    engine_error,
    labels,
    remove_containers,
)
from dispatcher.executors.sight import Sight
from dispatcher.executors.warm import WarmPools

_TICK = 0.2
"""How often a running invocation's thread looks for a cancellation."""


class DockerExecutor(EngineExecutor):
    kind = "docker"

    def __init__(self, config: ExecutorConfig, scratch_dir: str) -> None:
        super().__init__(config)
        self.scratch = Path(scratch_dir)
        self._input_mode = config.input
        self._warm: WarmPools | None = None
        self._stoppers: set[threading.Thread] = set()
        """Threads stopping a container (a timeout, a shutdown): ``close`` waits for them."""
        self._live: set[str] = set()
        """Cold containers made and not yet handed to the sweeper (or kept): ``close`` removes those still here, so a
        batch cancelled at shutdown, whose worker thread is abandoned, leaves no container when the process exits
        before that thread is done."""

    async def start(self) -> None:
        if self._client is not None:
            return
        client = self._client = await connect(self.config)
        if self._input_mode in ("auto", "bind"):
            self.scratch.mkdir(parents=True, exist_ok=True)
        self.sweeper = Sweeper(client.api)
        # (input = "auto": the input files and the warm runner are bind-mounted where the engine sees them, asked of
        # the engine at their first use; else copied in)
        self.sight = Sight(client.api)
        self._warm = WarmPools(client.api, self.config, self.sweeper, self.sight)

    @property
    def warm(self) -> WarmPools:
        if self._warm is None:
            raise ExecutorError("the docker executor is not started")
        return self._warm

    async def prepare(self, functions: Mapping[str, FunctionConfig], owner: str) -> None:
        """Start prewarming the warm functions' pools (at start and after a reload); retire the pools of the others."""
        await anyio.to_thread.run_sync(self.warm.prepare, functions, owner)

    def pools(self) -> list[dict[str, Any]]:
        """Each warm pool's size, idle containers, starts and replacements (for status and metrics)."""
        return self._warm.stats() if self._warm is not None else []

    def _stop(self, api: Any, container_id: str, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. A thread of its own (the SDK's ``stop`` blocks for up to
        ``grace``, while the batch's thread goes on reading the container's output to its end); ``close`` joins it."""
        thread = threading.Thread(target=_stop_container, args=(api, container_id, grace, self._stoppers),
                                  daemon=True, name=f"stop-{container_id[:12]}")
        self._stoppers.add(thread)
        thread.start()

    async def close(self) -> None:
        for thread in list(self._stoppers):  # (each ends within its grace and the engine's answer)
            await anyio.to_thread.run_sync(thread.join, STOP_GRACE + 30)
        if self._warm is not None:
            await anyio.to_thread.run_sync(self._warm.close)
            await anyio.to_thread.run_sync(self.sweeper.close)
            for container_id in list(self._live):
                await anyio.to_thread.run_sync(self.sweeper.remove_now, container_id)
        await super().close()

    async def gc(self, owner: str | None) -> int:
        return await anyio.to_thread.run_sync(remove_containers, self.client.api, labels(owner), limiter=self._limiter)

    # -- in a worker thread -----------------------------------------------------------------

    def _run(self, invocation: Invocation, cancelled: threading.Event) -> Result:
        if invocation.function.warm is not None:
            return self.warm.run(invocation, cancelled)
        phases = Phases("prepare input")
        api = self.client.api
        function = invocation.function
        mode = self._input_mode
        if mode == "auto":  # (decided once, by the engine: a failed probe decides nothing)
            try:
                mode = "bind" if self.sight.sees_folder(self.scratch, function.image, invocation.owner) else "copy"
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise engine_error(exc, f"cannot start a container for {function.image!r}") from exc
            self._input_mode = mode
        if mode == "copy" and function.read_only:
            mode = "stdin"  # a read-only root file system refuses the copy: stdin alone carries the input
        input_file: Path | None = None
        binds: list[str] = []
        if mode == "bind":
            input_file = self.scratch / f"{invocation.id}.json"
            input_file.write_bytes(invocation.input)
            binds.append(f"{input_file}:{INPUT_PATH}:ro")
        env = environment(invocation, INPUT_PATH if mode in ("bind", "copy") else None)
        host_config = hardened_host_config(api, self.config.network, function, binds)
        started = time.monotonic()
        container_id: str | None = None
        ok = False
        try:
            phases.step("start container")
            try:
                created = api.create_container(
                    function.image,
                    command=list(invocation.args) if (invocation.args or function.command) else None,
                    entrypoint=function.command or None,
                    environment=env,
                    user=function.user or None,
                    labels=invocation.labels,
                    stdin_open=True,
                    host_config=host_config,
                    name=f"eventswarm-{invocation.id}",
                )
                container_id = created["Id"]
                self._live.add(container_id)
                if mode == "copy":
                    api.put_archive(container_id, "/", tar_file(INPUT_PATH, invocation.input))
                attached = api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
                api.start(container_id)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise engine_error(exc, f"cannot start a container for {function.image!r}") from exc
            phases.step("run")
            sock: socket.socket = getattr(attached, "_sock", attached)
            try:
                stdout, stderr, timed_out, interrupted = self._converse(
                    api, container_id, sock, invocation.input, started + function.timeout, cancelled, invocation.id)
            finally:
                if attached is not sock:
                    attached.close()  # the SocketIO wrapper holds a reference that keeps the socket open
                sock.close()
            phases.step("collect output")
            try:
                exit_code = int(api.wait(container_id, timeout=STOP_GRACE + 30)["StatusCode"])
                oom = bool(api.inspect_container(container_id)["State"].get("OOMKilled"))
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise engine_error(exc, "lost the container") from exc
            result = Result(exit_code=exit_code, stdout=stdout.getvalue(), stderr=stderr.getvalue(),
                            timed_out=timed_out, oom_killed=oom, ref=container_id,
                            duration=time.monotonic() - started, phases=phases.step(None))
            if interrupted:
                result.notes.append("stopped: the daemon shut down")
            ok = result.ok
            return result
        finally:
            if container_id and (self.config.cleanup == "always" or (self.config.cleanup == "on-success" and ok)):
                self.sweeper.remove(container_id)
            self._live.discard(container_id or "")
            if input_file is not None:
                input_file.unlink(missing_ok=True)

    def _converse(self, api: Any, container_id: str, sock: socket.socket, data: bytes, deadline: float,
                  cancelled: threading.Event, invocation_id: str) -> tuple[Capture, Capture, bool, bool]:
        """Send ``data`` to stdin and read the multiplexed stdout/stderr until the container ends (shown live)."""
        out, err = Capture(self.config.output_limit), Capture(self.config.output_limit)
        with LIVE.showing(invocation_id, out, err):
            return self._exchange(api, container_id, sock, data, deadline, cancelled, out, err)

    def _exchange(self, api: Any, container_id: str, sock: socket.socket, data: bytes, deadline: float,
                  cancelled: threading.Event, out: Capture, err: Capture) -> tuple[Capture, Capture, bool, bool]:
        captures = {1: out, 2: err}
        frames = AttachStream(lambda stream, payload: captures.get(stream, err).write(payload))
        sock.setblocking(False)
        view = memoryview(data)
        timed_out = interrupted = False
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if view else 0))
            if not view:
                sock.shutdown(socket.SHUT_WR)
            writing = bool(view)
            while True:
                if cancelled.is_set() and not interrupted:
                    interrupted = True
                    self._stop(api, container_id, 0)
                if time.monotonic() >= deadline and not timed_out:
                    timed_out = True
                    self._stop(api, container_id, STOP_GRACE)
                for _key, events in selector.select(_TICK):
                    if events & selectors.EVENT_WRITE and writing:
                        try:
                            sent = sock.send(view[:65536])
                            view = view[sent:]
                        except (BlockingIOError, InterruptedError):
                            sent = 0
                        except OSError:
                            view = view[len(view):]  # stdin closed: the function did not read it
                        if not view:
                            writing = False
                            try:
                                sock.shutdown(socket.SHUT_WR)
                            except OSError:
                                pass
                            selector.modify(sock, selectors.EVENT_READ)
                    if events & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            chunk = b""
                        if not chunk:
                            return out, err, timed_out, interrupted
                        frames.feed(chunk)


def _stop_container(api: Any, container_id: str, grace: float, stoppers: set[threading.Thread]) -> None:
    try:
        api.stop(container_id, timeout=int(grace))
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        pass
    finally:
        stoppers.discard(threading.current_thread())
