"""Lines mode of the file source: every new complete line of the matching files is one event.

Files are known by identity (device and inode, with a fingerprint of their first bytes against a
reused inode), not by name. Each has a ``Progress`` tracker over byte offsets (a line's position is
the offset just past its newline), so the offset saved in the state store (``file/<device>:<inode>``)
never passes a line whose batch has not succeeded or been dead-lettered.

- A line without its newline yet waits. A line longer than ``max_line`` is cut (only that much is
  held), with the extension ``linelength`` giving its real length.
- Rotation by rename: the renamed file keeps being read, through the descriptor already open, to its
  end (until it has not grown for ``ROTATED_GRACE``); the new file at the name starts at 0.
- Truncation (copytruncate) restarts the file at 0. The copy, found by its fingerprint, is read
  from where the original was read up to, so the lines written between the last read and the copy
  are not lost (those written between the copy and the truncation are lost to copytruncate itself).
- A file renamed away while the daemon was down is found again by its inode in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Mapping
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

import anyio

from connectors.folder import Folder, Refused, display, name_extensions, open_regular
from dispatcher.api import Committer, Event, Outcome, Progress, Run, SourceContext, SourceError, Span, rfc3339

log = logging.getLogger("eventswarm.file")

FINGERPRINT = 256
"""Bytes of a file's head that tell it apart from another file on a reused inode, and find its copy."""
READ_CHUNK = 1024 * 1024
"""Bytes read from one file at a time."""
ROTATED_GRACE = 10.0
"""How long a file no longer at a watched name is still read after it last grew (a writer may not have
reopened its log yet)."""
POLL = 1.0
"""How often open files are checked for growth when no change notification comes."""
MAX_FILES = 1000
"""Files open at once; more matching files wait for a later scan."""
COPY_AGE = 60.0
"""A copytruncate copy was made at most this long before the truncation was seen."""

Line = tuple[int, int, bytes, int]
"""What a run keeps of a line: its end offset (past the newline), its start, its bytes, its real length."""


def _end(line: Line) -> int:
    return line[0]


def _same(position: int) -> int:
    return position


class Tail:
    """One open file (by identity) being read."""

    def __init__(self, ident: str, fd: int, rel: str, start: int, fingerprint: tuple[str, int], limit: int) -> None:
        self.ident = ident
        self.fd = fd
        self.rel = rel
        self.read_at = start
        """Where the next read begins (past the complete lines handed over, and the partial line held)."""
        self.partial = bytearray()
        self.partial_length = 0
        """The real length of the partial line (it may be longer than what is held, at ``max_line``)."""
        self.fingerprint = fingerprint
        self.progress: Progress[int] = Progress(start, after=_same, limit=limit)
        self.present = True
        """Seen at a watched name in the last scan."""
        self.grew = time.monotonic()

    @property
    def handed_over(self) -> int:
        """The offset past the last complete line handed over."""
        return self.read_at - self.partial_length


def fingerprint_of(fd: int, size: int) -> tuple[str, int]:
    """The sha256 of a file's first bytes (up to ``FINGERPRINT``), and how many bytes it covers."""
    head = os.pread(fd, min(size, FINGERPRINT), 0)
    return hashlib.sha256(head).hexdigest(), len(head)


class Lines:
    def __init__(self, folder: Folder, ctx: SourceContext) -> None:
        self.folder = folder
        self.config = folder.config
        self.ctx = ctx
        self.tails: dict[str, Tail] = {}
        self.committer = Committer(self._save, self.config.commit_interval)

    # -- running --------------------------------------------------------------------------------

    async def run(self) -> None:
        folder = self.folder
        await anyio.to_thread.run_sync(folder.prepare, None)
        self.ctx.set_ready(True)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(folder.watch)
                tg.start_soon(self.committer.run)
                await self._scan(first=True)
                await self._recover()
                next_scan = time.monotonic() + folder.rescan_every
                while True:
                    busy = await self._read_round()
                    if time.monotonic() >= next_scan or folder.dirty.is_set():
                        folder.dirty = anyio.Event()
                        await self._scan(first=False)
                        next_scan = time.monotonic() + folder.rescan_every
                        continue
                    if not busy:
                        with anyio.move_on_after(POLL):
                            await folder.dirty.wait()
        finally:
            for tail in self.tails.values():
                os.close(tail.fd)
            self.tails.clear()

    async def _save(self, positions: Mapping[str, int]) -> None:
        values = {}
        for ident, offset in positions.items():
            tail = self.tails.get(ident)
            if tail is not None:
                values[f"file/{ident}"] = json.dumps({"offset": offset, "fingerprint": tail.fingerprint[0],
                                                      "covers": tail.fingerprint[1], "path": tail.rel})
        if values:
            await self.ctx.checkpoints.put(values)

    # -- finding files --------------------------------------------------------------------------

    async def _scan(self, *, first: bool) -> None:
        try:
            files, others, refused = await anyio.to_thread.run_sync(self.folder.scan)
        except OSError as exc:
            raise SourceError(f"cannot read folder {self.folder.root}: {exc.strerror or exc}") from None
        for rel, why in refused:  # (lines mode moves nothing: it says so once, and leaves them)
            self.folder.warn_once(rel, f"{display(self.folder.root / rel)} is not read: {why}")
        if first and not files and others:
            log.warning("no file in %s matches patterns %s (%d other files there)", self.folder.root,
                        self.config.patterns, others)
        for tail in self.tails.values():
            tail.present = False
        for rel, _size, _change, ident in files:
            known = self.tails.get(ident)
            if known is not None:
                known.rel, known.present = rel, True
            elif len(self.tails) < MAX_FILES:
                await self._open(rel, ident, first=first)

    async def _open(self, rel: str, ident: str, *, first: bool, start: int | None = None) -> Tail | None:
        """Start reading the file at ``rel`` (if it still is ``ident``): from its checkpoint, from where its
        original was read up to (a copytruncate copy), or from its start (its end, at a first start with
        ``start_at = "end"``)."""
        path = self.folder.root / rel
        config = self.config
        try:
            fd = open_regular(path, follow=config.follow_symlinks, allow_outside=config.allow_outside,
                              root=self.folder.real_root)
        except Refused as why:
            self.folder.warn_once(rel, f"{display(path)} is not read: {why}")
            return None
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                self.folder.warn_once(rel, f"cannot read {display(path)}: {exc.strerror or exc}")
            return None
        st = os.fstat(fd)
        if f"{st.st_dev}:{st.st_ino}" != ident:
            os.close(fd)
            return None  # replaced since the scan: the next scan opens the new one
        fingerprint = fingerprint_of(fd, st.st_size)
        if start is None:
            start = await self._resume(ident, fd, st.st_size, fingerprint)
        if start is None:
            copied = self._copy_of(fd, st.st_size, fingerprint)
            start = copied.handed_over if copied is not None else (
                st.st_size if first and self.config.start_at == "end" else 0)
            if copied is not None:
                log.info("%s is a copy of %s: read from offset %d, where the original was read up to", rel,
                         copied.rel, start)
        tail = Tail(ident, fd, rel, start, fingerprint, self.config.max_uncommitted)
        self.tails[ident] = tail
        self.committer.trackers[ident] = tail.progress
        return tail

    async def _resume(self, ident: str, fd: int, size: int, fingerprint: tuple[str, int]) -> int | None:
        saved = await self.ctx.checkpoints.get(f"file/{ident}")
        if saved is None:
            return None
        state = json.loads(saved)
        covers = int(state.get("covers", 0))
        if covers > size or fingerprint_of(fd, covers)[0] != state.get("fingerprint"):
            return None  # another file on a reused inode
        offset = int(state["offset"])
        return offset if offset <= size else 0  # truncated while the daemon was down: from the start

    def _copy_of(self, fd: int, size: int, fingerprint: tuple[str, int]) -> Tail | None:
        """An open file this new one is a copy of (copytruncate): the same head, and the same bytes just
        before where the original was read up to."""
        if fingerprint[1] < FINGERPRINT:
            return None  # too short to tell
        for tail in self.tails.values():
            upto = tail.handed_over
            if tail.fingerprint != fingerprint or size < upto:
                continue
            at = max(0, upto - FINGERPRINT)
            if os.pread(fd, upto - at, at) == os.pread(tail.fd, upto - at, at):
                return tail
        return None

    async def _recover(self) -> None:
        """Files with a saved offset that are no longer at a watched name (renamed while the daemon was
        down): found again by inode in their folder, and read to their end."""
        saved = await self.ctx.checkpoints.items("file/")
        missing = {key.removeprefix("file/"): json.loads(value) for key, value in saved.items()
                   if key.removeprefix("file/") not in self.tails}
        if not missing:
            return
        gone = []
        for ident, state in missing.items():
            found = await anyio.to_thread.run_sync(self._find_inode, ident, state.get("path", ""))
            if found is None:
                gone.append(f"file/{ident}")
                continue
            tail = await self._open(found, ident, first=False)
            if tail is not None:
                tail.present = False
                log.info("%s (renamed from %s) is read to its end", found, state.get("path"))
        if gone:
            await self.ctx.checkpoints.delete(gone)

    def _find_inode(self, ident: str, rel: str) -> str | None:
        inode = int(ident.split(":")[1])
        folder = (self.folder.root / rel).parent
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.inode() == inode and entry.is_file(follow_symlinks=False):
                        return str(Path(entry.path).relative_to(self.folder.root))
        except OSError:
            return None
        return None

    # -- reading --------------------------------------------------------------------------------

    async def _read_round(self) -> bool:
        """Read what each open file has new; hand its complete lines over. True if anything was read."""
        busy = False
        lag = 0
        for tail in list(self.tails.values()):
            size = _size_of(tail.fd)
            if size < tail.read_at:
                await self._truncated(tail)
                size = _size_of(tail.fd)
            lag += size - tail.handed_over
            if size > tail.read_at:
                if not tail.progress.has_room(1):
                    continue  # its lines wait on one unsettled line: this file pauses
                busy |= await self._read(tail)
            elif not tail.present and time.monotonic() - tail.grew > ROTATED_GRACE and not tail.progress.in_flight:
                await self._close(tail)
        self.ctx.set_lag(lag, "bytes")
        return busy

    async def _read(self, tail: Tail) -> bool:
        chunk = await anyio.to_thread.run_sync(os.pread, tail.fd, READ_CHUNK, tail.read_at)
        if not chunk:
            return False
        tail.grew = time.monotonic()
        start = tail.read_at - tail.partial_length
        tail.read_at += len(chunk)
        if tail.fingerprint[1] < FINGERPRINT and tail.read_at > tail.fingerprint[1]:
            tail.fingerprint = fingerprint_of(tail.fd, tail.read_at)
        lines = self._split(tail, chunk, start)
        if lines:
            await self.ctx.emit_run(self._run(tail, lines))
        return True

    def _split(self, tail: Tail, chunk: bytes, start: int) -> list[Line]:
        """The complete lines of the partial line held and ``chunk``; what follows the last newline is held."""
        limit = self.config.max_line
        lines: list[Line] = []
        pieces = chunk.split(b"\n")
        held, length = tail.partial, tail.partial_length
        for piece in pieces[:-1]:
            length += len(piece)
            if len(held) < limit:
                held += piece[:limit - len(held)]
            end = start + length + 1
            text = bytes(held)
            lines.append((end, start, text[:-1] if text.endswith(b"\r") else text, length))
            start, held, length = end, bytearray(), 0
        last = pieces[-1]
        if len(held) < limit:
            held += last[:limit - len(held)]
        tail.partial, tail.partial_length = held, length + len(last)
        return lines

    def _run(self, tail: Tail, lines: list[Line]) -> Run:
        received = time.time()
        template = self._template(tail)
        now = rfc3339(received).encode()
        encoded, ids = [], []
        prefix = f"{tail.ident}/"
        for end, start, text, length in lines:
            checksum = zlib.crc32(text)  # once per line: in the id, and in its encoding
            ids.append(f"{prefix}{start}-{checksum:08x}")
            try:
                data = encode_basestring(text.decode("utf-8")).encode()
            except UnicodeDecodeError:
                encoded.append(self._event(tail, (end, start, text, length), received).encode())
                continue
            extra = b"" if length == len(text) else b',"linelength":%d' % length
            encoded.append(template % (start, checksum, now, start, extra, data))
        span = tail.progress.track_nowait([line[0] for line in lines])
        return Run(encoded, ids, lines,
                   lambda line: self._event(tail, line, received), ack=self._settle, token=span,
                   partition=tail.ident, received=received)

    def _template(self, tail: Tail) -> bytes:
        def literal(text: str) -> bytes:
            return encode_basestring(text).encode().replace(b"%", b"%%")

        names = [b',"%s":%s' % (key.encode(), literal(value)) for key, value in name_extensions(filename=tail.rel).items()]

        return b"".join((
            b'{"specversion":"1.0","id":', literal(tail.ident + "/")[:-1], b'%d-%08x","source":',
            literal(f"file://{self.folder.root}"), b',"type":"eventswarm.file.line","time":"%s",',
            b'"datacontenttype":"text/plain","subject":', literal(display(tail.rel)), *names,
            b',"fileoffset":%d%s,"data":%s}'))

    def _event(self, tail: Tail, line: Line, received: float) -> Event:
        _, start, text, length = line
        extensions: dict[str, Any] = {**name_extensions(filename=tail.rel), "fileoffset": start}
        if length != len(text):
            extensions["linelength"] = length
        common: dict[str, Any] = {"id": _id(tail, line), "source": f"file://{self.folder.root}",
                                  "type": "eventswarm.file.line", "subject": display(tail.rel), "time": rfc3339(received),
                                  "extensions": extensions, "partition": tail.ident, "received": received}
        try:
            return Event(data=text.decode("utf-8"), datacontenttype="text/plain", **common)
        except UnicodeDecodeError:
            extensions["dataerror"] = "not valid UTF-8"
            return Event(data_base64=text, datacontenttype="application/octet-stream", **common)

    async def _settle(self, run: Run, outcome: Outcome) -> None:
        span: Span[int] = run.token
        span.settle(run.payloads, key=_end)

    # -- rotation and truncation ----------------------------------------------------------------

    async def _truncated(self, tail: Tail) -> None:
        """The file shrank (copytruncate, or emptied by hand): read its copy's rest, then the file from 0."""
        size = _size_of(tail.fd)
        log.info("%s was truncated (from %d to %d bytes): read again from its start", tail.rel, tail.read_at, size)
        copy = await anyio.to_thread.run_sync(self._find_copy, tail)
        if copy is not None and copy[1] not in self.tails:
            opened = await self._open(copy[0], copy[1], first=False, start=tail.handed_over)
            if opened is not None:
                opened.present = False  # read to its end, then let go (unless it is at a watched name)
                log.info("its copy %s is read from offset %d, where the original was read up to", copy[0],
                         tail.handed_over)
        fresh = Tail(tail.ident, tail.fd, tail.rel, 0, fingerprint_of(tail.fd, size), self.config.max_uncommitted)
        self.tails[tail.ident] = fresh
        self.committer.trackers[tail.ident] = fresh.progress  # lines of the old content settle on the old tracker
        await self._save({tail.ident: 0})  # at once: a restart must not resume at the old offset

    def _find_copy(self, tail: Tail) -> tuple[str, str] | None:
        """A file in the same folder whose head is this file's head before it was truncated, and at least as long
        as what was read of it."""
        if tail.fingerprint[1] < FINGERPRINT:
            return None
        folder = (self.folder.root / tail.rel).parent
        try:
            with os.scandir(folder) as entries:
                candidates = [e for e in entries if e.is_file(follow_symlinks=False)]
                for entry in candidates:
                    st = entry.stat()
                    ident = f"{st.st_dev}:{st.st_ino}"
                    if ident == tail.ident or st.st_size < tail.handed_over or time.time() - st.st_ctime > COPY_AGE:
                        continue
                    fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        if fingerprint_of(fd, FINGERPRINT) == tail.fingerprint:
                            return str(Path(entry.path).relative_to(self.folder.root)), ident
                    finally:
                        os.close(fd)
        except OSError:
            return None
        return None

    async def _close(self, tail: Tail) -> None:
        """A file no longer at a watched name, read to its end and settled: let it go, and its checkpoint."""
        await self.committer.save([tail.ident])
        del self.tails[tail.ident]
        self.committer.trackers.pop(tail.ident, None)
        os.close(tail.fd)
        await self.ctx.checkpoints.delete([f"file/{tail.ident}"])
        log.info("%s is no longer watched and was read to its end", tail.rel)


def _id(tail: Tail, line: Line) -> str:
    """A line's event id: its file, offset and a checksum (the same line keeps it; the same offset after a
    truncation does not)."""
    return f"{tail.ident}/{line[1]}-{zlib.crc32(line[2]):08x}"


def _size_of(fd: int) -> int:
    return os.fstat(fd).st_size
