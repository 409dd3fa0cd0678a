"""Executors: where a batch runs — a Swarm job, a container on one Docker engine, or a local process."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from dispatcher.config import ConfigBase, ExecutorConfig, FunctionConfig
from dispatcher.executors.base import Capture, Executor, ExecutorDefaults, Invocation, Result

__all__ = ["Capture", "Executor", "Invocation", "Result", "create"]


def _process(config: ExecutorConfig, owner: str, scratch: str) -> Executor:
    from dispatcher.executors.process import ProcessExecutor

    return ProcessExecutor(config, owner)


def _swarm(config: ExecutorConfig, owner: str, scratch: str) -> Executor:
    from dispatcher.executors.swarm import SwarmExecutor

    return SwarmExecutor(config)


def _docker(config: ExecutorConfig, owner: str, scratch: str) -> Executor:
    from dispatcher.executors.docker import DockerExecutor

    return DockerExecutor(config, scratch)


def _auto(config: ExecutorConfig, owner: str, scratch: str) -> Executor:
    return AutoExecutor(config, scratch)


KINDS: dict[str, Callable[[ExecutorConfig, str, str], Executor]] = {
    "process": _process, "swarm": _swarm, "docker": _docker, "auto": _auto}
"""Each ``executor.kind`` and what makes its executor (from its config, the daemon's owner mark and the scratch
folder of input files); the modules behind them are imported only when chosen (the Docker SDK is heavy)."""


def create(config: ConfigBase, owner: str = "") -> Executor:
    """The executor that ``executor.kind`` names; ``auto`` decides when it starts. ``owner`` names the daemon."""
    beside = Path.cwd() if config.daemon.postgres else Path(config.daemon.state_path).resolve().parent
    scratch = config.executor.scratch_dir or str(beside / "eventswarm-inputs")
    return KINDS[config.executor.kind](config.executor, owner, scratch)


class AutoExecutor(ExecutorDefaults):
    """``kind = "auto"``: the swarm executor if the engine is an active Swarm manager, else docker. Warm functions
    run on the engine's own pool either way (a warm container is one engine's)."""

    def __init__(self, config: ExecutorConfig, scratch: str) -> None:
        from dispatcher.executors.docker import DockerExecutor

        self.config = config
        self.docker = DockerExecutor(config, scratch)
        self.chosen: Executor = self.docker

    @property
    def kind(self) -> str:
        return self.chosen.kind

    async def start(self) -> None:
        from dispatcher.executors.engine import connect
        from dispatcher.executors.swarm import SwarmExecutor

        client = await connect(self.config)
        try:
            swarm = await anyio.to_thread.run_sync(lambda: client.api.info().get("Swarm", {}))
        finally:
            client.close()
        if swarm.get("LocalNodeState") == "active" and swarm.get("ControlAvailable"):
            self.chosen = SwarmExecutor(self.config)
        await self.chosen.start()
        await self.docker.start()

    async def run(self, invocation: Invocation) -> Result:
        if invocation.function.warm is not None:
            return await self.docker.run(invocation)
        return await self.chosen.run(invocation)

    async def prepare(self, functions: Mapping[str, FunctionConfig], owner: str) -> None:
        await self.docker.prepare(functions, owner)

    def pools(self) -> list[dict[str, Any]]:
        return self.docker.pools()

    async def ping(self) -> bool:
        return await self.chosen.ping()

    async def gc(self, owner: str | None) -> int:
        return await self.chosen.gc(owner)

    async def adopt(self, invocation: Invocation) -> Result | None:
        """A gone replica's job, on a Swarm (``SwarmExecutor.adopt``); None on a single engine (it runs again)."""
        return await self.chosen.adopt(invocation)

    async def close(self) -> None:
        if self.chosen is not self.docker:
            await self.chosen.close()
        await self.docker.close()
