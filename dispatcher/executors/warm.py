"""Warm functions: a pool of running containers per function, each with the runner as its PID 1 (docs/warm.md).

A batch in a warm container costs a few frames over its attach socket instead of a container
start: the runner (``runner/eventswarm-runner.c``) starts the image's own program with the input
on stdin and in ``$EVENTSWARM_INPUT``, frames back its stdout, stderr and exit status, then kills
what the batch left running and empties ``/tmp``. A container is replaced after a timeout, an
out-of-memory kill, an unexpected end of its runner, ``max_batches`` batches or ``idle_ttl`` idle.

Everything here runs in the docker executor's worker threads, and one upkeep thread per executor
keeps ``min_idle`` containers started and retires the old ones. A pool's bookkeeping is ``pool.py``; the
frames over the attach socket are ``link.py``; this module starts containers and runs batches in them.
"""

from __future__ import annotations

import logging
import secrets as random
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docker.types import LogConfig

from dispatcher.config import ExecutorConfig, FunctionConfig
from dispatcher.errors import ExecutorError
from dispatcher.executors.base import (
    INPUT_PATH,
    LABEL_MANAGED,
    LABEL_OWNER,
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
from dispatcher.executors.engine import ENGINE_ERRORS, Sweeper, engine_error
from dispatcher.executors.link import READY_TIMEOUT, TICK, Link, ProtocolError, RunnerGone, exit_report
from dispatcher.executors.pool import Container, Pool, pool_key

if TYPE_CHECKING:
    from dispatcher.executors.sight import Sight

log = logging.getLogger("eventswarm.warm")

RUNNER = Path(__file__).parent / "bin" / "eventswarm-runner"
"""The runner, built by ``make install`` (scripts/runner.sh)."""
RUNNER_DIR = "/run/eventswarm-runner"
"""Where the runner is found inside a warm container."""
LABEL_FUNCTION = "io.eventswarm.function"
LABEL_WARM = "io.eventswarm.warm"
INPUT_TMPFS = "size=1g,mode=1777"
"""The tmpfs holding each batch's input file (only what is written takes memory)."""
UPKEEP_EVERY = 1.0
"""Seconds between two rounds of the upkeep thread (it is also woken when a container is replaced)."""
IMAGE_CHECK_EVERY = 5.0
"""Seconds between two looks at what a pool's image tag points to (a new image replaces the pool's containers)."""
PREWARM_PAUSE = 10.0
"""Seconds a pool's upkeep waits after a start failed (a missing image, an engine error) before it tries again."""
_Errors = (*ENGINE_ERRORS, OSError)


class WarmPools:
    """The docker executor's warm pools, and the thread that keeps them."""

    def __init__(self, api: Any, config: ExecutorConfig, sweeper: Sweeper, sight: Sight) -> None:
        self.api = api
        self.sweeper = sweeper
        self.config = config
        self.sight = sight
        self.pools: dict[str, Pool] = {}
        self.doomed: deque[Container] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.paused: dict[str, float] = {}
        """Pools whose last start failed, and until when their upkeep starts nothing (by pool key)."""

    # -- pools ------------------------------------------------------------------------------

    def pool(self, name: str, function: FunctionConfig, owner: str) -> Pool:
        key = pool_key(name, function)
        with self._lock:
            pool = self.pools.get(key)
            if pool is None:
                if not RUNNER.exists() and function.warm is not None and function.warm.mode == "runner":
                    raise ExecutorError(f"the warm runner is not built ({RUNNER}): run `make install` (it needs "
                                        "Debian's musl-tools)", temporary=False)
                pool = self.pools[key] = Pool(self, name, function, owner)
                self._ensure_thread()
        return pool

    def prepare(self, functions: Mapping[str, FunctionConfig], owner: str) -> None:
        """The warm functions now: their pools start prewarming; pools of functions gone or changed retire."""
        keys = {pool_key(name, fn): (name, fn) for name, fn in functions.items() if fn.warm is not None}
        with self._lock:
            retiring = [pool for key, pool in self.pools.items() if key not in keys]
        for pool in retiring:
            with pool.cond:
                pool.retired = True
        for name, function in keys.values():
            self.pool(name, function, owner)
        self.wake()

    def stats(self) -> list[dict[str, Any]]:
        with self._lock:
            pools = [pool for pool in self.pools.values() if not pool.retired]
        return [pool.stats() for pool in pools]

    def wake(self) -> None:
        self._wake.set()

    # -- a batch ----------------------------------------------------------------------------

    def run(self, invocation: Invocation, cancelled: threading.Event) -> Result:
        function = invocation.function
        pool = self.pool(invocation.function_name, function, invocation.owner)
        started = time.monotonic()
        phases = Phases("take a warm container")
        container = pool.acquire(cancelled)
        phases.step("run")
        container.batches += 1
        out, err = Capture(self.config.output_limit), Capture(self.config.output_limit)
        replace: str | None = "failed"
        try:
            with LIVE.showing(invocation.id, out, err):
                result, replace = self._batch(pool, container, invocation, started, cancelled, out, err)
            result.phases = phases.step(None)
            return result
        except OSError as exc:  # (not the runner's end, which _batch reports: the socket itself failed)
            raise ExecutorError(f"the warm container's socket failed: {exc}") from exc
        finally:
            pool.release(container, replace)

    def _batch(self, pool: Pool, container: Container, invocation: Invocation, started: float,
               cancelled: threading.Event, out: Capture, err: Capture) -> tuple[Result, str | None]:
        function = invocation.function
        image = container.image
        if function.command:
            argv = [*function.command, *invocation.args]
        else:
            argv = [*image.entrypoint, *(invocation.args or image.cmd)]
        env = environment(invocation, INPUT_PATH)
        frames = [(b"A", arg.encode()) for arg in argv]
        frames += [(b"E", f"{k}={v}".encode()) for k, v in env.items()]
        token = random.token_hex(8).encode()  # (its 'X' must echo it: a report of another batch is refused)
        frames += [(b"I", invocation.input),
                   (b"T", f"{int(function.timeout * 1000)} {int(STOP_GRACE * 1000)}".encode()), (b"G", token)]
        persistent = pool.settings.mode == "persistent"
        # (the runner ends a batch at its timeout; a persistent function's own loop is ended by the daemon)
        backstop = started + function.timeout + (0 if persistent else STOP_GRACE + 10)
        begun = False
        try:
            container.link.send(frames)
            while True:
                if cancelled.is_set():
                    self._kill(container)
                    return self._result(container, started, out, err, 137, notes=["stopped: the daemon shut down"]), \
                        "interrupted"
                if time.monotonic() > backstop:
                    self._kill(container)
                    return self._result(container, started, out, err, 137, timed_out=True), "timeout"
                frame = container.link.receive(TICK)
                if frame is None:
                    continue
                kind, payload = frame
                if not begun:  # (what came before the batch's 'B' is no batch's: sent while idle, or forged)
                    if kind != b"B" or payload != token:
                        raise ProtocolError(f"a {kind.decode()!r} frame where the batch's 'B' with its token was due"
                                            f"{'' if kind != b'B' else f' (its token is {payload[:40]!r})'}")
                    begun = True
                elif kind == b"O":
                    out.write(payload)
                elif kind == b"E":
                    err.write(payload)
                elif kind == b"X":
                    code, timed_out, ooms = exit_report(payload, token)
                    # (as a cold container's OOMKilled says: the kernel killed a process of the batch for memory)
                    result = self._result(container, started, out, err, code, timed_out=bool(timed_out), oom=ooms > 0)
                    return result, ("timeout" if timed_out else "oom" if ooms else None)
                else:
                    raise ProtocolError(f"a {kind.decode()!r} frame during a batch")
        except ProtocolError as broken:
            # The channel carried what the runner never sends: nothing more it says can be trusted for this batch.
            self._kill(container)
            note = f"the warm container broke the frame protocol ({broken}): it was replaced"
            err.write(f"\n[eventswarm] {note}\n".encode())
            return self._result(container, started, out, err, None, notes=[note]), "protocol"
        except RunnerGone as gone:
            exit_code, oom = self._ended(container)
            complaint = bytes(container.link.complaints).decode("utf-8", "replace").strip()
            note = f"the warm container ended during the batch ({gone}{': ' + complaint if complaint else ''})"
            err.write(f"\n[eventswarm] {note}\n".encode())
            result = self._result(container, started, out, err, exit_code, oom=oom, notes=[note])
            return result, "oom" if oom else "runner_ended"

    @staticmethod
    def _result(container: Container, started: float, out: Capture, err: Capture, code: int | None, *,
                timed_out: bool = False, oom: bool = False, notes: list[str] | None = None) -> Result:
        return Result(exit_code=code, stdout=out.getvalue(), stderr=err.getvalue(), timed_out=timed_out,
                      oom_killed=oom, ref=container.id, duration=time.monotonic() - started, notes=notes or [])

    def _ended(self, container: Container) -> tuple[int | None, bool]:
        """How a container whose runner ended went: its exit code, and whether the OOM killer did it."""
        try:
            self.api.wait(container.id, timeout=STOP_GRACE + 10)
            state = self.api.inspect_container(container.id)["State"]
            return int(state.get("ExitCode", 0)) or 137, bool(state.get("OOMKilled"))
        except _Errors:
            return None, False

    def _kill(self, container: Container) -> None:
        try:
            self.api.kill(container.id)
        except _Errors:
            pass

    # -- containers -------------------------------------------------------------------------

    def start_container(self, pool: Pool) -> Container:
        """Create, attach and start a warm container for ``pool``, and wait for its runner to say it is ready."""
        api = self.api
        function = pool.function
        generation = pool.generation  # (before the image: a change in between makes this container old, not wrong)
        image = pool.image_of()
        persistent = function.warm is not None and function.warm.mode == "persistent"
        try:
            copy_runner = not persistent and not self._engine_sees_runner(image.id, pool.owner)
        except _Errors as exc:
            raise engine_error(exc, f"cannot start a warm container for {function.image!r}") from exc
        binds = [f"{RUNNER}:{RUNNER_DIR}/eventswarm-runner:ro"] if not persistent and not copy_runner else []
        tmp_size = function.warm.tmp_size if function.warm is not None else 64 << 20
        host_config = hardened_host_config(api, self.config.network, function, binds, log_config=LogConfig(type="none"),
                                           tmpfs={"/tmp": f"size={tmp_size},mode=1777", "/run/eventswarm": INPUT_TMPFS})
        labels = {LABEL_MANAGED: "true", LABEL_OWNER: pool.owner, LABEL_FUNCTION: pool.name, LABEL_WARM: "true"}
        if persistent:
            entrypoint, command = (function.command or None), (list(function.args) or None)
        else:
            entrypoint, command = [f"{RUNNER_DIR}/eventswarm-runner"], None
        container_id: str | None = None
        try:
            spec = api.create_container_config(
                image.id, command, entrypoint=entrypoint, environment=dict(function.env),
                user=function.user or None, labels=labels, stdin_open=True,
                volumes=[RUNNER_DIR] if copy_runner else None, host_config=host_config,
            )
            spec["StdinOnce"] = True  # the daemon's attach ending (it stopped, or died) closes the runner's stdin: it exits
            created = api.create_container_from_config(spec, f"eventswarm-warm-{pool.name}-{random.token_hex(5)}")
            container_id = created["Id"]
            if copy_runner:
                api.put_archive(container_id, RUNNER_DIR, tar_file("eventswarm-runner", RUNNER.read_bytes(), 0o755))
            attached = api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            api.start(container_id)
        except _Errors as exc:
            if container_id is not None:
                self.sweeper.remove(container_id)
            raise engine_error(exc, f"cannot start a warm container for {function.image!r}") from exc
        sock: socket.socket = getattr(attached, "_sock", attached)
        link = Link(sock, attached)
        container = Container(container_id, link, generation, image)
        try:
            frame = link.receive(READY_TIMEOUT)
            if frame is None or frame[0] != b"R":
                raise RunnerGone(f"no ready frame within {READY_TIMEOUT:g}s" if frame is None else
                                 f"a {frame[0]!r} frame before the ready frame")
        except (RunnerGone, ProtocolError) as exc:
            complaint = bytes(link.complaints).decode("utf-8", "replace").strip()
            self.remove(container)
            raise ExecutorError(f"a warm container of {pool.name!r} did not become ready: {exc}"
                                + (f" ({complaint})" if complaint else "")) from None
        return container

    def _engine_sees_runner(self, image: str, owner: str) -> bool:
        """Is the runner bind-mounted (the engine sees it at its path here) or copied in? ``executor.input`` says so
        when it is set (``bind``: bind-mounted; ``copy``, ``stdin``: copied), else the engine is asked (once)."""
        if self.config.input != "auto":
            return self.config.input == "bind"
        return self.sight.sees(RUNNER, image, owner)

    def remove(self, container: Container) -> None:
        container.link.close()
        self.sweeper.remove(container.id)

    # -- the upkeep thread --------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            # (a thread: the SDK blocks, and the upkeep waits on the pools' conditions; ``close`` ends and joins it)
            self._thread = threading.Thread(target=self._upkeep, name="warm-upkeep", daemon=True)
            self._thread.start()

    def _upkeep(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(UPKEEP_EVERY)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self._round()
            except Exception:  # an upkeep round must never end the thread
                log.exception("warm pools: upkeep failed")

    def _round(self) -> None:
        while self.doomed:
            self.remove(self.doomed.popleft())
        now = time.monotonic()
        with self._lock:
            pools = list(self.pools.items())
        for key, pool in pools:
            may_start = now >= self.paused.get(key, 0.0)
            try:
                if may_start and not pool.retired and now - pool.image_checked >= IMAGE_CHECK_EVERY:
                    pool.refresh_image()
                while not self._closed.is_set():
                    old = pool.upkeep(time.monotonic(), may_start)
                    if old is None:
                        pool.prewarm()
                        continue
                    for container in old:
                        self.remove(container)
                    break
            except ExecutorError as exc:
                # (one line per PREWARM_PAUSE: batches still start their own containers, and say why they cannot)
                log.warning("warm pool %s: cannot start a container (trying again in %gs): %s", pool.name,
                            PREWARM_PAUSE, exc)
                self.paused[key] = now + PREWARM_PAUSE
            if pool.retired:
                with pool.cond:
                    empty = not pool.busy and not pool.idle and not pool.starting
                if empty:
                    with self._lock:
                        self.pools.pop(key, None)

    def close(self) -> None:
        """Stop the upkeep thread and remove every warm container (batches still running end with their container)."""
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            pools = list(self.pools.values())
        for pool in pools:
            with pool.cond:
                pool.retired = True
                containers = list(pool.idle) + list(pool.busy)
                pool.idle.clear()
            for container in containers:
                self.remove(container)
        while self.doomed:
            self.remove(self.doomed.popleft())
