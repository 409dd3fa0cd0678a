"""Paths in the config are relative to the config file's folder, as Compose and most daemons read theirs: the
state, watched folders, secret and token files, certificates, an ABI file, a process function's working folder.

``parse`` sets the folder while it validates (``config_folder``); ``ConfigPath`` is a ``str`` field that comes out
absolute. A config given in code, with no file, is relative to the current folder. ``~`` is the user's home.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

_FOLDER: ContextVar[Path | None] = ContextVar("eventswarm_config_folder", default=None)


@contextlib.contextmanager
def config_folder(folder: Path) -> Iterator[None]:
    """Within it, relative config paths are taken from ``folder``."""
    token = _FOLDER.set(folder)
    try:
        yield
    finally:
        _FOLDER.reset(token)


def from_config(value: str) -> str:
    """``value`` made absolute against the config file's folder ("" stays "": not given)."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return os.path.normpath(path)
    return os.path.normpath((_FOLDER.get() or Path.cwd()).absolute() / path)


ConfigPath = Annotated[str, AfterValidator(from_config)]
"""A path in the config: relative to the config file's folder; absolute once validated."""
