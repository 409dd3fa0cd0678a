"""File-drop source: each complete file in a folder becomes one event, claimed by an atomic rename.

The folder is the truth; watch events (watchfiles) are only hints. It is scanned at start, on every
watch event and every ``rescan_interval``, so a file dropped while the daemon was down, or a kernel
event that was missed, is still picked up. A file is complete once its size and change time (the
later of mtime and ctime: a copy keeps its old mtime) have not changed for ``stable_for``.

A complete file is renamed into ``<path>/.processing/<trigger>/`` (same file system: atomic, and
no other reader gets it), read, and handed over as one event. When its event is settled the file
moves per ``on_success`` or, once retries are used up, per ``on_failure``, with a
``<name>.error.json`` beside it saying why. Files left in ``.processing`` by a crash are taken up
again at start. A file identical (same path, same sha256) to one already done is not dispatched
again; that memory lives in the state store and is forgotten after ``remember_done``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import Field, ValidationInfo, field_validator, model_validator

from connectors.folder import (
    Refused,
    display,
    keep_owner,
    kind_of,
    make_folders,
    name_extensions,
    open_regular,
    owner_of,
    raw,
    reason,
    resolve_link,
    short_name,
    state_key,
    write_like,
)
from dispatcher.api import (
    Duration,
    Event,
    Outcome,
    Run,
    Size,
    Source,
    SourceConfig,
    SourceContext,
    SourceError,
    parse_json,
    rfc3339,
)

log = logging.getLogger("eventswarm.file")

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
    path: str
    """The folder to watch (made absolute)."""
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
    def _absolute(cls, path: str) -> str:
        if not path:
            raise ValueError("name the folder to watch")
        return os.path.abspath(os.path.expanduser(path))

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

    def target(self, key: str) -> Path | None:
        """The folder ``on_success``/``on_failure`` moves files to (None: delete or keep)."""
        value = getattr(self, key)
        if not value.startswith("move:"):
            return None
        return Path(self.path, value[5:].strip()).resolve()


class FileSource(Source[FileSourceConfig]):
    config_model = FileSourceConfig
    single_reader = True
    """Among replicas sharing a state store, one reads it at a time: the holder of its lease."""

    def __init__(self, config: FileSourceConfig) -> None:
        super().__init__(config)
        self.root = Path(config.path)
        self.done_dir = config.target("on_success")
        self.failed_dir = config.target("on_failure")
        self._pending: dict[str, tuple[int, int, float]] = {}
        """Files seen and not yet claimed: relative path -> (size, change time in ns, when first seen so)."""
        self._kept: dict[str, tuple[int, int]] = {}
        """Files done and left in place (``keep``): relative path -> (size, change time) when left."""
        self._warned: set[str] = set()
        self._dirty = anyio.Event()
        self.watching = True
        """False while watching the folder failed (until it is watched again): it is scanned every second then."""
        self.real_root = os.path.realpath(self.root)
        """The folder with its links resolved: what a followed link must point within."""
        self.scans = 0
        """Scans of the folder so far (for status and tests)."""

    # -- running --------------------------------------------------------------------------------

    async def run(self, ctx: SourceContext) -> None:
        if self.config.mode == "lines":
            from connectors.tail import Lines

            self.lines = Lines(self, ctx)
            await self.lines.run()
            return
        self.claims = self.root / PROCESSING / ctx.trigger
        await anyio.to_thread.run_sync(self._prepare)
        await ctx.checkpoints.forget("done/", time.time() - self.config.remember_done)
        ctx.set_ready(True)
        left = await anyio.to_thread.run_sync(self._claimed)
        for at in range(0, len(left), CLAIM_CHUNK):
            await self._dispatch(ctx, left[at:at + CLAIM_CHUNK])  # left by a crash: taken up again
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            first = True
            while True:
                wait = await self._scan_and_claim(ctx, first)
                first = False
                with anyio.move_on_after(min(wait, self.rescan_every)):
                    await self._dirty.wait()
                self._dirty = anyio.Event()

    def _prepare(self) -> None:
        root = self.root
        if not root.is_dir():
            raise SourceError(f"folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
        if self.config.mode == "lines":
            return  # reading needs no write access
        try:
            make_folders(self.claims, root)
            probe = self.claims / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise SourceError(f"cannot write in {root} ({exc.strerror or exc}): claiming files renames them into "
                              f"{self.claims.parent}") from None

    @property
    def rescan_every(self) -> float:
        """Seconds between two scans without a change notification."""
        return self.config.rescan_interval if self.watching else min(self.config.rescan_interval, 1.0)

    async def _watch(self) -> None:
        """Set ``_dirty`` on every batch of changes; without notifications, the periodic rescan alone finds files."""
        try:
            from watchfiles import awatch
        except ImportError:  # pragma: no cover - watchfiles is a dependency
            log.warning("watchfiles is not installed: the folder is rescanned every %gs", self.config.rescan_interval)
            return
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
                        self._dirty.set()
                    break
                except (OSError, RuntimeError, ExceptionGroup) as caught:  # (awatch's own task group wraps them)
                    # (a name watchfiles cannot decode, a folder gone: the scans, which read names as bytes, go on)
                    exc = _only(caught)
                    if not isinstance(exc, (OSError, RuntimeError)):
                        raise
                    if time.monotonic() - started > 60:
                        pause = 1.0
                    message = str(exc).encode("utf-8", "backslashreplace").decode()
                    self._warn_once(f"watch\0{type(exc).__name__}",
                                    f"watching {display(self.root)} failed ({message}): watching again in {pause:g}s, "
                                    f"and the folder is scanned meanwhile")
                    self.watching = False
                    self._dirty.set()
                    await anyio.sleep(pause)
                    pause = min(pause * 2, self.config.rescan_interval)
            tg.cancel_scope.cancel()

    # -- scanning and claiming ------------------------------------------------------------------

    async def _scan_and_claim(self, ctx: SourceContext, first: bool) -> float:
        """Claim and hand over every complete file; return how long until a file seen may be complete."""
        self.scans += 1
        try:
            files, others, refused = await anyio.to_thread.run_sync(self._scan)
        except OSError as exc:
            raise SourceError(f"cannot read folder {self.root}: {exc.strerror or exc}") from None
        if refused:
            await anyio.to_thread.run_sync(self._refuse_all, refused, ctx.trigger)
        if first and not files and others:
            log.warning("no file in %s matches patterns %s (%d other files there)", self.root, self.config.patterns,
                        others)
        now, mono = time.time(), time.monotonic()
        stable = self.config.stable_for
        pending: dict[str, tuple[int, int, float]] = {}
        ready: list[tuple[int, str]] = []
        soonest = float("inf")
        for rel, size, change, _ in files:
            if self._kept.get(rel) == (size, change):
                continue  # done, and left in place
            seen = self._pending.get(rel)
            since = seen[2] if seen is not None and seen[:2] == (size, change) else mono
            pending[rel] = (size, change, since)
            wait = max(since + stable - mono, change / 1e9 + stable - now)
            if wait <= 0:
                ready.append((change, rel))
            else:
                soonest = min(soonest, wait)
        self._pending = pending
        ctx.set_lag(len(pending), "files")
        ordered = [rel for _, rel in sorted(ready)]  # oldest first
        for at in range(0, len(ordered), CLAIM_CHUNK):
            chunk = ordered[at:at + CLAIM_CHUNK]
            claimed = await anyio.to_thread.run_sync(self._claim_all, chunk)
            for rel in chunk:
                self._pending.pop(rel, None)
            ctx.set_lag(len(self._pending), "files")
            await self._dispatch(ctx, claimed)  # waits while the trigger's buffer is full: claiming stops
        return soonest + 0.01

    def _scan(self) -> tuple[list[tuple[str, int, int, str]], int, list[tuple[str, str]]]:
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
                            if config.recursive and Path(entry.path) not in skip and not self._ignored(entry.name):
                                stack.append(rel)
                            continue
                        if not self._wanted(rel, entry.name):
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

    def _ignored(self, name: str) -> bool:
        extra = COMPRESSED if self.config.mode == "lines" else ()
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in (*self.config.ignore, *ALWAYS_IGNORED, *extra))

    def _wanted(self, rel: str, name: str) -> bool:
        if self._ignored(name):
            return False
        return any(fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern) for pattern in self.config.patterns)

    def _claim_all(self, rels: list[str]) -> list[str]:
        return [rel for rel in rels if self._claim(rel)]

    def _claim(self, rel: str) -> bool:
        """Rename the file into the claim folder (a link: the link itself, never what it points to); False when it
        vanished, or cannot be moved (said once)."""
        target = self.claims / rel
        if os.path.lexists(target):
            return False  # a file of that name is still in flight: claimed once that one is done
        try:
            make_folders(target.parent, self.root)
            os.rename(self.root / rel, target)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._warn_once(rel, f"cannot claim {display(self.root / rel)}: {exc.strerror or exc}; it stays where it is")
            return False
        return True

    def _claimed(self) -> list[str]:
        """What a crash left in the claim folder: every entry but folders (links and special files too, which are
        then refused as they would have been)."""
        found = []
        stack = [self.claims]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    else:
                        found.append(str(Path(entry.path).relative_to(self.claims)))
        return sorted(found)

    def _refuse_all(self, refused: list[tuple[str, str]], trigger: str) -> None:
        """Entries of the folder that are not read: moved per ``on_failure`` with their reason (a warning each), or
        left where they are (one warning)."""
        for rel, why in refused:
            if self.failed_dir is None:
                self._warn_once(rel, f"{display(self.root / rel)} is not read: {why}; it stays where it is "
                                     "(on_failure = \"keep\")")
                continue
            log.warning("%s is not read: %s; it is moved to %s", display(self.root / rel), why,
                        display(self.failed_dir))
            with contextlib.suppress(FileNotFoundError):
                self._finish(rel, "failed", reason(file=rel, status="refused", error=why, trigger=trigger,
                                                   at=rfc3339(time.time())), source=self.root / rel)

    def _warn_once(self, key: str, message: str) -> None:
        """``message`` as a warning, once per ``key`` (bounded)."""
        if key not in self._warned:
            if len(self._warned) >= KEPT_LIMIT:
                self._warned.clear()
            self._warned.add(key)
            log.warning("%s", message)

    # -- events ---------------------------------------------------------------------------------

    async def _dispatch(self, ctx: SourceContext, rels: list[str]) -> None:
        """Hand claimed files over as one run, an event each (a file that cannot be read, or was done before,
        is settled at once)."""
        if not rels:
            return
        read = await anyio.to_thread.run_sync(self._events, rels)
        known = await ctx.checkpoints.get_many([state_key("done/", rel) for rel, found in read
                                                if isinstance(found, tuple)])
        events: list[Event] = []
        files: dict[str, tuple[str, str, int]] = {}
        settled: list[tuple[str, str, dict[str, Any] | None]] = []
        for rel, found in read:
            if isinstance(found, FileNotFoundError):
                continue  # removed from the claim folder by hand
            if isinstance(found, Changed):
                log.info("%s changed while it was read: it goes back, and is read once it is complete", display(rel))
                await anyio.to_thread.run_sync(self._unclaim, rel)
                continue
            if isinstance(found, Refused):
                log.warning("%s is not read: %s; it is moved as failed", display(self.claims / rel), found)
                settled.append((rel, "failed", reason(file=rel, status="refused", error=str(found),
                                                      trigger=ctx.trigger, at=rfc3339(time.time()))))
                continue
            if isinstance(found, OSError):
                log.warning("cannot read %s: %s; it is moved as failed", display(self.claims / rel),
                            found.strerror or found)
                settled.append((rel, "failed", reason(file=rel, status="unreadable", trigger=ctx.trigger,
                                                      error=f"cannot read: {found.strerror or found}",
                                                      at=rfc3339(time.time()))))
                continue
            event, digest, size = found
            before = known.get(state_key("done/", rel))
            if before is not None and json.loads(before).get("sha256") == digest:
                log.info("%s was done before (same sha256): not run again", display(rel))
                settled.append((rel, json.loads(before).get("result", "done"), None))
                continue
            events.append(event)
            files[event.id] = (rel, digest, size)
        if settled:
            await anyio.to_thread.run_sync(self._finish_all, settled)
        if not events:
            return

        async def ack(part: Run, outcome: Outcome) -> None:
            if not outcome.settled:
                return
            result = "failed" if outcome.status == "dead-lettered" else "done"
            done = [files[event_id] for event_id in part.ids]
            # Remembered first: should the move not happen (a crash), the file is not run again.
            await ctx.checkpoints.put({state_key("done/", rel): json.dumps({"sha256": digest, "result": result})
                                       for rel, digest, _ in done})
            await anyio.to_thread.run_sync(self._finish_all, [
                (rel, result, None if result == "done" else reason(
                    file=rel, size=size, sha256=digest, status=outcome.status, error=outcome.error,
                    exit_code=outcome.exit_code, invocation_id=outcome.invocation_id,
                    at=rfc3339(time.time()), trigger=ctx.trigger))
                for rel, digest, size in done])

        await ctx.emit_run(Run.of(events, ack))

    def _events(self, rels: list[str]) -> list[tuple[str, tuple[Event, str, int] | OSError | Refused | Changed]]:
        found: list[tuple[str, tuple[Event, str, int] | OSError | Refused | Changed]] = []
        for rel in rels:
            try:
                found.append((rel, self._event(rel)))
            except (OSError, Refused, Changed) as exc:
                found.append((rel, exc))
        return found

    def _event(self, rel: str) -> tuple[Event, str, int]:
        config = self.config
        path = self.claims / rel
        limit = config.max_inline
        digest = hashlib.sha256()
        fd = open_regular(path, follow=config.follow_symlinks, allow_outside=config.allow_outside,
                          root=self.real_root, base=(self.root / rel).parent)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if st.st_size > config.max_file_size:
                raise Refused(f"{st.st_size} bytes, over max_file_size ({config.max_file_size} bytes)")
            # (a followed link travels as the path of what it points to: a function's mount shows that, not the link)
            real = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.islink(path) else path
            content = f.read(limit + 1)
            digest.update(content)
            inline = len(content) <= limit
            size = len(content)
            if not inline:
                while size <= config.max_file_size and (chunk := f.read(1024 * 1024)):
                    digest.update(chunk)
                    size += len(chunk)
            after = os.fstat(fd)
        if size != st.st_size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise Changed(rel)  # (never half a file: it is read again once complete)
        sha = digest.hexdigest()
        extensions: dict[str, Any] = {**name_extensions(filename=rel, filepath=real), "filesize": size, "sha256": sha}
        common: dict[str, Any] = {
            "id": hashlib.sha256(raw(rel) + b"\0" + sha.encode()).hexdigest()[:32],
            "source": f"file://{display(self.root)}", "type": "eventswarm.file.created", "subject": display(rel),
            "time": rfc3339(st.st_mtime), "extensions": extensions}
        if not inline:
            return Event(data={"path": display(real)}, datacontenttype="application/json", **common), sha, size
        if rel.lower().endswith(".json"):
            try:
                return Event(data=parse_json(content), datacontenttype="application/json", **common), sha, size
            except (ValueError, RecursionError) as exc:
                extensions["dataerror"] = f"not valid JSON: {exc}"[:200]
        else:
            try:
                return Event(data=content.decode("utf-8"), datacontenttype="text/plain", **common), sha, size
            except UnicodeDecodeError:
                pass
        return Event(data_base64=content, datacontenttype="application/octet-stream", **common), sha, size

    # -- after settlement -----------------------------------------------------------------------

    def _finish_all(self, files: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        for rel, result, why in files:
            self._finish(rel, result, why)

    def _unclaim(self, rel: str) -> None:
        """A file that changed while it was read goes back to the folder (under a free name), to be read once it is
        complete."""
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.claims / rel, _free(self.root / rel))
        _prune_empty((self.claims / rel).parent, self.claims)

    def _finish(self, rel: str, result: str, why: dict[str, Any] | None, source: Path | None = None) -> None:
        """Move a claimed file (or ``source``) per ``on_success`` (``result = "done"``) or ``on_failure``, with its
        reason file (``why``), which gets the file's owner and mode."""
        source = source if source is not None else self.claims / rel
        action = self.config.on_success if result == "done" else self.config.on_failure
        if action == "delete":
            with contextlib.suppress(FileNotFoundError):
                source.unlink()
            return
        folder = self.root if action == "keep" else (self.done_dir if result == "done" else self.failed_dir)
        assert folder is not None
        like = owner_of(source)
        target = _free(folder / rel)
        make_folders(target.parent, self.root)
        if why is not None:
            write_like(target.with_name(short_name(target.name, ".error.json")),
                       json.dumps(why, indent=2).encode(), like)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return
        except OSError:  # another file system
            shutil.move(source, target)
            keep_owner(target, like)
        if action == "keep":
            st = target.stat()
            if len(self._kept) >= KEPT_LIMIT:
                self._kept.clear()
            self._kept[str(target.relative_to(self.root))] = (st.st_size, max(st.st_mtime_ns, st.st_ctime_ns))
        _prune_empty(source.parent, self.claims)


def _only(exc: BaseException) -> BaseException:
    """The one exception inside nested exception groups (``exc`` itself when it holds several, or is no group)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Changed(Exception):
    """A file changed (grew, was rewritten) while it was read."""


def _free(target: Path) -> Path:
    """``target``, or ``target.1``, ``target.2``…: the first name not taken (a file done before keeps its place);
    a name cut to fit where the suffix would make it too long."""
    candidate, n = target, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = target.with_name(short_name(target.name, f".{n}"))
    return candidate


def _prune_empty(folder: Path, top: Path) -> None:
    """Remove the empty subfolders a claim made, up to (not including) ``top``."""
    for parent in _upto(folder, top):
        try:
            parent.rmdir()
        except OSError:
            return


def _upto(folder: Path, top: Path) -> Iterator[Path]:
    while folder != top and top in folder.parents:
        yield folder
        folder = folder.parent
