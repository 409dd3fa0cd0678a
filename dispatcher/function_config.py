"""A function's config (``[functions.NAME]``): its program or image, limits, mounts, secrets and warm pool, and
what an executor cannot honour of it, or will not find at run time (``validate``)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator

from dispatcher.identity import Identity
from dispatcher.paths import ConfigPath, from_config
from dispatcher.placement import Constraint, check_key
from dispatcher.section import Section
from dispatcher.units import Duration, Size

_TEMPLATE = re.compile(r"\{([A-Za-z_][\w.]*)\}")


class Mount(NamedTuple):
    """A folder in a function's container: a host path (a bind mount) or a Docker volume, at ``target``."""

    source: str
    target: str
    read_only: bool

    @property
    def bind(self) -> bool:
        return self.source.startswith("/")

    @classmethod
    def parse(cls, text: str) -> Mount:
        parts = text.split(":")
        if len(parts) == 2:
            parts.append("ro")
        if len(parts) != 3 or parts[2] not in ("ro", "rw"):
            raise ValueError(f"{text!r} is not SOURCE:TARGET or SOURCE:TARGET:ro|rw")
        source, target, mode = parts
        if not target.startswith("/"):
            raise ValueError(f"{text!r}: the target {target!r} is not an absolute path in the container")
        if not source.startswith("/") and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", source):
            raise ValueError(f"{text!r}: the source is neither an absolute host path nor a volume name")
        return cls(os.path.normpath(source) if source.startswith("/") else source, os.path.normpath(target), mode == "ro")

    def covers(self, folder: str) -> bool:
        """Whether the host ``folder`` is inside this bind mount."""
        return self.bind and (folder == self.source or folder.startswith(self.source.rstrip("/") + "/"))


class WarmConfig(Section):
    """``warm``: keep a pool of running containers for the function (docker executor; docs/warm.md)."""

    min_idle: int = Field(1, ge=0, le=64)
    """Containers kept started and waiting, ready for the next batch."""
    max: int = Field(8, ge=1, le=256)
    """Containers at most, busy and idle (a batch waits for one past it)."""
    idle_ttl: Duration = 600.0
    """An idle container older than this since its last batch is replaced."""
    max_batches: int = Field(1000, ge=1)
    """A container is replaced after this many batches."""
    tmp_size: Size = 64 * 1024 * 1024
    """The tmpfs at /tmp, emptied between batches."""
    mode: Literal["runner", "persistent"] = "runner"
    """``runner``: the daemon's runner starts the image's program per batch, in a clean container. ``persistent``:
    the image's program reads the frames itself and keeps its state between batches."""

    @model_validator(mode="after")
    def _check(self) -> WarmConfig:
        if self.min_idle > self.max:
            raise ValueError(f"min_idle: {self.min_idle} is more than max ({self.max})")
        return self


class Preference(Section):
    """One placement preference, as Compose writes it: ``{ spread = "node.labels.zone" }``."""

    spread: str
    """The node attribute whose values the function's running jobs are spread evenly over."""

    @field_validator("spread")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_key(value.strip())


class Placement(Section):
    """``placement`` (swarm): where a function's jobs may run, as a Compose file's ``deploy.placement`` says it; a
    list alone is its constraints."""

    constraints: list[str] = []
    """``KEY == VALUE`` or ``KEY != VALUE``, e.g. ``"node.role == worker"``; all must hold."""
    preferences: list[Preference] = []
    """Spread the function's running jobs evenly over a node attribute's values (the first one first)."""
    max_replicas_per_node: int | None = Field(None, ge=1)
    """The function's jobs one node runs at once at most; a job waits for room (counted in ``start_timeout``)."""

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, value: list[str]) -> list[str]:
        for text in value:
            Constraint.parse(text)
        return [text.strip() for text in value]

    @property
    def chosen_by_daemon(self) -> bool:
        """Whether the daemon picks the nodes each job may go to (a spread or a limit: Swarm applies them per
        service, and each job is a service of its own)."""
        return bool(self.preferences) or self.max_replicas_per_node is not None

    def __bool__(self) -> bool:
        return bool(self.constraints) or self.chosen_by_daemon


class FunctionConfig(Section):
    image: str = ""
    """The container image (docker/swarm executors)."""
    command: list[str] = []
    """Entrypoint and arguments; default: the image's. For the process executor: the program to run (a relative
    program or argument is taken from ``workdir``)."""
    workdir: ConfigPath = Field("", validate_default=True)
    """process executor: the folder the program runs in; default: the config file's folder."""
    args: list[str] = []
    """Arguments after the command; may template event fields (``"{data.voter_id}"``) — then batches hold one event."""
    env: dict[str, str] = {}
    timeout: Duration = 60.0
    """Past it: SIGTERM, 5 s later SIGKILL; the attempt fails."""
    memory: Size | None = None
    cpus: float | None = Field(None, gt=0)
    pids_limit: int | None = Field(256, ge=1)
    read_only: bool = False
    """Root file system read-only."""
    user: str = ""
    secrets: list[str] = []
    """Files mounted read-only into the container (docker); Swarm secrets (swarm)."""
    placement: Placement = Placement()
    """swarm: where its jobs may run: constraints (a list, e.g. ``["node.role == worker"]``), or a table of
    ``constraints``, ``preferences`` (``[{ spread = "node.labels.zone" }]``) and ``max_replicas_per_node``."""
    mounts: list[str] = []
    """Folders in the container (docker, swarm): ``"SOURCE:TARGET"``, read-only, or ``"SOURCE:TARGET:rw"``.
    SOURCE is a host path (a bind mount: absolute, or ``./…`` from the config file's folder) or a Docker volume."""
    warm: WarmConfig | None = None
    """docker: a pool of running containers (``true``, ``"persistent"`` or a table of settings); default: a new
    container per batch."""

    @field_validator("placement", mode="before")
    @classmethod
    def _constraints_alone(cls, value: Any) -> Any:
        return {"constraints": value} if isinstance(value, list) else value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        return value or from_config(".")

    @field_validator("secrets")
    @classmethod
    def _secret_paths(cls, value: list[str]) -> list[str]:
        """A secret given as a path (with a ``/``, or ``~``) is a file, taken from the config file's folder; a bare
        name is a Swarm secret's."""
        return [from_config(entry) if "/" in entry or entry.startswith("~") else entry for entry in value]

    @field_validator("mounts")
    @classmethod
    def _mount_paths(cls, value: list[str]) -> list[str]:
        """A bind mount's source written ``./…``, ``../…`` or ``~/…`` is taken from the config file's folder (as
        Compose reads it); a bare name is a Docker volume."""
        resolved = []
        for text in value:
            source, colon, rest = text.partition(":")
            if colon and (source.startswith(("./", "../", "~")) or source in (".", "..")):
                text = f"{from_config(source)}:{rest}"
            resolved.append(text)
        return resolved

    @field_validator("warm", mode="before")
    @classmethod
    def _warm_shorthand(cls, value: Any) -> Any:
        if value is True or value == "runner":
            return {}
        if value is False:
            return None
        if value == "persistent":
            return {"mode": "persistent"}
        if not isinstance(value, (dict, WarmConfig)):
            raise ValueError(f'give true, "persistent" or a table such as {{ min_idle = 1, max = 8 }}, not {value!r}')
        return value

    @field_validator("mounts")
    @classmethod
    def _check_mounts(cls, mounts: list[str]) -> list[str]:
        for i, text in enumerate(mounts):
            try:
                Mount.parse(text)
            except ValueError as exc:
                raise ValueError(f"mounts[{i}]: {exc}") from None
        return mounts

    @property
    def volumes(self) -> list[Mount]:
        return [Mount.parse(text) for text in self.mounts]

    @property
    def templated(self) -> bool:
        return any(_TEMPLATE.search(arg) for arg in self.args)


def command_problems(function: FunctionConfig) -> Iterator[tuple[str, str]]:
    """A process function's program that cannot be found, and relative paths among its arguments that are not in
    its ``workdir``."""
    if not function.command:
        return
    program, *arguments = function.command
    if "/" in program:
        if not os.access(Path(function.workdir, program), os.X_OK):
            yield "command", f"{program} is not an executable file in {function.workdir} (its workdir)"
    elif shutil.which(program) is None:
        yield "command", f"{program} is not found on PATH"
    for argument in arguments:
        if "/" in argument and not argument.startswith(("-", "/", "{")) and "=" not in argument \
                and not Path(function.workdir, argument).exists():
            yield "command", f"{argument} is not in {function.workdir} (its workdir: a relative path is taken from there)"


def unsupported(function: FunctionConfig, executor: str) -> Iterator[tuple[str, str]]:
    """The function's keys that ``executor`` cannot honour, with why: refused, never ignored."""
    if "workdir" in function.model_fields_set and executor != "process":
        yield "workdir", "workdir is for the process executor: a container runs in its image's WORKDIR"
    if function.warm is not None and executor in ("process", "swarm"):
        yield "warm", (f"warm containers run on one Docker engine: the {executor} executor starts a new "
                       + ("process" if executor == "process" else "job") + " per batch (use executor kind docker or auto)")
    if executor == "process":
        if function.mounts:
            yield "mounts", ("the process executor runs functions on this host, which see its folders: mounts are "
                             "for the docker and swarm executors")
        if function.read_only:
            yield "read_only", "a process cannot be given a read-only root file system: use the docker executor"
        if function.placement:
            yield "placement", "placement constraints are for the swarm executor"
        if function.image:
            yield "image", "the process executor runs command, not an image: remove image, or use the docker executor"
        if function.user:
            try:
                identity = Identity.of(function.user)
            except ValueError as exc:
                yield "user", str(exc)
                return
            if os.geteuid() != 0 and identity.uid != os.geteuid():
                yield "user", (f"the daemon runs as uid {os.geteuid()}, not root: it cannot start processes as "
                               f"{function.user}")
    elif executor == "docker" and function.placement:
        yield "placement", "placement constraints are for the swarm executor"
