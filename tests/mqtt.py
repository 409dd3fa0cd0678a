"""MQTT helpers for the tests: a mosquitto of the test's own (Debian's 2.0, installed by scripts/tools.sh) on a
port of its own, with persistence in the test's folder, sign-in and TLS when asked; and publishing through paho's
own synchronous client (QoS 1, each PUBACK awaited)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.support import OwnServer, free_port, wait_until

BINARY = Path("/usr/sbin/mosquitto")


class Mosquitto(OwnServer):
    """One mosquitto: ``start`` (again on the same port and persistence file after ``kill``), ``kill`` (-9)."""

    def __init__(self, folder: Path, *, users: dict[str, str] | None = None, tls: Path | None = None,
                 verify_clients: bool = False) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.users = users
        lines = [f"listener {self.port} 127.0.0.1", "persistence true", f"persistence_location {folder}/",
                 "autosave_interval 1", f"log_dest file {folder / 'mosquitto.log'}", "log_type error",
                 "log_type warning", "log_type notice", "log_type information", "max_queued_messages 100000",
                 ]
        if os.geteuid() == 0:
            lines.append("user root")  # (as root it would become the user mosquitto, who cannot read the test's files)
        if users:
            passwords = folder / "passwords"
            passwords.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True,
                               capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if tls is not None:
            lines += [f"cafile {tls / 'ca.pem'}", f"certfile {tls / 'server.pem'}", f"keyfile {tls / 'server.key'}",
                      f"require_certificate {'true' if verify_clients else 'false'}"]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        assert BINARY.exists(), f"no mosquitto at {BINARY}: scripts/tools.sh installs Debian's"
        with (self.folder / "mosquitto.out").open("ab") as out:
            self.proc = subprocess.Popen([str(BINARY), "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                said = "".join(path.read_text()[-2000:] for name in ("mosquitto.out", "mosquitto.log")
                               if (path := self.folder / name).exists())
                raise AssertionError(f"mosquitto exited with {proc.returncode}:\n{said}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
            return False

        wait_until(listening, timeout=30, what="mosquitto")
        return self

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file (sessions, queued messages) and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def client(self, user: str = "", password: str = "") -> Any:
        """paho's client, connected (MQTT 5), its network loop running in a thread."""
        import ssl

        import paho.mqtt.client as paho

        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        if user:
            client.username_pw_set(user, password)
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls / "ca.pem"))
            context.load_cert_chain(str(self.tls / "client.pem"), str(self.tls / "client.key"))
            client.tls_set_context(context)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        return client


def publish(broker: Mosquitto, messages: Iterable[tuple[str, bytes]], *, qos: int = 1, retain: bool = False,
            user: str = "", password: str = "", properties: Any = None) -> int:
    """Publish (topic, payload) pairs; returns how many, once the broker acknowledged each (QoS 1)."""
    client = broker.client(user, password)
    try:
        infos = [client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
                 for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=60)
            assert info.is_published()
        return len(infos)
    finally:
        client.loop_stop()
        client.disconnect()
