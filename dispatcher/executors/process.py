"""The process executor: each invocation is a local subprocess (no Docker), with the same contract."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process

from dispatcher.config import ExecutorConfig
from dispatcher.errors import ExecutorError
from dispatcher.executors.base import STOP_GRACE, Capture, Invocation, Result, environment


class ProcessExecutor:
    """Runs ``function.command + args`` as a subprocess in its own session; ``image`` is ignored."""

    kind = "process"

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self._environ = dict(os.environ)  # functions inherit the daemon's environment as it started

    async def start(self) -> None:
        _watch_children_with_pidfds()

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
            await anyio.Path(input_path).write_bytes(invocation.input)
            env = {**self._environ, **environment(invocation, str(input_path))}
            started = time.monotonic()
            try:
                with input_path.open("rb") as stdin:  # the document on stdin straight from its file: no pipe to feed
                    process = await anyio.open_process(
                        argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env=env, cwd=scratch, start_new_session=True,
                    )
            except OSError as exc:
                raise ExecutorError(f"cannot start {argv[0]!r}: {exc}", temporary=False) from exc
            return await self._supervise(process, invocation, started)
        finally:
            try:  # the common case, cheaper than rmtree: the function left only its input behind
                input_path.unlink(missing_ok=True)
                os.rmdir(scratch)
            except OSError:
                shutil.rmtree(scratch, ignore_errors=True)

    async def _supervise(self, process: Process, invocation: Invocation, started: float) -> Result:
        stdout, stderr = Capture(self.config.output_limit), Capture(self.config.output_limit)
        timed_out = False
        drained = anyio.Event()

        async def drain_both() -> None:
            assert process.stdout is not None and process.stderr is not None
            async with anyio.create_task_group() as inner:
                inner.start_soon(_drain, process.stdout, stdout)
                inner.start_soon(_drain, process.stderr, stderr)
            drained.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain_both)
                with anyio.move_on_after(invocation.function.timeout) as scope:
                    await process.wait()
                if scope.cancelled_caught:
                    timed_out = True
                    _signal(process, signal.SIGTERM)
                    with anyio.move_on_after(STOP_GRACE) as grace:
                        await process.wait()
                    if grace.cancelled_caught:
                        _signal(process, signal.SIGKILL)
                        await process.wait()
                # A child that keeps stdout open must not hold the batch: give it a moment only.
                with anyio.move_on_after(1.0):
                    await drained.wait()
                tg.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                with anyio.CancelScope(shield=True):
                    _signal(process, signal.SIGKILL)
                    await process.wait()
        return Result(
            exit_code=process.returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue(),
            timed_out=timed_out, ref=str(process.pid), duration=time.monotonic() - started,
        )


def _signal(process: Process, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _drain(stream: ByteReceiveStream, capture: Capture) -> None:
    try:
        async for chunk in stream:
            capture.write(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


def _watch_children_with_pidfds() -> None:
    """Python 3.11's asyncio waits for each child in a thread of its own; a pidfd needs no thread (3.12 does this itself)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    import asyncio

    try:
        loop = asyncio.get_running_loop()
        os.close(os.pidfd_open(os.getpid()))  # refused under some seccomp profiles: then keep the default
    except (RuntimeError, OSError):
        return
    watcher = asyncio.get_child_watcher()
    if type(watcher) is asyncio.ThreadedChildWatcher:  # the default, not one the host application chose
        watcher = asyncio.PidfdChildWatcher()
        asyncio.set_child_watcher(watcher)
    if isinstance(watcher, asyncio.PidfdChildWatcher) and not watcher.is_active():
        watcher.attach_loop(loop)  # 3.11's is bound to one loop: ours, or an earlier one that has ended
