"""The MQTT source's config: the keys of ``source = { kind = "mqtt", … }``."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from connectors.settings import ClientConfig, check_files
from dispatcher.api import Duration

SHARED = re.compile(r"^\$share/[^/#+]+/.+$")
"""A shared subscription (MQTT 5): ``$share/<group>/<filter>``."""


class MqttSourceConfig(ClientConfig):
    kind: Literal["mqtt"]
    host: str
    port: int = Field(1883, ge=1, le=65535)
    topics: list[str]
    """Topic filters (``sensors/+/temp``, ``plant/#``), or shared subscriptions (``$share/group/sensors/#``): all
    shared, and replicas of the daemon divide the messages; none shared, and one replica reads (the holder of the
    source's lease)."""
    qos: Literal[0, 1] = 1
    """1: at least once (each message acknowledged after its batch settled); 0: at most once."""
    client_id: str = Field("", max_length=200)
    """The MQTT client id, whose session the broker keeps (default: ``eventswarm-<trigger>``, and with shared
    subscriptions ``eventswarm-<trigger>-<replica>``, so that each replica has a session of its own)."""
    clean_start: bool = False
    """False: the broker keeps the session (subscriptions, and the QoS 1 messages not acknowledged) across
    disconnects and restarts, for ``session_expiry``."""
    session_expiry: Duration = 86_400.0
    """How long the broker keeps the session after the client is gone."""
    max_in_flight: int = Field(1000, ge=1, le=65_535)
    """QoS 1 messages delivered and not acknowledged (MQTT 5's Receive Maximum): the broker sends no more past it."""
    value_format: Literal["json", "text", "bytes"] = "json"
    """As Kafka's: a payload that does not fit travels as ``data_base64`` with ``dataerror``."""
    keepalive: int = Field(30, ge=5, le=3600)
    """Seconds between pings when nothing else is sent; a broker that does not answer within 1.5 of them is gone."""
    tls: bool = False
    """TLS without a client certificate or a CA of its own (the system's CAs); any of ``ca_file``, ``cert_file``
    turns it on too."""

    @model_validator(mode="after")
    def _check(self) -> MqttSourceConfig:
        if not self.topics:
            raise ValueError("topics: name at least one topic filter")
        shared = [bool(SHARED.match(topic)) for topic in self.topics]
        if any(shared) and not all(shared):
            raise ValueError("topics: either every topic is a shared subscription ($share/group/…) or none is")
        for topic in self.topics:
            filter_ = topic.split("/", 2)[2] if topic.startswith("$share/") else topic
            if topic.startswith("$share/") and not SHARED.match(topic):
                raise ValueError(f"topics: {topic!r} is not a shared subscription ($share/<group>/<filter>)")
            levels = filter_.split("/")
            if not filter_ or any(("+" in level and level != "+") or ("#" in level and level != "#")
                                  for level in levels) or "#" in levels[:-1]:
                raise ValueError(f"topics: {topic!r} is not a topic filter (+ and # stand for whole levels, # last)")
        for key in ("username", "password"):
            if self.secret(key).given:
                problem = self.secret(key).problem(key)
                if problem:
                    raise ValueError(problem)
        if self.secret("password").given and not self.secret("username").given:
            raise ValueError("password_env: a password needs a username (username_env or username_file)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: give both cert_file and key_file, or neither")
        check_files(self, ("ca_file", "cert_file", "key_file"))
        return self

    @property
    def shared(self) -> bool:
        return SHARED.match(self.topics[0]) is not None

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.ca_file or self.cert_file)
