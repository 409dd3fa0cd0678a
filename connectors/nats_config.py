"""The NATS JetStream source's config: the keys of ``source = { kind = "nats", … }`` and the client options they
make (servers, credentials, TLS)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from connectors.settings import ClientConfig, check_files
from dispatcher.api import ConfigPath, Duration

NAME = re.compile(r"^[^.*>\s/\\]+$")
"""A stream or consumer name as the server takes it: no dots, wildcards, spaces or slashes."""


class NatsSourceConfig(ClientConfig):
    kind: Literal["nats"]
    servers: list[str]
    """The servers to connect to (``nats://host:4222``, ``tls://host:4222``); the client tries each, and those the
    cluster announces."""
    stream: str
    """The JetStream stream to read (it must exist: the daemon does not create streams)."""
    consumer: str
    """The durable pull consumer: bound when it exists, created when it does not (with the keys below). Replicas
    of the daemon share it, and the server divides the messages between them."""
    subjects: list[str] = []
    """When the consumer is created: the stream's subjects it takes (filter subjects; empty: all of them)."""
    start: Literal["all", "new"] = "all"
    """When the consumer is created: from the stream's first message (``all``), or only those published after."""
    value_format: Literal["json", "text", "bytes"] = "json"
    """How a message's payload becomes the event's data: JSON, UTF-8 text, or bytes (``data_base64``); a payload
    that does not fit travels as bytes, with ``dataerror`` saying why."""
    ack_wait: Duration = 60.0
    """When the consumer is created: how long the server waits for an acknowledgement before it delivers a message
    again. The daemon keeps the messages it holds from reaching it (it tells the server they are in progress), so
    this bounds only how long the messages of a daemon that died wait before they are delivered to another."""
    max_ack_pending: int = Field(20_000, ge=1)
    """When the consumer is created: messages delivered and not yet acknowledged, all readers together."""
    max_in_flight: int = Field(10_000, ge=1)
    """Messages this reader holds that are not settled; past it, it asks the server for no more."""
    fetch_batch: int = Field(1000, ge=1, le=10_000)
    """Messages asked for in one pull."""
    creds_file: ConfigPath = ""
    """A credentials file (a user JWT and its NKey seed, as ``nsc`` writes it)."""
    nkey_file: ConfigPath = ""
    """A file holding an NKey seed (``SU…``)."""
    token_env: str = ""
    token_file: ConfigPath = ""
    # (username_env/_file, password_env/_file, ca_file, cert_file, key_file: ClientConfig's; any TLS file, or a
    # tls:// server, turns TLS on)

    @model_validator(mode="after")
    def _check(self) -> NatsSourceConfig:
        if not self.servers:
            raise ValueError("servers: name at least one server (nats://host:4222)")
        for server in self.servers:
            if not re.match(r"^(nats|tls)://[^/\s]+$", server):
                raise ValueError(f"servers: {server!r} is not a server address (nats://host:4222 or tls://host:4222)")
        for key in ("stream", "consumer"):
            if not NAME.match(getattr(self, key)):
                raise ValueError(f"{key}: {getattr(self, key)!r} is not a JetStream name (no dots, wildcards, spaces "
                                 "or slashes)")
        ways = [self._key(key) for key in ("creds_file", "nkey_file", "token") if self._given(key)]
        if self._given("username") or self._given("password"):
            ways.append(self._key("username") if self._given("username") else self._key("password"))
            for key in ("username", "password"):
                if not self.secret(key).given:
                    raise ValueError(f"{key}_env or {key}_file is required with the other of username and password")
        if len(ways) > 1:
            raise ValueError(f"{ways[1]}: give one way to sign in, not {' and '.join(ways)}")
        for key in ("username", "password", "token"):
            if self.secret(key).given:
                problem = self.secret(key).problem(key)
                if problem:
                    raise ValueError(problem)
        check_files(self, ("creds_file", "nkey_file", "ca_file", "cert_file", "key_file"))
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: give both cert_file and key_file, or neither")
        return self

    def _key(self, key: str) -> str:
        """The config key that gives ``key`` (``token`` → ``token_env`` or ``token_file``)."""
        return key if key.endswith("_file") else f"{key}_env" if self.secret(key).env else f"{key}_file"

    def _given(self, key: str) -> bool:
        return bool(getattr(self, key)) if key.endswith("_file") and key in ("creds_file", "nkey_file") \
            else self.secret(key).given

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file) or any(s.startswith("tls://") for s in self.servers)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.aio.client.Client.connect`` (reconnection is the caller's)."""
        options: dict[str, Any] = {"servers": self.servers}
        if self.tls:
            options["tls"] = self.tls_context()
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if self.nkey_file:
            options["nkeys_seed"] = self.nkey_file
        if self.secret("username").given:
            options["user"] = self.secret("username").values()[0]
            options["password"] = self.secret("password").values()[0]
        if self.secret("token").given:
            options["token"] = self.secret("token").values()[0]
        return options
