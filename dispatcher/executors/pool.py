"""A warm pool: the containers of one function (one version of its config), idle or busy, taken for a batch and
given back, replaced when their image changes, retired when idle too long. Everything here runs in the docker
executor's worker threads and the upkeep thread, under the pool's condition variable; the engine work (starting and
removing containers) is the ``PoolEngine``'s, ``warm.WarmPools``."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from dispatcher.config import FunctionConfig, WarmConfig
from dispatcher.errors import ExecutorError
from dispatcher.executors.engine import ENGINE_ERRORS, engine_error
from dispatcher.executors.link import TICK, Link

log = logging.getLogger("eventswarm.warm")


class PoolEngine(Protocol):
    """What a pool needs of the executor that keeps it."""

    api: Any
    doomed: deque[Container]
    """Containers out of their pool, for the upkeep thread to remove."""

    def start_container(self, pool: Pool) -> Container: ...

    def remove(self, container: Container) -> None: ...

    def wake(self) -> None: ...


@dataclass(eq=False)
class Container:
    """One warm container of a pool."""

    id: str
    link: Link
    generation: int
    image: Image
    """What it runs (its argv comes from it when the function gives no command)."""
    started: float = field(default_factory=time.monotonic)
    idle_since: float = field(default_factory=time.monotonic)
    batches: int = 0


@dataclass(frozen=True, slots=True)
class Image:
    """What a pool's containers run: the image's id and its own program (entrypoint and command)."""

    id: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]


def pool_key(name: str, function: FunctionConfig) -> str:
    """A pool per function and per version of its config: never shared across functions."""
    return f"{name}:{hashlib.sha256(function.model_dump_json().encode()).hexdigest()[:16]}"


class Pool:
    """The warm containers of one function (one version of its config)."""

    def __init__(self, engine: PoolEngine, name: str, function: FunctionConfig, owner: str) -> None:
        assert function.warm is not None
        self.engine = engine
        self.name = name
        self.function = function
        self.settings: WarmConfig = function.warm
        self.owner = owner
        self.idle: deque[Container] = deque()
        self.busy: set[Container] = set()
        self.starting = 0
        self.generation = 0
        self.image: Image | None = None
        self.image_checked = 0.0
        self.retired = False
        self.starts = 0
        self.replacements: Counter[str] = Counter()
        self.cond = threading.Condition()

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.starting

    def stats(self) -> dict[str, Any]:
        with self.cond:
            return {"function": self.name, "size": self.size, "idle": len(self.idle), "busy": len(self.busy),
                    "starting": self.starting, "max": self.settings.max, "starts": self.starts,
                    "replacements": dict(self.replacements), "mode": self.settings.mode}

    # -- taking and giving back ------------------------------------------------------------

    def acquire(self, cancelled: threading.Event) -> Container:
        """An idle container, a new one if the pool has room, or the next one given back."""
        with self.cond:
            while True:
                if cancelled.is_set():
                    raise ExecutorError("the daemon shut down while the batch waited for a warm container")
                while self.idle:
                    container = self.idle.pop()  # the most recently used: the others age out
                    if container.generation != self.generation:
                        self._drop_later(container, "image")
                    elif (fault := container.link.idle_fault()) is not None:
                        self._drop_later(container, fault)
                    else:
                        self.busy.add(container)
                        return container
                if self.size < self.settings.max:
                    self.starting += 1
                    break
                self.cond.wait(TICK)
        try:
            container = self.start()
        except BaseException:
            with self.cond:
                self.starting -= 1
                self.cond.notify_all()
            raise
        with self.cond:
            self.starting -= 1
            self.busy.add(container)
        return container

    def release(self, container: Container, replace: str | None) -> None:
        """Give ``container`` back after a batch; ``replace`` (why) removes it instead."""
        if replace is None and container.batches >= self.settings.max_batches:
            replace = "max_batches"
        if replace is None and (self.retired or container.generation != self.generation):
            replace = "image" if not self.retired else "retired"
        if replace is not None:
            self.engine.remove(container)
            with self.cond:
                self.replacements[replace] += 1
                self.busy.discard(container)
                self.cond.notify_all()
            self.engine.wake()
            return
        with self.cond:
            self.busy.discard(container)
            container.idle_since = time.monotonic()
            self.idle.append(container)
            self.cond.notify_all()

    def _drop_later(self, container: Container, why: str) -> None:
        """(With the lock held.) ``container`` leaves the pool; the upkeep thread removes it."""
        self.replacements[why] += 1
        self.engine.doomed.append(container)
        self.engine.wake()

    # -- upkeep -------------------------------------------------------------------------------

    def image_of(self) -> Image:
        if self.image is None:
            self.refresh_image()
        assert self.image is not None
        return self.image

    def refresh_image(self) -> None:
        """Look at what the function's image is now: a new image id replaces the pool's containers."""
        self.image_checked = time.monotonic()
        try:
            attrs = self.engine.api.inspect_image(self.function.image)
        except (*ENGINE_ERRORS, OSError) as exc:
            if self.image is None:
                raise engine_error(exc, f"cannot start a warm container for {self.function.image!r}") from exc
            return  # (the image went away meanwhile: the containers that run keep running)
        config = attrs.get("Config") or {}
        image = Image(attrs["Id"], tuple(config.get("Entrypoint") or ()), tuple(config.get("Cmd") or ()))
        with self.cond:
            if self.image is not None and image.id != self.image.id:
                log.info("warm pool %s: image %s is now %s; its containers are replaced", self.name,
                         self.function.image, image.id[:19])
                self.generation += 1
                while self.idle:
                    self._drop_later(self.idle.popleft(), "image")
            self.image = image

    def upkeep(self, now: float, may_start: bool) -> list[Container] | None:
        """(The upkeep thread.) Retire idle containers past ``idle_ttl`` (returned, to be removed); None when the pool
        wants one more container started (``may_start``), and counts it as starting."""
        with self.cond:
            old: list[Container] = []
            ttl = self.settings.idle_ttl
            while self.idle and (self.retired or now - self.idle[0].idle_since >= ttl):
                old.append(self.idle.popleft())
                self.replacements["retired" if self.retired else "idle_ttl"] += 1
            # (killed from outside, the engine restarted; or it spoke while idle)
            for container, fault in [(c, f) for c in self.idle if (f := c.link.idle_fault()) is not None]:
                self.idle.remove(container)
                old.append(container)
                self.replacements[fault] += 1
            if old or self.retired:
                return old
            if may_start and len(self.idle) + self.starting < self.settings.min_idle and self.size < self.settings.max:
                self.starting += 1
                return None
            return []

    def prewarm(self) -> None:
        """(The upkeep thread, after ``upkeep`` said so.) Start one container and make it idle."""
        try:
            container = self.start()
        except BaseException:
            with self.cond:
                self.starting -= 1
            raise
        with self.cond:
            self.starting -= 1
            self.idle.append(container)
            self.cond.notify_all()

    def start(self) -> Container:
        container = self.engine.start_container(self)
        with self.cond:
            self.starts += 1
        return container
