"""The Executor protocol: what every executor (process, docker, swarm) does with one invocation."""

from __future__ import annotations

import contextlib
import io
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dispatcher.config import FunctionConfig

INPUT_PATH = "/run/eventswarm/input.json"
"""Where the input document is found inside a container (``$EVENTSWARM_INPUT``)."""

LABEL_MANAGED = "io.eventswarm.managed"
LABEL_TRIGGER = "io.eventswarm.trigger"
LABEL_FUNCTION = "io.eventswarm.function"
LABEL_INVOCATION = "io.eventswarm.invocation"
LABEL_OWNER = "io.eventswarm.owner"
"""Which daemon (by its state store) made a container: ``gc`` at start removes only its own."""

STOP_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when a function runs past its timeout."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """One batch to run: the function, its input document and its environment."""

    id: str
    trigger: str
    function_name: str
    function: FunctionConfig
    input: bytes
    env: Mapping[str, str]
    args: Sequence[str]
    owner: str = ""

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_TRIGGER: self.trigger, LABEL_FUNCTION: self.function_name,
                LABEL_INVOCATION: self.id, LABEL_OWNER: self.owner}


class Phases:
    """An invocation's phases on the wall clock, for its trace: ``step(name)`` ends the phase under way and begins
    ``name``; ``step(None)`` ends the last one. ``spans``: (name, start, end) of each phase ended."""

    __slots__ = ("_name", "_start", "spans")

    def __init__(self, first: str | None = None) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self._name = first
        self._start = time.time()

    def step(self, name: str | None) -> list[tuple[str, float, float]]:
        now = time.time()
        if self._name is not None:
            self.spans.append((self._name, self._start, now))
        self._name, self._start = name, now
        return self.spans


@dataclass(slots=True)
class Result:
    """What came back from running an invocation."""

    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    oom_killed: bool = False
    ref: str | None = None
    duration: float = 0.0
    node: str | None = None
    """The Swarm node the invocation ran on (swarm executor)."""
    notes: list[str] = field(default_factory=list)
    phases: list[tuple[str, float, float]] = field(default_factory=list)
    """(name, start, end) of its phases on the wall clock (``Phases``): preparing the input, starting, running,
    collecting the output; for its trace."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.oom_killed


class Executor(Protocol):
    @property
    def kind(self) -> str:
        """``docker``, ``swarm`` or ``process``."""
        ...

    async def start(self) -> None:
        """Connect (and check the engine is reachable); raises ``ExecutorError``."""

    async def run(self, invocation: Invocation) -> Result:
        """Run one invocation to its end; raises ``ExecutorError`` when it could not be run at all."""
        ...

    async def ping(self) -> bool:
        """Is the engine reachable now (for ``/readyz``)?"""
        ...

    async def gc(self, owner: str | None) -> int:
        """Remove what invocations left behind (of ``owner``'s, or every daemon's); returns how many."""
        ...

    async def prepare(self, functions: Mapping[str, FunctionConfig], owner: str) -> None:
        """The functions now (at start and after a reload): warm pools begin to fill, those of functions gone
        retire."""
        ...

    def pools(self) -> list[dict[str, Any]]:
        """Each warm pool's size, idle containers, starts and replacements (for status and metrics)."""
        ...

    async def adopt(self, invocation: Invocation) -> Result | None:
        """The job of ``invocation`` that a replica now gone started: followed to its end if it is still there (its
        result), else None (its events run again)."""
        ...

    async def close(self) -> None: ...


class ExecutorDefaults:
    """What an executor kind without warm pools, or without jobs that outlive a daemon, does: nothing."""

    async def prepare(self, functions: Mapping[str, FunctionConfig], owner: str) -> None:
        return None

    def pools(self) -> list[dict[str, Any]]:
        return []

    async def adopt(self, invocation: Invocation) -> Result | None:
        return None


class Capture:
    """Bounded output capture: keeps the head and the tail, cuts the middle past ``limit`` bytes.

    The tail matters (the partial-failure line is the last line of stdout), the head too (a
    sync webhook's response), so both are kept.
    """

    __slots__ = ("_head", "_limit", "_lock", "_tail", "dropped", "total")

    def __init__(self, limit: int) -> None:
        self._limit = max(limit, 2)
        self._head = bytearray()
        self._tail = bytearray()
        self.dropped = 0
        self.total = 0
        """Bytes written so far (a follower's position counts in these)."""
        self._lock = threading.Lock()  # (the docker executor writes from a worker thread while a follower reads)

    def since(self, position: int) -> tuple[bytes, int]:
        """What was written from ``position`` on, and the position after it (for ``logs --follow``); what the cut
        dropped is said, not given."""
        with self._lock:
            head, tail, total = bytes(self._head), bytes(self._tail), self.total
        if position >= total:
            return b"", total
        tail_start = total - len(tail)
        if position >= tail_start:
            return tail[position - tail_start:], total
        text = head[position:] if position < len(head) else b""
        skipped = tail_start - max(position, len(head))
        if skipped > 0:
            text += f"\n[... {skipped} bytes cut by eventswarm ...]\n".encode()
        return text + tail, total

    def write(self, chunk: bytes) -> None:
        with self._lock:
            self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        half = self._limit // 2
        room = half - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        self._tail += chunk
        excess = len(self._tail) - (self._limit - half)
        if excess > 0:
            del self._tail[:excess]
            self.dropped += excess

    def getvalue(self) -> bytes:
        if not self.dropped:
            return bytes(self._head + self._tail)
        return bytes(self._head) + f"\n[... {self.dropped} bytes cut by eventswarm ...]\n".encode() + bytes(self._tail)


class LiveOutput:
    """The output of invocations running now, by invocation id, for ``logs --follow``: an executor that reads its
    function's output as it comes (process, docker) shows its captures here while the function runs. Bounded by
    the invocations in flight."""

    def __init__(self) -> None:
        self.running: dict[str, tuple[Capture, Capture]] = {}

    @contextlib.contextmanager
    def showing(self, invocation_id: str, stdout: Capture, stderr: Capture) -> Iterator[None]:
        self.running[invocation_id] = (stdout, stderr)
        try:
            yield
        finally:
            self.running.pop(invocation_id, None)


LIVE = LiveOutput()


def environment(invocation: Invocation, input_path: str | None) -> dict[str, str]:
    """The function's environment: its own ``env``, then the ``EVENTSWARM_*`` variables."""
    env = dict(invocation.function.env)
    env.update(invocation.env)
    if input_path:
        env["EVENTSWARM_INPUT"] = input_path
    else:
        env.pop("EVENTSWARM_INPUT", None)
    return env


def tar_file(path: str, data: bytes, mode: int = 0o444) -> bytes:
    """A tar archive of one file (what ``put_archive`` copies into a container)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size = len(data)
        info.mode = mode
        info.mtime = int(time.time())
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def hardened_host_config(api: Any, network: str, function: FunctionConfig, binds: list[str], **extra: Any) -> Any:
    """A function container's host config (cold or warm alike): the network, the function's limits, every capability
    dropped, no-new-privileges; ``binds`` plus the function's secrets and mounts."""
    binds = binds + [f"{Path(secret).resolve()}:/run/secrets/{Path(secret).name}:ro" for secret in function.secrets]
    binds += [f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}" for m in function.volumes]
    return api.create_host_config(
        network_mode=network,
        mem_limit=function.memory,
        nano_cpus=int(function.cpus * 1e9) if function.cpus else None,
        pids_limit=function.pids_limit,
        read_only=function.read_only,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        binds=binds or None,
        **extra,
    )
