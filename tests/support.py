"""Helpers for the tests: polling with deadlines, config documents, daemons in-process and as processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from dispatcher.config import parse
from dispatcher.daemon import Daemon
from dispatcher.store import Database

ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = "eventswarm/busybox:test"


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:  # noqa: ASYNC109
    """``wait_until`` for async tests: polls without blocking the event loop."""
    deadline = anyio.current_time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await anyio.sleep(interval)


async def wait_for_async(predicate: Callable[[], Awaitable[Any]], timeout: float = 30.0, interval: float = 0.05,  # noqa: ASYNC109
                         what: str = "") -> Any:
    """``wait_for`` with an async ``predicate`` (a query of the store, say)."""
    deadline = anyio.current_time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await anyio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_config(tmp_path: Path, *, executor: str = "docker", port: int = 0, **daemon: Any) -> dict[str, Any]:
    return {
        "daemon": {"state": f"sqlite:///{tmp_path / 'state.db'}", "listen": f"127.0.0.1:{port}",
                   "shutdown_grace": "10s", **daemon},
        "executor": {"kind": executor, "max_in_flight": 8},
        "functions": {},
        "triggers": {},
    }


def toml(doc: dict[str, Any]) -> str:
    """A small TOML writer for test configs (tables of scalars, lists and inline tables)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)

    lines: list[str] = []
    for section in ("daemon", "executor", "telemetry"):
        if section in doc:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in doc[section].items()]
    for section in ("functions", "triggers"):
        for name, body in doc.get(section, {}).items():
            lines.append(f"[{section}.{json.dumps(name)}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def running_daemon(doc: dict[str, Any], *, ready: bool = True) -> AsyncIterator[Daemon]:
    """A daemon in this process, on its own task group; stopped cleanly on exit. With ``ready``, once every
    source is ready (else as soon as it started: for sources that are meant to fail)."""
    daemon = Daemon(parse(doc))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        with anyio.fail_after(30):
            await daemon.started.wait()
        if ready:
            await wait_for(lambda: all(t.ready for t in daemon.triggers.values()), timeout=30,
                           what="every source ready")
        try:
            yield daemon
        finally:
            daemon.stop()


def store_of(doc: dict[str, Any]) -> Database:
    return Database(doc["daemon"]["state"].removeprefix("sqlite:///"))


@contextlib.contextmanager
def opened_store(doc: dict[str, Any]) -> Iterator[Database]:
    """The state store of ``doc``, closed after the block (a PostgreSQL one holds a connection)."""
    store = store_of(doc)
    try:
        yield store
    finally:
        store.close()


class DaemonProcess:
    """``eventswarm run`` as a child process: the tests stop (or kill -9) exactly this process."""

    def __init__(self, config_file: Path, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.config_file = config_file
        self.port = port
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with self.log.open("ab") as out:
            env = {**os.environ, **self.env} if self.env else None
            self.proc = subprocess.Popen([sys.executable, "-m", "dispatcher", "run", "-c", str(self.config_file)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_until(self._ready, timeout=30, what="the daemon's /readyz")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


SERVICES_HOME = Path(os.environ.get("EVENTSWARM_SERVICES_HOME", "/var/cache/eventswarm"))
"""Where scripts/*.sh install the services' binaries."""


@contextlib.contextmanager
def own_service(argv: list[str], port: int, log: Path, what: str) -> Iterator[subprocess.Popen[bytes]]:
    """A service process of the test's own (a broker, a node) listening on ``port`` of 127.0.0.1; the test may
    stop it (SIGSTOP), and it is killed, by its id, on the way out."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    try:
        wait_until(listening, timeout=30, what=what)
        yield proc
    finally:
        proc.send_signal(signal.SIGCONT)  # in case the test left it stopped
        proc.kill()
        proc.wait(timeout=30)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=folder)


def make_cert(folder: Path, ca: str, name: str, san: str) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=folder)
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=folder)


def certificates(folder: Path) -> Path:
    """A CA of the test's own, and a server certificate (for 127.0.0.1 and localhost) and a client certificate it
    signed, in ``folder``: ca.pem, server.pem/.key, client.pem/.key."""
    folder.mkdir(parents=True, exist_ok=True)
    make_ca(folder, "ca")
    make_cert(folder, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    make_cert(folder, "ca", "client", "DNS:eventswarm-client")
    return folder


class OwnServer:
    """A server process of the test's own (a broker), started with ``start`` (again after ``kill``), killed by its
    id (-9) with ``kill`` and at the end of a ``with``."""

    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Any:
        raise NotImplementedError

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # (in case the test left it stopped)
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.kill()

