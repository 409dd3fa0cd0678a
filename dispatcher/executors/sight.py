"""What the Docker engine sees of this process's files: asked of the engine itself, never guessed.

A bind mount works only where the engine's host has the file at the same path: true for a daemon beside its
engine, false for a daemon in a container of its own with the engine's socket mounted (as ``deploy/`` runs it),
or for an engine on another host, even when the socket looks local and the host names agree. So the docker
executor asks: it creates a container (never started) from an image at hand, with the file bind-mounted
(``type=bind``: a path the engine's host lacks is refused, not made an empty folder), reads the file back
through the engine and compares it with what this process has. One probe per folder, kept for the executor's
life; the warm runner and the cold input files are each decided so (docs/warm.md, docs/configuration.md).
"""

from __future__ import annotations

import io
import logging
import secrets
import tarfile
import threading
from pathlib import Path
from typing import Any

import docker.errors
import requests.exceptions
from docker.types import Mount

from dispatcher.executors.base import LABEL_MANAGED, LABEL_OWNER

log = logging.getLogger("eventswarm.executor")

PROBE_DIR = "/run/eventswarm-probe"


class Sight:
    """Whether the engine sees this process's files, per folder, asked once (``sees``)."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self._known: dict[Path, bool] = {}
        self._lock = threading.Lock()

    def sees(self, path: Path, image: str, owner: str) -> bool:
        """Does the engine see ``path`` (a file of this process) as it is here? The first question about a folder
        costs a container create and a read (about 50 ms); raises the SDK's error when the probe cannot be made (a
        missing ``image``, an engine that does not answer), so that nothing is decided on a failed probe."""
        folder = path.parent
        with self._lock:
            if folder not in self._known:
                seen = self._probe(path, image, owner)
                self._known[folder] = seen
                log.info("the Docker engine %s this process's files under %s: %s", "sees" if seen else "does not see",
                         folder, "they are bind-mounted" if seen else "they are copied into containers")
            return self._known[folder]

    def sees_folder(self, folder: Path, image: str, owner: str) -> bool:
        """Does the engine see what this process writes in ``folder``? (Probed with a file of random bytes.)"""
        with self._lock:
            if folder in self._known:
                return self._known[folder]
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".engine-probe-{secrets.token_hex(8)}"
        probe.write_bytes(secrets.token_bytes(32))
        try:
            return self.sees(probe, image, owner)
        finally:
            probe.unlink(missing_ok=True)

    def _probe(self, path: Path, image: str, owner: str) -> bool:
        api = self.api
        expected = path.read_bytes()
        target = f"{PROBE_DIR}/{path.name}"
        host_config = api.create_host_config(network_mode="none", cap_drop=["ALL"],
                                              mounts=[Mount(target, str(path), type="bind", read_only=True)])
        try:
            created = api.create_container(image, entrypoint=["/eventswarm-probe"], host_config=host_config,
                                           labels={LABEL_MANAGED: "true", LABEL_OWNER: owner},
                                           name=f"eventswarm-probe-{secrets.token_hex(5)}")
        except docker.errors.APIError as exc:
            if exc.status_code == 400 and "does not exist" in str(exc.explanation or exc):
                return False  # (the engine's host has no such path)
            raise
        try:
            stream, _ = api.get_archive(created["Id"], target)
            archive = tarfile.open(fileobj=io.BytesIO(b"".join(stream)))
            member = archive.extractfile(archive.getmembers()[0])
            return member is not None and member.read() == expected
        except (docker.errors.NotFound, tarfile.TarError, IndexError):
            return False
        finally:
            try:
                api.remove_container(created["Id"], force=True)
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                pass  # (labelled: gc sweeps it)
