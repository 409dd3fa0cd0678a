"""What both modes of the file source need to read a folder that others write (docs/configuration.md, file source).

A drop folder is often writable by people or systems that may not read the host's files. So:

- names are bytes: a name that is not UTF-8 travels as its readable form (each undecodable byte as ``\\xNN``)
  and, losslessly, as base64 (``filenamebase64``); state-store keys use the base64 for such names;
- what is read is opened with ``O_NOFOLLOW`` (a symbolic link is not followed unless ``follow_symlinks``),
  ``O_NONBLOCK`` (a FIFO never blocks the source) and checked after the open: a regular file, inside the folder
  (the path the kernel opened, read back from ``/proc/self/fd``) unless ``allow_outside``;
- what the source writes beside a dropped file (its reason file, the folders it makes) gets the owner and mode of
  the dropped file (of the watched folder, for folders): the daemon running as root never makes a dropped file's
  name or content readable by others.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

NAME_MAX = 255
"""Bytes in one file name (Linux)."""


class Refused(Exception):
    """An entry of the folder that is not read: a symbolic link not followed or pointing outside, a special file, a
    file over ``max_file_size``. Its message says why."""


def raw(name: str | os.PathLike[str]) -> bytes:
    """A name as the file system has it (undecodable bytes come back from their surrogate escapes)."""
    return os.fsencode(name)


def display(name: str | os.PathLike[str]) -> str:
    """A name as valid text: itself when it is UTF-8, else each undecodable byte as ``\\xNN``."""
    return raw(name).decode("utf-8", "backslashreplace")


def is_text(name: str | os.PathLike[str]) -> bool:
    try:
        raw(name).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def name_extensions(**names: str | os.PathLike[str]) -> dict[str, str]:
    """CloudEvents extensions for names (``filename=rel`` ...): the readable form, and ``<key>base64`` with the exact
    bytes when the name is not UTF-8."""
    extensions = {}
    for key, name in names.items():
        extensions[key] = display(name)
        if not is_text(name):
            extensions[f"{key}base64"] = base64.b64encode(raw(name)).decode()
    return extensions


def state_key(prefix: str, rel: str) -> str:
    """A state-store key for a relative path: the path itself when it is UTF-8, else ``\\x7f`` and its bytes in
    base64 (keys are text)."""
    return prefix + (rel if is_text(rel) else "\x7f" + base64.urlsafe_b64encode(raw(rel)).decode())


def kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return kind
    return "special file"


def inside(path: str, folder: str) -> bool:
    """Is the resolved ``path`` within the resolved ``folder``?"""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def resolve_link(path: str, *, follow: bool, allow_outside: bool, root: str) -> os.stat_result:
    """(A scan's look at a symbolic link, without opening it.) What it points to, if it may be read."""
    if not follow:
        raise Refused("a symbolic link (not followed: follow_symlinks = true reads what links inside the folder "
                      "point to)")
    real = os.path.realpath(path)
    if not allow_outside and not inside(real, root):
        raise Refused(f"a symbolic link to {display(real)}, outside the folder (allow_outside = false)")
    try:
        st = os.stat(real)
    except OSError:
        raise Refused("a broken symbolic link") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"a symbolic link to a {kind_of(st.st_mode)}: only regular files are read")
    return st


def open_regular(path: Path, *, follow: bool, allow_outside: bool, root: str, base: Path | None = None) -> int:
    """Open ``path`` to read, as a drop folder's entry may be: never blocking, a symbolic link only with ``follow``
    (a relative one resolved from ``base``, the folder it was dropped in), and only a regular file inside ``root``
    unless ``allow_outside``. Raises ``Refused`` (why it is not read) or ``OSError``."""
    target: str | Path = path
    if follow:
        try:
            link = os.readlink(path)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # (EINVAL: not a link)
                raise
        else:
            target = os.path.join(base if base is not None else path.parent, link)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise Refused("a symbolic link (not followed: follow_symlinks = true reads what links inside the "
                          "folder point to)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"a {kind_of(st.st_mode)}: only regular files are read")
        if follow and not allow_outside:
            real = os.readlink(f"/proc/self/fd/{fd}")  # (what the kernel opened, whatever was swapped meanwhile)
            if not inside(real, root):
                raise Refused(f"a symbolic link to {display(real)}, outside the folder (allow_outside = false)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def owner_of(path: Path) -> tuple[int, int, int]:
    """(uid, gid, mode) to give what is written beside ``path``: its own, read and write bits only (a link's or a
    special file's: owner read and write)."""
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode) & 0o666 if stat.S_ISREG(st.st_mode) else 0o600
    return st.st_uid, st.st_gid, mode


def write_like(path: Path, content: bytes, like: tuple[int, int, int]) -> None:
    """Write ``path`` atomically with the owner and mode ``like`` (the dropped file's)."""
    uid, gid, mode = like
    temporary = path.with_name(short_name(f".{path.name}", ".tmp"))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        _own(fd, uid, gid, mode)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(temporary, path)


def make_folders(folder: Path, top: Path) -> None:
    """``folder`` and its missing parents below ``top``, each with ``top``'s owner and mode."""
    if folder.is_dir():
        return
    st = os.stat(top)
    missing = []
    at = folder
    while not at.exists() and at != top and top in at.parents:
        missing.append(at)
        at = at.parent
    for new in reversed(missing):
        try:
            os.mkdir(new, 0o700)
        except FileExistsError:
            continue
        fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _own(fd, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        finally:
            os.close(fd)
    folder.mkdir(parents=True, exist_ok=True)  # (a folder outside top: as the process makes it)


def keep_owner(path: Path, like: tuple[int, int, int]) -> None:
    """(A file copied across file systems.) Give it back its owner and mode."""
    try:
        os.chown(path, like[0], like[1], follow_symlinks=False)
    except OSError:
        pass


def _own(fd: int, uid: int, gid: int, mode: int) -> None:
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        pass  # (not root: it stays the daemon's own)
    os.fchmod(fd, mode)


def short_name(name: str, suffix: str) -> str:
    """``name + suffix``, its name cut (with a hash of the whole, so names stay apart) where that is over
    ``NAME_MAX`` bytes."""
    whole = raw(name + suffix)
    if len(whole) <= NAME_MAX:
        return name + suffix
    digest = hashlib.sha256(raw(name)).hexdigest()[:8]
    keep = NAME_MAX - len(raw(suffix)) - len(digest) - 1
    return os.fsdecode(raw(name)[:keep]) + "~" + digest + suffix


def reason(**fields: Any) -> dict[str, Any]:
    """A reason file's content: ``file`` in its readable form, with ``filebase64`` when it is not UTF-8."""
    name = fields.pop("file")
    return {**{("file" if k == "filename" else "filebase64"): v for k, v in name_extensions(filename=name).items()},
            **fields}
