"""The process executor: each invocation is a local subprocess (no Docker), with the same contract.

A child is watched from the event loop itself: its exit through a pidfd, its stdout and stderr
through non-blocking reads in reader callbacks. No thread, task or stream objects per child:
those were most of the executor's cost per batch.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio

from dispatcher.config import ExecutorConfig, FunctionConfig
from dispatcher.errors import ExecutorError
from dispatcher.events import new_id
from dispatcher.executors import reaper
from dispatcher.executors.base import (
    LIVE,
    STOP_GRACE,
    Capture,
    ExecutorDefaults,
    Invocation,
    Phases,
    Result,
    environment,
)
from dispatcher.identity import Identity

log = logging.getLogger("eventswarm.executor")

INLINE_WRITE = 1 << 20
"""An input document up to this size is written from the event loop (into the page cache, faster
than a thread's round trip); a larger one in a worker thread."""
READ_CHUNK = 1 << 16
DRAIN_WAIT = 1.0
"""How long output is still read after the function exited (a child it left may hold its stdout)."""
EXIT_POLL = (0.001, 0.05)
"""Without pidfds (Linux < 5.3, or refused): the first and the longest wait between checks for the exit."""
ORPHAN_PASSES = 5
"""Rounds of ending what a function left behind: killing an orphan hands its own children to the daemon."""
PR_SET_CHILD_SUBREAPER = 36
HAS_PROC = os.path.isdir("/proc")


class ProcessExecutor(ExecutorDefaults):
    """Runs ``function.command + args`` as a subprocess in its own session; ``image`` is ignored.

    Nothing a function starts outlives it, nor the daemon:
    - its session is killed when it exits (``_supervise``);
    - what escaped the session (``setsid``, a double fork) is adopted by the daemon, a child
      subreaper, and killed when its invocation ends (``_end_orphans``, by ``EVENTSWARM_BATCH_ID``);
    - when the daemon dies, even by ``kill -9``, its reaper (``reaper.py``) kills every process that
      carries the daemon's ``EVENTSWARM_OWNER`` mark;
    - and at start, ``gc`` kills what an earlier run of the same daemon left, had its reaper died too.
    """

    kind = "process"

    def __init__(self, config: ExecutorConfig, owner: str = "") -> None:
        self.config = config
        self.owner = owner or "none"
        self.mark = f"{self.owner}.{new_id()[:12]}"
        """This run's ``EVENTSWARM_OWNER``: the owner (which state store), then this incarnation."""
        self._path = os.environ.get("PATH") or DEFAULT_PATH
        """The one variable of the daemon's own a function gets: the rest (secrets among them) stays the daemon's."""
        self._running: set[int] = set()
        self._reaper: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        if self._reaper is not None or not HAS_PROC:
            return
        _become_subreaper()
        self._reaper = subprocess.Popen(  # noqa: ASYNC220 (it starts at once; nothing to wait for)
            [sys.executable, "-I", "-S", reaper.__file__, self.mark], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        log.debug("process functions' reaper: pid %d", self._reaper.pid)

    async def ping(self) -> bool:
        return True

    async def gc(self, owner: str | None) -> int:
        """Kill what process functions of an earlier run left running (of ``owner``'s, or of every daemon)."""
        prefix = f"{owner}." if owner is not None else ""
        return await anyio.to_thread.run_sync(
            reaper.sweep, lambda mark: mark.startswith(prefix) and mark != self.mark)

    async def close(self) -> None:
        if self._reaper is None:
            return
        process, self._reaper = self._reaper, None
        assert process.stdin is not None
        process.stdin.close()  # the reaper sweeps (nothing should be left) and exits
        with anyio.move_on_after(5):
            await anyio.to_thread.run_sync(process.wait)

    async def run(self, invocation: Invocation) -> Result:
        argv = [*invocation.function.command, *invocation.args]
        if not argv:
            raise ExecutorError(f"function {invocation.function_name!r} has no command", temporary=False)
        phases = Phases("prepare input")
        try:
            scratch = tempfile.mkdtemp(prefix="eventswarm-")
        except OSError as exc:
            raise _unavailable(exc) from None
        input_path = Path(scratch) / "input.json"
        try:
            try:
                if len(invocation.input) <= INLINE_WRITE:
                    input_path.write_bytes(invocation.input)
                else:
                    await anyio.Path(input_path).write_bytes(invocation.input)
            except OSError as exc:
                raise _unavailable(exc) from None
            function = invocation.function
            env = {"PATH": self._path, **environment(invocation, str(input_path)), reaper.OWNER_VARIABLE: self.mark}
            identity = Identity.of(function.user) if function.user else None
            if function.secrets:
                env["EVENTSWARM_SECRETS"] = _copy_secrets(function.secrets, Path(scratch) / "secrets", identity)
            if identity is not None:
                os.chown(scratch, identity.uid, identity.gid)
                os.chown(input_path, identity.uid, identity.gid)
            argv = [*limits(function), *argv]
            workdir = function.workdir or scratch
            started = time.monotonic()
            try:
                with input_path.open("rb") as stdin:  # the document on stdin straight from its file: no pipe to feed
                    # vfork and exec, as asyncio's own subprocess support does from the loop
                    process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: ASYNC220
                                               env=env, cwd=workdir, start_new_session=True,
                                               **(identity.popen() if identity else {}))
            except OSError as exc:
                if exc.filename == workdir:  # (the child could not enter it)
                    raise ExecutorError(f"function {invocation.function_name!r}: cannot run in its workdir {workdir}: "
                                        f"{exc.strerror}", temporary=False) from exc
                raise ExecutorError(f"cannot start {argv[0]!r} in {workdir}: {exc}", temporary=False) from exc
            self._running.add(process.pid)
            phases.step("run")
            try:
                result = await _supervise(process, invocation.function.timeout, self.config.output_limit, started,
                                          invocation.id)
                result.phases = phases.step(None)
                return result
            finally:
                self._running.discard(process.pid)
                with anyio.CancelScope(shield=True):
                    await self._end_orphans(invocation.id)
        finally:
            try:  # the common case, cheaper than rmtree: the function left only its input behind
                input_path.unlink(missing_ok=True)
                os.rmdir(scratch)
            except OSError:
                shutil.rmtree(scratch, ignore_errors=True)


    async def _end_orphans(self, invocation_id: str) -> None:
        """Kill what invocation ``invocation_id`` left outside its session (the daemon adopted it), and reap
        the daemon's zombie children; a running invocation's processes are left alone."""
        for _ in range(ORPHAN_PASSES):
            ended = []
            for pid in _children() - self._running:
                state, batch = _state_and_batch(pid)
                if state is None:
                    continue
                if state == "Z" or batch == invocation_id:
                    _kill(pid)
                    ended.append(pid)
            if not ended:
                return
            for pid in ended:
                await _reap(pid)


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def limits(function: FunctionConfig) -> list[str]:
    """The command that starts ``function`` under its resource limits (none: nothing): ``memory`` as the data
    segment's limit (heap and private mappings: an allocation past it fails), an explicit ``pids_limit`` as
    the processes its user may have, ``cpus`` as that many CPUs (rounded up) it may run on."""
    prefix: list[str] = []
    if function.cpus is not None:
        allowed = sorted(os.sched_getaffinity(0))
        prefix += ["taskset", "--cpu-list", ",".join(str(c) for c in allowed[:max(1, math.ceil(function.cpus))])]
    resources = []
    if function.memory is not None:
        resources.append(f"--data={function.memory}")
    if "pids_limit" in function.model_fields_set and function.pids_limit is not None:
        resources.append(f"--nproc={function.pids_limit}")
    if resources:
        prefix += ["prlimit", *resources]
    return prefix


def _copy_secrets(files: list[str], folder: Path, identity: Identity | None) -> str:
    """Each secret file copied (mode 0400, owned by the function's user) into ``folder``; its path."""
    folder.mkdir(mode=0o700)
    for source in files:
        target = folder / os.path.basename(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ExecutorError(f"secret {source}: {exc.strerror}", temporary=False) from None
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
        if identity is not None:
            os.chown(target, identity.uid, identity.gid)
    if identity is not None:
        os.chown(folder, identity.uid, identity.gid)
    return str(folder)


def _become_subreaper() -> None:
    """Orphans of the daemon's descendants come to the daemon instead of PID 1 (Linux): so it can end them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("cannot become a child subreaper (errno %d): what process functions leave running in a new "
                        "session is ended only by the reaper", ctypes.get_errno())
    except (OSError, AttributeError):
        pass


def _children() -> set[int]:
    """The daemon's child processes (those of the loop's thread, which starts the functions and adopts orphans)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/children") as file:
            return {int(pid) for pid in file.read().split()}
    except OSError:
        return set()


def _state_and_batch(pid: int) -> tuple[str | None, str | None]:
    """A process's state letter (``Z`` for a zombie) and its ``EVENTSWARM_BATCH_ID``; (None, None) once gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0].decode()
        with open(f"/proc/{pid}/environ", "rb") as file:
            environ = file.read()
    except (OSError, IndexError):
        return None, None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"EVENTSWARM_BATCH_ID="):
            return state, entry.split(b"=", 1)[1].decode(errors="replace")
    return state, None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _reap(pid: int) -> None:
    """Collect the exit of child ``pid`` (killed, so about to exit), waiting a little at most."""
    delay = EXIT_POLL[0]
    with anyio.move_on_after(1.0):
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: it never blocks)
            except ChildProcessError:
                return
            if done:
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, EXIT_POLL[1])


def _unavailable(exc: OSError) -> ExecutorError:
    """The scratch directory or input file could not be written (a full disk): nothing started, try again later."""
    return ExecutorError(f"cannot write the function's input file in {tempfile.gettempdir()}: {exc.strerror or exc}",
                         unavailable=True)


async def _supervise(process: subprocess.Popen[bytes], allowed: float, output_limit: int, started: float,
                     invocation_id: str) -> Result:
    """Wait for the function (SIGTERM at its timeout, SIGKILL after the grace), capturing its output (shown live)."""
    stdout, stderr = Capture(output_limit), Capture(output_limit)
    with LIVE.showing(invocation_id, stdout, stderr):
        return await _watch(process, allowed, started, stdout, stderr)


async def _watch(process: subprocess.Popen[bytes], allowed: float, started: float, stdout: Capture,
                 stderr: Capture) -> Result:
    loop = asyncio.get_running_loop()
    drained = anyio.Event()
    pipes: dict[int, Capture] = {}

    def on_readable(fd: int) -> None:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            pipes[fd].write(chunk)
            return
        loop.remove_reader(fd)
        del pipes[fd]
        if not pipes:
            drained.set()

    for pipe, capture in ((process.stdout, stdout), (process.stderr, stderr)):
        assert pipe is not None
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        pipes[fd] = capture
        loop.add_reader(fd, on_readable, fd)
    pidfd = _pidfd(process.pid)
    timed_out = False
    try:
        with anyio.move_on_after(allowed) as scope:
            await _exited(process, pidfd)
        if scope.cancelled_caught:
            timed_out = True
            _signal(process, signal.SIGTERM)
            with anyio.move_on_after(STOP_GRACE) as grace:
                await _exited(process, pidfd)
            if grace.cancelled_caught:
                _signal(process, signal.SIGKILL)
                await _exited(process, pidfd)
        with anyio.move_on_after(DRAIN_WAIT):
            await drained.wait()
    finally:
        # What the function left running in its session ends with it, as in a container; and when
        # the invocation is cancelled, so does the function.
        _signal(process, signal.SIGKILL)
        if process.returncode is None:
            with anyio.CancelScope(shield=True):
                await _exited(process, pidfd)
        for fd in pipes:
            loop.remove_reader(fd)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
        if pidfd is not None:
            os.close(pidfd)
    return Result(
        exit_code=process.returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue(),
        timed_out=timed_out, ref=str(process.pid), duration=time.monotonic() - started,
    )


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds here: the exit is polled
        return None


async def _exited(process: subprocess.Popen[bytes], pidfd: int | None) -> None:
    """Wait until the process has exited, and reap it."""
    delay = EXIT_POLL[0]
    while process.poll() is None:
        if pidfd is not None:
            await anyio.wait_readable(pidfd)  # readable once the process has exited
        else:
            await anyio.sleep(delay)
            delay = min(delay * 2, EXIT_POLL[1])


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
