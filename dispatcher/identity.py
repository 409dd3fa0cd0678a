"""A function's ``user`` as the process executor takes it: a user and group of this host."""

from __future__ import annotations

import grp
import pwd
from typing import Any


class Identity:
    """``user`` as a process takes it: ``uid[:gid]`` or ``name[:group]`` (as docker reads it)."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid
        self.gid = gid

    @classmethod
    def of(cls, user: str) -> Identity:
        """Raises ``ValueError`` for a user or group this host does not know."""
        name, _, group = user.partition(":")
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
            uid, gid = entry.pw_uid, entry.pw_gid
        except KeyError:
            if not name.isdigit():
                raise ValueError(f"no user {name!r} on this host") from None
            uid, gid = int(name), int(name)  # a uid without a name, as containers often use
        if group:
            try:
                gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            except KeyError:
                raise ValueError(f"no group {group!r} on this host") from None
        return cls(uid, gid)

    def popen(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}
