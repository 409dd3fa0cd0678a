"""A persistent warm function (``warm = "persistent"``, docs/warm.md): it reads the daemon's frames on stdin itself,
answers on stdout, and keeps what it holds in memory from one batch to the next (here: the events seen so far).

Frames: one type byte, a 4-byte big-endian length, the payload. Say 'R' once ready; then, per batch, the
daemon sends 'A' (argv), 'E' (NAME=value), 'I' (the input document), 'T' ("<timeout_ms> <grace_ms>") and 'G'
(go, with the batch's token): answer with 'B' (begin) and the token, any 'O' (stdout) and 'E' (stderr) frames, then
'X' with the token and the exit status ("<token> 0" = success). A frame that is not the batch's (no 'B' first, an
'X' without the token, anything between batches) fails the batch and replaces the container. Nothing this program
starts may write to its stdout: give a child other descriptors.
"""

import json
import struct
import sys

seen = 0


def send(kind: bytes, payload: bytes) -> None:
    sys.stdout.buffer.write(kind + struct.pack(">I", len(payload)) + payload)
    sys.stdout.buffer.flush()


def frames():
    while len(header := sys.stdin.buffer.read(5)) == 5:
        yield header[:1], sys.stdin.buffer.read(struct.unpack(">I", header[1:])[0])


send(b"R", b"persistent example 1")
batch = {"events": []}
for kind, payload in frames():
    if kind == b"I":
        batch = json.loads(payload)
    elif kind == b"G":
        token = payload
        send(b"B", token)
        try:
            seen += len(batch["events"])
            send(b"O", f"{len(batch['events'])} events, {seen} since this container started\n".encode())
            send(b"X", token + b" 0")
        except Exception as exc:  # a batch that fails says so; the loop goes on
            send(b"E", f"{exc!r}\n".encode())
            send(b"X", token + b" 1")
