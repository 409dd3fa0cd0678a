"""eventswarm: a daemon that turns event streams into batched container invocations."""

from dispatcher.api import Outcome, Source, SourceConfig, SourceContext
from dispatcher.config import Config, load
from dispatcher.errors import ConfigError, ExecutorError, SourceError
from dispatcher.events import Event

__all__ = [
    "Config", "ConfigError", "Event", "ExecutorError", "Outcome", "Source", "SourceConfig", "SourceContext",
    "SourceError", "load",
]
