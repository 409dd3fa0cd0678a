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

One concern, a little over our usual length: these rules are the folder's safety, and they are checked side by side
with the watch and the scan that apply them (both modes, ``file.py`` and ``tail.py``, read the folder through it).
"""

from __future__ import annotations

import base64
import errno
import fnmatch
import hashlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import Field, ValidationInfo, field_validator, model_validator
from watchfiles import awatch

from dispatcher.api import ConfigPath, Duration, Size, SourceConfig, SourceError

log = logging.getLogger("eventswarm.file")

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
    named = name_extensions(file=fields.pop("file"))
    return {**named, **fields}


PROCESSING = ".processing"
SCAN_LIMIT = 50_000
"""Files one scan keeps track of (the rest are counted for the lag, and seen by a later scan)."""
CLAIM_CHUNK = 100
"""Files claimed, read and handed over together (one run)."""
KEPT_LIMIT = 100_000
"""Files left in place (``keep``) remembered in memory, so that a rescan does not claim them again."""
ALWAYS_IGNORED = ("*.error.json",)
"""The reason files the source writes itself."""
COMPRESSED = ("*.gz", "*.bz2", "*.xz", "*.zst", "*.lz4", "*.Z")
"""Lines mode never tails these: they are compressed rotations (logrotate's ``compress``), not text that grows."""


FILE_KEYS = {"stable_for", "on_success", "on_failure", "max_inline", "remember_done", "max_file_size"}
LINES_KEYS = {"max_line", "start_at", "max_uncommitted", "commit_interval"}


class FileSourceConfig(SourceConfig):
    kind: Literal["file"]
    path: ConfigPath
    """The folder to watch (relative to the config file's folder)."""
    patterns: list[str] = Field(["*"], min_length=1)
    """Globs of file names (or of paths relative to ``path`` when they hold a ``/``)."""
    ignore: list[str] = [".*", "*.tmp", "*.part"]
    """Globs of names never picked up: hidden files and files still being written, by default."""
    recursive: bool = False
    mode: Literal["file", "lines"] = "file"
    """``file``: each complete file is one event; ``lines``: each new complete line of the files is one."""
    stable_for: Duration = 1.0
    """A file is complete once its size and change time have not changed for this long."""
    on_success: str = "move:done/"
    """``move:<folder>`` (relative to ``path``, or absolute), ``delete`` or ``keep``."""
    on_failure: str = "move:failed/"
    """``move:<folder>`` or ``keep``; a ``<name>.error.json`` beside the file says why."""
    max_inline: Size = 1024 * 1024
    """Content up to this size travels in the event; a larger file travels as its path."""
    max_file_size: Size = 1024 ** 3
    """A larger file is not read (nor hashed): it is moved per ``on_failure``, with its reason."""
    follow_symlinks: bool = False
    """Read what symbolic links in the folder point to (regular files inside the folder only, unless
    ``allow_outside``); else a link is never opened, and is moved per ``on_failure`` with its reason."""
    allow_outside: bool = False
    """With ``follow_symlinks``: links may also point outside the folder (anyone who can write in the folder can
    then have the function read any file the daemon can read)."""
    remember_done: Duration = 7 * 86400.0
    """How long a file done is remembered (by path and sha256), so that the same file dropped again is not run again."""
    rescan_interval: Duration = 10.0
    max_line: Size = 1024 * 1024
    """lines: a longer line is cut to this many bytes (the extension ``linelength`` gives its length)."""
    start_at: Literal["beginning", "end"] = "beginning"
    """lines: where files found at the first start begin (files that appear later are read from their start)."""
    max_uncommitted: int = Field(100_000, ge=1)
    """lines: lines of one file in flight behind its first unsettled line before reading that file pauses."""
    commit_interval: Duration = 1.0
    """lines: how often settled offsets are saved (also when the source stops)."""
    force_polling: bool = False
    """Poll instead of kernel notifications (network file systems)."""

    @field_validator("path")
    @classmethod
    def _given(cls, path: str) -> str:
        if not path:
            raise ValueError("name the folder to watch")
        return path

    @field_validator("on_success", "on_failure")
    @classmethod
    def _action(cls, value: str, info: ValidationInfo) -> str:
        allowed = ("delete", "keep") if info.field_name == "on_success" else ("keep",)
        if value not in allowed and not (value.startswith("move:") and value[5:].strip()):
            choices = " | ".join(f'"{a}"' for a in ("move:<folder>", *allowed))
            raise ValueError(f"{value!r} is not one of {choices}")
        return value

    @model_validator(mode="after")
    def _keys_of_the_mode(self) -> FileSourceConfig:
        other = LINES_KEYS if self.mode == "file" else FILE_KEYS
        for key in sorted(other & self.model_fields_set):
            raise ValueError(f'{key}: only for mode = "{"lines" if self.mode == "file" else "file"}"')
        if self.allow_outside and not self.follow_symlinks:
            raise ValueError("allow_outside: only with follow_symlinks = true")
        return self

    def folders(self) -> list[str]:
        return [self.path] if self.mode == "file" else []  # lines never travel as a path

    def warnings(self) -> list[tuple[str, str]]:
        if not os.path.isdir(self.path):
            what = "does not exist" if not os.path.exists(self.path) else "is not a folder"
            return [("path", f"{self.path} {what}: the source fails at start until it is there")]
        return []

    def target(self, key: str) -> Path | None:
        """The folder ``on_success``/``on_failure`` moves files to (None: delete or keep)."""
        value = getattr(self, key)
        if not value.startswith("move:"):
            return None
        return Path(self.path, value[5:].strip()).resolve()

class Folder:
    """A watched folder, as both modes of the file source read it: its scans (what is there, what is refused, nothing
    opened), its change notifications (only hints: ``dirty`` makes a scan come sooner), and its warnings, said
    once each."""

    def __init__(self, config: FileSourceConfig) -> None:
        self.config = config
        self.root = Path(config.path)
        self.real_root = os.path.realpath(self.root)
        """The folder with its links resolved: what a followed link must point within."""
        self.done_dir = config.target("on_success")
        self.failed_dir = config.target("on_failure")
        self.dirty = anyio.Event()
        self.watching = True
        """False while watching the folder failed (until it is watched again): it is scanned every second then."""
        self.scans = 0
        """Scans of the folder so far (for status and tests)."""
        self._warned: set[str] = set()

    def prepare(self, claims: Path | None) -> None:
        """Check the folder; in file mode make (and try) the claim folder ``claims``, where files are renamed into."""
        root = self.root
        if not root.is_dir():
            raise SourceError(f"folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
        if claims is None:
            return  # (lines mode: reading needs no write access)
        try:
            make_folders(claims, root)
            probe = claims / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise SourceError(f"cannot write in {root} ({exc.strerror or exc}): claiming files renames them into "
                              f"{claims.parent}") from None

    @property
    def rescan_every(self) -> float:
        """Seconds between two scans without a change notification."""
        return self.config.rescan_interval if self.watching else min(self.config.rescan_interval, 1.0)

    async def watch(self) -> None:
        """Set ``dirty`` on every batch of changes; without notifications, the periodic rescan alone finds files."""
        processing = str(self.root / PROCESSING)

        def interesting(_change: Any, path: str) -> bool:
            return not path.startswith(processing)

        stop = anyio.Event()

        async def stopper() -> None:
            # watchfiles' thread waits for its own timeout unless told to stop: tell it when this is cancelled.
            try:
                await anyio.sleep_forever()
            finally:
                stop.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stopper)
            pause = 1.0
            while True:
                started = time.monotonic()
                try:
                    async for _ in awatch(self.root, recursive=self.config.recursive, stop_event=stop,
                                          force_polling=self.config.force_polling, watch_filter=interesting,
                                          debounce=100, step=20):
                        self.watching = True
                        self.dirty.set()
                    break
                except (OSError, RuntimeError, ExceptionGroup) as caught:  # (awatch's own task group wraps them)
                    # (a name watchfiles cannot decode, a folder gone: the scans, which read names as bytes, go on)
                    exc = _only(caught)
                    if not isinstance(exc, (OSError, RuntimeError)):
                        raise
                    if time.monotonic() - started > 60:
                        pause = 1.0
                    message = str(exc).encode("utf-8", "backslashreplace").decode()
                    self.warn_once(f"watch\0{type(exc).__name__}",
                                    f"watching {display(self.root)} failed ({message}): watching again in {pause:g}s, "
                                    f"and the folder is scanned meanwhile")
                    self.watching = False
                    self.dirty.set()
                    await anyio.sleep(pause)
                    pause = min(pause * 2, self.config.rescan_interval)
            tg.cancel_scope.cancel()

    def scan(self) -> tuple[list[tuple[str, int, int, str]], int, list[tuple[str, str]]]:
        """The matching files (relative path, size, change time in ns, ``device:inode``; a followed link's are its
        target's), how many other files there are, and the matching entries that are not read (relative path, why):
        links not followed, special files, files over ``max_file_size``. Nothing is opened."""
        config = self.config
        skip = {self.root / PROCESSING, self.done_dir, self.failed_dir}
        files: list[tuple[str, int, int, str]] = []
        refused: list[tuple[str, str]] = []
        others = 0
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            folder = self.root / rel_dir
            try:
                entries = os.scandir(folder)
            except OSError:
                if not rel_dir:
                    raise
                continue  # a subfolder that vanished or cannot be read
            with entries:
                for entry in entries:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if config.recursive and Path(entry.path) not in skip and not self.ignored(entry.name):
                                stack.append(rel)
                            continue
                        if not self.wanted(rel, entry.name):
                            others += 1
                            continue
                        if len(files) >= SCAN_LIMIT:
                            others += 1
                            continue
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISLNK(st.st_mode):
                            st = resolve_link(entry.path, follow=config.follow_symlinks,
                                              allow_outside=config.allow_outside, root=self.real_root)
                        elif not stat.S_ISREG(st.st_mode):
                            raise Refused(f"a {kind_of(st.st_mode)}: only regular files are read")
                        if config.mode == "file" and st.st_size > config.max_file_size:
                            raise Refused(f"{st.st_size} bytes, over max_file_size ({config.max_file_size} bytes)")
                    except Refused as why:
                        if len(refused) < CLAIM_CHUNK:
                            refused.append((rel, str(why)))
                        continue
                    except OSError:
                        continue  # vanished meanwhile
                    files.append((rel, st.st_size, max(st.st_mtime_ns, st.st_ctime_ns), f"{st.st_dev}:{st.st_ino}"))
        return files, others, refused

    def ignored(self, name: str) -> bool:
        extra = COMPRESSED if self.config.mode == "lines" else ()
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in (*self.config.ignore, *ALWAYS_IGNORED, *extra))

    def wanted(self, rel: str, name: str) -> bool:
        if self.ignored(name):
            return False
        return any(fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern) for pattern in self.config.patterns)

    def warn_once(self, key: str, message: str) -> None:
        """``message`` as a warning, once per ``key`` (bounded)."""
        if key not in self._warned:
            if len(self._warned) >= KEPT_LIMIT:
                self._warned.clear()
            self._warned.add(key)
            log.warning("%s", message)


def _only(exc: BaseException) -> BaseException:
    """The one exception inside nested exception groups (``exc`` itself when it holds several, or is no group)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
