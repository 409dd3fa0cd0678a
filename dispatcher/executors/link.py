"""The runner's control channel, seen from the daemon: frames over a warm container's attach socket.

A frame is a type byte, a 4-byte big-endian length and a payload. The daemon sends 'G' (go: the batch's token, then
its input), the runner answers 'B' (began), then 'O' and 'E' (output), then 'X' (the exit report, which begins with
the token). Anything else, or a frame past its type's limit, is a ``ProtocolError``: the container is replaced.
``docs/warm.md`` tells the whole protocol; ``runner/eventswarm-runner.c`` is the other end.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

from dispatcher.executors.engine import AttachStream

READY_TIMEOUT = 30.0
"""Seconds a new container's runner has to say it is ready (and the longest a send may wait for it to read)."""
TICK = 0.2
"""Seconds between two looks at a condition that is not signalled."""


class RunnerGone(Exception):
    """The runner's socket ended or broke: the container is gone or going."""


class ProtocolError(Exception):
    """The container sent what the frame protocol does not allow (an unknown type, a length past its limit, a report
    that is not the running batch's, anything while idle): the container is replaced, its batch fails."""


FRAME_LIMITS = {b"R": 256, b"B": 256, b"O": 1 << 20, b"E": 1 << 20, b"X": 256}
"""The frames a container may send, and the largest payload of each (the runner sends output in 64 KiB chunks)."""


class Link:
    """A warm container's attach socket: frames to the runner's stdin; Docker's multiplexed stdout (the runner's
    frames) and stderr (the runner's own complaints, the last 4 KiB kept) back."""

    def __init__(self, sock: socket.socket, closer: Any) -> None:
        self.sock = sock
        self._closer = closer
        self._stream = AttachStream(self._from)
        self._frames = bytearray()
        self.complaints = bytearray()
        sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)

    def send(self, frames: Iterable[tuple[bytes, bytes]]) -> None:
        data = memoryview(b"".join(kind + struct.pack(">I", len(payload)) + payload for kind, payload in frames))
        deadline = time.monotonic() + READY_TIMEOUT
        while data:
            try:
                sent = self.sock.send(data[:1 << 20])
            except (BlockingIOError, InterruptedError):
                if time.monotonic() > deadline:
                    raise RunnerGone("the runner stopped reading its input") from None
                with selectors.DefaultSelector() as writable:
                    writable.register(self.sock, selectors.EVENT_WRITE)
                    writable.select(TICK)
                continue
            except OSError as exc:
                raise RunnerGone(f"the attach socket broke: {exc}") from None
            data = data[sent:]

    def receive(self, timeout: float) -> tuple[bytes, bytes] | None:
        """The runner's next frame, or None when none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not self._selector.select(left):
                continue
            try:
                chunk = self.sock.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise RunnerGone(f"the attach socket broke: {exc}") from None
            if not chunk:
                raise RunnerGone("the runner ended")
            self._stream.feed(chunk)

    def idle_fault(self) -> str | None:
        """(An idle container's link.) Why it cannot take a batch: its runner's socket ended (``runner_ended``), or it
        sent something while no batch ran (``protocol``); None when it is quiet. Reads what is there, without waiting."""
        try:
            while self._selector.select(0):
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return "runner_ended"
                self._stream.feed(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return "runner_ended"
        return "protocol" if self._frames else None

    def _from(self, stream: int, payload: bytes) -> None:
        if stream == 1:
            self._frames += payload
        else:
            self.complaints += payload
            del self.complaints[:-4096]

    def _frame(self) -> tuple[bytes, bytes] | None:
        frames = self._frames
        if len(frames) < 5:
            return None
        size = struct.unpack_from(">I", frames, 1)[0]
        kind = bytes(frames[:1])
        limit = FRAME_LIMITS.get(kind)
        if limit is None:
            raise ProtocolError(f"a frame of unknown type {kind!r}")
        if size > limit:  # (said at once, not after waiting for a payload that never comes)
            raise ProtocolError(f"a {kind.decode()!r} frame of {size} bytes (at most {limit})")
        if len(frames) < 5 + size:
            return None
        payload = bytes(frames[5:5 + size])
        del frames[:5 + size]
        return kind, payload

    def close(self) -> None:
        self._selector.close()
        if self._closer is not self.sock:
            self._closer.close()
        self.sock.close()


def exit_report(payload: bytes, token: bytes) -> tuple[int, int, int]:
    """An 'X' frame: ``<token> <status> [<timed_out> [<oom_kills>]]``, the token of the batch's 'G' first (a persistent
    function may send the token and the status alone)."""
    words = payload.split()
    if not words or words[0] != token:
        raise ProtocolError(f"an 'X' frame that is not this batch's (it does not begin with the token of its 'G'): "
                            f"{payload[:80]!r}")
    try:
        parts = [int(part) for part in words[1:]]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3:
        raise ProtocolError(f"an 'X' frame that is not '<token> <status> [<timed_out> [<oom_kills>]]': {payload[:80]!r}")
    parts += [0] * (3 - len(parts))
    return parts[0], parts[1], parts[2]
