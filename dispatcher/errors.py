"""The error hierarchy: what went wrong, and what the daemon should do next."""

from __future__ import annotations


class EventswarmError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(EventswarmError):
    """The configuration is invalid; ``problems`` holds ``(toml_path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], file: str | None = None,
                 origins: dict[int, str] | None = None) -> None:
        self.problems = problems
        self.file = file
        self.origins = origins or {}
        """Where a problem's value came from when not from the file (by its index): an environment variable."""
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        lines = []
        for i, (path, message) in enumerate(self.problems):
            origin = self.origins.get(i) or self.file
            prefix = f"{origin}: " if origin else ""
            lines.append(f"{prefix}{path}: {message}" if path else f"{prefix}{message}")
        return lines


class StoreError(EventswarmError):
    """The state store cannot be read or written: disk full, a damaged file, no permission.

    A temporary one (the disk is full) means: wait and try again; nothing was stored. A permanent
    one (the file is damaged, the directory unreadable) stops the daemon at start with one line.
    """

    def __init__(self, message: str, *, temporary: bool = True) -> None:
        self.temporary = temporary
        super().__init__(message)


class SourceError(EventswarmError):
    """A source cannot read events. ``temporary`` ones are retried by the daemon."""

    def __init__(self, message: str, *, temporary: bool = True) -> None:
        self.temporary = temporary
        super().__init__(message)


class ExecutorError(EventswarmError):
    """The executor could not run an invocation (engine down, image missing, input too large).

    A temporary error means: wait and try again; a permanent one means: dead-letter now.
    ``unavailable`` means that nothing could start (the disk for the input file is full): the batch
    waits and tries again without using up an attempt.
    """

    def __init__(self, message: str, *, temporary: bool = True, unavailable: bool = False) -> None:
        self.temporary = temporary or unavailable
        self.unavailable = unavailable
        super().__init__(message)


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
