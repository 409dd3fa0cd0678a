"""What the broker sources' configs share (Kafka, NATS): a user name and password from the environment or a
file, TLS files and their context, and the check of the files they name."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from dispatcher.api import ConfigPath, Secret, SourceConfig


class ClientConfig(SourceConfig):
    """The keys a broker client signs in and speaks TLS with."""

    username_env: str = ""
    username_file: ConfigPath = ""
    password_env: str = ""
    password_file: ConfigPath = ""
    ca_file: ConfigPath = ""
    """TLS: the CA to trust (else the system's)."""
    cert_file: ConfigPath = ""
    """TLS: this client's certificate, for a server that verifies clients (with ``key_file``)."""
    key_file: ConfigPath = ""

    def secret(self, key: str) -> Secret:
        return Secret.of(getattr(self, f"{key}_env"), getattr(self, f"{key}_file"))

    def tls_context(self) -> ssl.SSLContext:
        return tls_context(self.ca_file, self.cert_file, self.key_file)


def tls_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """A client's TLS context: the CA to trust (else the system's), and a client certificate when given."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


def check_files(config: Any, keys: tuple[str, ...]) -> None:
    """Refuse a config whose file ``keys`` name a file that is not there, with the key."""
    for key in keys:
        value = getattr(config, key)
        if value and not Path(value).is_file():
            raise ValueError(f"{key}: {value} is not a readable file")
