"""The Kafka source's config: the keys of ``source = { kind = "kafka", … }``, the client options they make, and
why a TLS connection to the broker fails, said in one line."""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Any, Literal

import anyio
from pydantic import Field, model_validator

from connectors.settings import ClientConfig, check_files
from dispatcher.api import (
    Duration,
)


class KafkaSourceConfig(ClientConfig):
    kind: Literal["kafka"]
    bootstrap_servers: list[str]
    topics: list[str] = []
    topic_pattern: str = ""
    """A regular expression of topic names, instead of ``topics``."""
    group_id: str
    start: Literal["earliest", "latest"] = "earliest"
    """Where a group without committed offsets begins."""
    value_format: Literal["json", "text", "bytes"] = "json"
    """A value that is not valid in this format is delivered as ``data_base64`` with ``dataerror`` saying why."""
    security: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    dead_letter_topic: str = ""
    """Dead letters are also produced here (the original key, value and headers)."""
    dead_letter_timeout: Duration = 60.0
    """How long producing a batch's dead letters may take, retries included. Past it the source fails and
    restarts: the records were not committed, so they come again (and are dead-lettered again)."""
    commit_interval: Duration = 1.0
    max_uncommitted: int = Field(100_000, ge=1)
    """Records of one partition in flight behind its first unsettled record before the partition pauses:
    one stuck record then stops that partition's reading instead of filling memory."""
    fetch_max_bytes: int = 8 * 1024 * 1024
    """Bytes one fetch may bring (bounds what the client holds beyond the trigger's buffer)."""
    isolation: Literal["read_committed", "read_uncommitted"] = "read_committed"
    """``read_committed``: records of transactions still open wait, and those of aborted transactions are skipped
    (what users of exactly-once producers expect; it needs a broker that keeps transaction markers)."""

    @model_validator(mode="after")
    def _check(self) -> KafkaSourceConfig:
        if bool(self.topics) == bool(self.topic_pattern):
            raise ValueError(f"{'topic_pattern' if self.topics else 'topics'}: give exactly one of topics or topic_pattern")
        if self.topic_pattern:
            try:
                re.compile(self.topic_pattern)
            except re.error as exc:
                raise ValueError(f"topic_pattern: not a regular expression: {exc}") from None
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers: name at least one broker (host:port)")
        if self.security.startswith("SASL"):
            for key in ("username", "password"):
                secret = self.secret(key)
                if not secret.given:
                    raise ValueError(f"{key}_env or {key}_file is required with security = {self.security!r}")
                problem = secret.problem(key)
                if problem:
                    raise ValueError(problem)
        check_files(self, ("ca_file", "cert_file", "key_file"))
        return self

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers, "security_protocol": self.security}
        if self.security in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self.tls_context()
        if self.security.startswith("SASL"):
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.secret("username").value(),
                           sasl_plain_password=self.secret("password").value())
        return options


async def tls_problem(config: KafkaSourceConfig) -> str | None:
    """Why a TLS connection to the first broker fails, in one line (aiokafka says only that it could not bootstrap);
    None when the handshake works, or the broker is not there at all."""
    host, _, port = config.bootstrap_servers[0].rpartition(":")
    context = config.client_options()["ssl_context"]
    try:
        with anyio.fail_after(10):
            reader, writer = await asyncio.open_connection(host, int(port), ssl=context, server_hostname=host)
            try:
                with anyio.move_on_after(1):  # (TLS 1.3: a server that wants a client certificate says so now)
                    if not await reader.read(1):
                        return (f"the TLS connection to {host}:{port} was closed at once by the other end (does it "
                                "require a client certificate: cert_file and key_file?)")
            finally:
                writer.close()
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the certificate of {host}:{port} is not trusted ({exc.verify_message}; ca_file: {config.ca_file or 'the system CAs'})"
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if "CERTIFICATE_REQUIRED" in reason or ("HANDSHAKE_FAILURE" in reason and not config.cert_file):
            return f"TLS: {host}:{port} requires a client certificate ({reason}): set cert_file and key_file"
        return f"TLS with {host}:{port} failed: {reason}"
    except (OSError, TimeoutError, ValueError):
        return None
    return None
