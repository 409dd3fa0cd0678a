"""Finding connectors: every source kind is a plug-in in the entry-point group ``eventswarm.connectors``."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from dispatcher.api import Source
from dispatcher.errors import ConfigError

GROUP = "eventswarm.connectors"


@cache
def connectors() -> dict[str, type[Source]]:  # type: ignore[type-arg]
    """Source classes by kind, loaded from the installed entry points."""
    found: dict[str, type[Source]] = {}  # type: ignore[type-arg]
    problems: list[tuple[str, str]] = []
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except ImportError as exc:
            problems.append(("", f"connector {ep.name!r} cannot be loaded ({exc}); pip install 'eventswarm[{ep.name}]'"))
            continue
        found[ep.name] = cls
    if not found and problems:
        raise ConfigError(problems)
    return found
