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

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from connectors.folder import (
    CLAIM_CHUNK,
    KEPT_LIMIT,
    PROCESSING,
    FileSourceConfig,
    Folder,
    Refused,
    display,
    keep_owner,
    make_folders,
    name_extensions,
    open_regular,
    owner_of,
    raw,
    reason,
    short_name,
    state_key,
    write_like,
)
from connectors.tail import Lines
from dispatcher.api import (
    Event,
    Outcome,
    Run,
    Source,
    SourceContext,
    SourceError,
    parse_json,
    rfc3339,
)

log = logging.getLogger("eventswarm.file")

FORGET_EVERY = 600.0
"""Seconds between two forgets of files done longer ago than ``remember_done``."""

__all__ = ["FileSource", "FileSourceConfig"]


class FileSource(Source[FileSourceConfig]):
    config_model = FileSourceConfig
    single_reader = True
    """Among replicas sharing a state store, one reads it at a time: the holder of its lease."""

    def __init__(self, config: FileSourceConfig) -> None:
        super().__init__(config)
        self.folder = Folder(config)
        self.root = self.folder.root
        self.done_dir = self.folder.done_dir
        self.failed_dir = self.folder.failed_dir
        self._pending: dict[str, tuple[int, int, float]] = {}
        """Files seen and not yet claimed: relative path -> (size, change time in ns, when first seen so)."""
        self._kept: dict[str, tuple[int, int]] = {}
        """Files done and left in place (``keep``): relative path -> (size, change time) when left."""
        self._ctx: SourceContext | None = None
        """The context of the run under way (a replayed file's success is remembered through it)."""

    @property
    def scans(self) -> int:
        """Scans of the folder so far (for status and tests)."""
        return self.folder.scans

    # -- running --------------------------------------------------------------------------------

    async def run(self, ctx: SourceContext) -> None:
        if self.config.mode == "lines":
            self.lines = Lines(self.folder, ctx)
            await self.lines.run()
            return
        self.claims = self.root / PROCESSING / ctx.trigger
        self._ctx = ctx
        await anyio.to_thread.run_sync(self.folder.prepare, self.claims)
        await self._forget(ctx)
        ctx.set_ready(True)
        left = await anyio.to_thread.run_sync(self._claimed)
        for at in range(0, len(left), CLAIM_CHUNK):
            await self._dispatch(ctx, left[at:at + CLAIM_CHUNK])  # left by a crash: taken up again
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.folder.watch)
            first, forgotten = True, time.monotonic()
            while True:
                wait = await self._scan_and_claim(ctx, first)
                first = False
                if time.monotonic() - forgotten >= FORGET_EVERY:
                    forgotten = time.monotonic()
                    await self._forget(ctx)
                with anyio.move_on_after(min(wait, self.folder.rescan_every)):
                    await self.folder.dirty.wait()
                self.folder.dirty = anyio.Event()

    async def _forget(self, ctx: SourceContext) -> None:
        """Forget the files done longer ago than ``remember_done`` (at start, and every ``FORGET_EVERY`` while running:
        a daemon that runs for months keeps a week of them, not months)."""
        await ctx.checkpoints.forget("done/", time.time() - self.config.remember_done)

    # -- scanning and claiming ------------------------------------------------------------------

    async def _scan_and_claim(self, ctx: SourceContext, first: bool) -> float:
        """Claim and hand over every complete file; return how long until a file seen may be complete."""
        self.folder.scans += 1
        try:
            files, others, refused = await anyio.to_thread.run_sync(self.folder.scan)
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
            self.folder.warn_once(rel, f"cannot claim {display(self.root / rel)}: {exc.strerror or exc}; it stays where it is")
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
                self.folder.warn_once(rel, f"{display(self.root / rel)} is not read: {why}; it stays where it is "
                                     "(on_failure = \"keep\")")
                continue
            log.warning("%s is not read: %s; it is moved to %s", display(self.root / rel), why,
                        display(self.failed_dir))
            with contextlib.suppress(FileNotFoundError):
                self._finish(rel, "failed", reason(file=rel, status="refused", error=why, trigger=trigger,
                                                   at=rfc3339(time.time())), source=self.root / rel)

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
                          root=self.folder.real_root, base=(self.root / rel).parent)
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

    async def replayed(self, event: Event) -> None:
        """A dead-lettered file whose replay succeeded leaves the failed folder, as if it had succeeded the first time
        (``on_success``), with its reason file; it is remembered as done."""
        extensions = event.extensions or {}
        if self.config.mode != "file" or self.failed_dir is None or "filename" not in extensions:
            return
        name = extensions.get("filenamebase64")
        rel = os.fsdecode(base64.b64decode(name)) if name else str(extensions["filename"])
        if self._ctx is not None:  # remembered first (as for any file done): the file is not run again
            await self._ctx.checkpoints.put({state_key("done/", rel): json.dumps({"sha256": extensions.get("sha256"),
                                                                                  "result": "done"})})
        await anyio.to_thread.run_sync(self._out_of_failed, rel, str(extensions.get("sha256", "")))

    def _out_of_failed(self, rel: str, sha256: str) -> bool:
        """Move ``rel`` (the copy in the failed folder whose content is still ``sha256``) per ``on_success``."""
        assert self.failed_dir is not None
        for n in range(10):  # (a name taken in the failed folder got .1, .2…)
            failed = self.failed_dir / rel if n == 0 else (self.failed_dir / rel).with_name(
                short_name(Path(rel).name, f".{n}"))
            try:
                with os.fdopen(open_regular(failed, follow=False, allow_outside=False, root=str(self.failed_dir)),
                               "rb") as handle:
                    same = hashlib.file_digest(handle, "sha256").hexdigest() == sha256
            except (OSError, Refused):
                continue
            if not same:
                continue
            with contextlib.suppress(FileNotFoundError):
                failed.with_name(short_name(failed.name, ".error.json")).unlink()
            self._finish(rel, "done", None, source=failed)
            log.info("%s: its replay succeeded; it leaves the failed folder", display(rel))
            return True
        return False

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
