"""The process executor: each invocation is a local subprocess (no Docker), with the same contract.

A child is watched from the event loop itself: its exit through a pidfd, its stdout and stderr
through non-blocking reads in reader callbacks. No thread, task or stream objects per child:
those were most of the executor's cost per batch.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import anyio

from dispatcher.config import ExecutorConfig
from dispatcher.errors import ExecutorError
from dispatcher.executors.base import STOP_GRACE, Capture, Invocation, Result, environment

INLINE_WRITE = 1 << 20
"""An input document up to this size is written from the event loop (into the page cache, faster
than a thread's round trip); a larger one in a worker thread."""
READ_CHUNK = 1 << 16
DRAIN_WAIT = 1.0
"""How long output is still read after the function exited (a child it left may hold its stdout)."""
EXIT_POLL = (0.001, 0.05)
"""Without pidfds (Linux < 5.3, or refused): the first and the longest wait between checks for the exit."""


class ProcessExecutor:
    """Runs ``function.command + args`` as a subprocess in its own session; ``image`` is ignored."""

    kind = "process"

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self._environ = dict(os.environ)  # functions inherit the daemon's environment as it started

    async def start(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def gc(self, owner: str | None) -> int:
        return 0

    async def close(self) -> None:
        return None

    async def run(self, invocation: Invocation) -> Result:
        argv = [*invocation.function.command, *invocation.args]
        if not argv:
            raise ExecutorError(f"function {invocation.function_name!r} has no command", temporary=False)
        scratch = tempfile.mkdtemp(prefix="eventswarm-")
        input_path = Path(scratch) / "input.json"
        try:
            if len(invocation.input) <= INLINE_WRITE:
                input_path.write_bytes(invocation.input)
            else:
                await anyio.Path(input_path).write_bytes(invocation.input)
            env = {**self._environ, **environment(invocation, str(input_path))}
            started = time.monotonic()
            try:
                with input_path.open("rb") as stdin:  # the document on stdin straight from its file: no pipe to feed
                    # vfork and exec, as asyncio's own subprocess support does from the loop
                    process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: ASYNC220
                                               env=env, cwd=scratch, start_new_session=True)
            except OSError as exc:
                raise ExecutorError(f"cannot start {argv[0]!r}: {exc}", temporary=False) from exc
            return await _supervise(process, invocation.function.timeout, self.config.output_limit, started)
        finally:
            try:  # the common case, cheaper than rmtree: the function left only its input behind
                input_path.unlink(missing_ok=True)
                os.rmdir(scratch)
            except OSError:
                shutil.rmtree(scratch, ignore_errors=True)


async def _supervise(process: subprocess.Popen[bytes], allowed: float, output_limit: int, started: float) -> Result:
    """Wait for the function (SIGTERM at its timeout, SIGKILL after the grace), capturing its output."""
    loop = asyncio.get_running_loop()
    stdout, stderr = Capture(output_limit), Capture(output_limit)
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
