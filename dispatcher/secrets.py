"""Secrets that the config names but never holds: environment variables (``*_env``) or files (``*_file``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Secret:
    """One secret, or several during a rotation (a verifier accepts any of them).

    Each variable in ``env`` holds one secret, whole: spaces are part of it (GitHub's own test
    secret is ``It's a Secret to Everybody``). ``file`` holds one secret per line; line ends and
    blank lines are not part of any. A connector keeps the keys ``<name>_env`` / ``<name>_file``
    in its config model and builds a ``Secret`` from them with ``Secret.of``.
    """

    env: tuple[str, ...] = ()
    file: str = ""

    @classmethod
    def of(cls, env: str | Sequence[str], file: str = "") -> Secret:
        """From a ``*_env`` value (one variable, or a list for a rotation) and a ``*_file`` value."""
        names = (env,) if isinstance(env, str) else tuple(env)
        return cls(tuple(name for name in names if name), file)

    @property
    def given(self) -> bool:
        return bool(self.env or self.file)

    def problem(self, name: str) -> str | None:
        """What keeps it from being read, said for config keys ``<name>_env`` / ``<name>_file``; None if nothing."""
        if bool(self.env) == bool(self.file):
            return f"{name}_env: give exactly one of {name}_env or {name}_file"
        for variable in self.env:
            if not os.environ.get(variable):
                return f"{name}_env: environment variable {variable} is not set"
        if self.file:
            if not Path(self.file).is_file():
                return f"{name}_file: {self.file} is not a readable file"
            if not self.values():
                return f"{name}_file: {self.file} holds no secret"
        return None

    def values(self) -> list[str]:
        """Every secret it names (read now: a rotated file or variable is read again at each start)."""
        if self.env:
            return [os.environ.get(variable, "") for variable in self.env]
        lines = Path(self.file).read_text(encoding="utf-8").split("\n")
        return [line.removesuffix("\r") for line in lines if line.strip()]

    def value(self) -> str:
        """The one secret (a password, a URL with an API key); the first, during a rotation."""
        return self.values()[0]
