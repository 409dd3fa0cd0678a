"""Executors: where a batch runs — a container on one Docker engine, or a local process."""

from __future__ import annotations

from pathlib import Path

from dispatcher.config import ConfigBase
from dispatcher.executors.base import Capture, Executor, Invocation, Result

__all__ = ["Capture", "Executor", "Invocation", "Result", "create"]


def create(config: ConfigBase) -> Executor:
    """The executor that ``executor.kind`` names (``auto``: docker, until the swarm executor lands)."""
    kind = config.executor.kind
    if kind == "process":
        from dispatcher.executors.process import ProcessExecutor

        return ProcessExecutor(config.executor)
    from dispatcher.executors.docker import DockerExecutor

    scratch = config.executor.scratch_dir or str(Path(config.daemon.state_path).resolve().parent / "eventswarm-inputs")
    return DockerExecutor(config.executor, scratch)
