"""MQTT source (MQTT 5, through aiomqtt and paho): QoS 1 messages acknowledged (PUBACK) only once their batch
settled, in the order they came, over a session the broker keeps across restarts.

paho acknowledges each message as it hands it over unless asked not to: the source turns that off (paho's
``manual_ack``) and sends each PUBACK itself, in the order the messages arrived (as MQTT asks), as soon as every
message before it is settled. The client asks the broker for at most ``max_in_flight`` messages not
acknowledged (MQTT 5's Receive Maximum); mosquitto 2.0.11 was measured not to keep to it, so the client stops
reading its socket while it holds that many, and the broker waits on TCP. The messages not acknowledged
when the connection ends (a daemon killed, a broker restarted) stay in the session, and the broker sends them
again when the client comes back under the same client id.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import aiomqtt
import anyio
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from connectors.mqtt_config import MqttSourceConfig
from connectors.values import data_of
from dispatcher.api import (
    Event,
    Outcome,
    Run,
    Source,
    SourceContext,
    SourceError,
    new_id,
    pairs_json,
    rfc3339,
    traceparent,
)

log = logging.getLogger("eventswarm.mqtt")

CONNECT_WAIT = 10.0
SUBSCRIBE_WAIT = 60.0
"""How long a subscription may wait for its answer (behind the messages a kept session sends first)."""


class Payload(NamedTuple):
    session: int
    """The connection it came on (a number per connection): an acknowledgement goes only to that one."""
    sequence: int
    event: Event


def to_event(message: aiomqtt.Message, config: MqttSourceConfig, received: float) -> Event:
    extensions: dict[str, Any] = {"mqttqos": int(message.qos), "mqttretain": bool(message.retain)}
    properties = getattr(message.properties, "UserProperty", None)
    if properties:
        extensions["mqttproperties"] = pairs_json(properties)
        trace = next((found for name, value in properties if name.lower() == "traceparent"
                      and (found := traceparent(value))), None)
        if trace:
            extensions["traceparent"] = trace
    payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
    return Event(id=new_id(), source=f"mqtt://{config.host}:{config.port}", type="eventswarm.mqtt.message",
                 subject=message.topic.value, time=rfc3339(received), extensions=extensions, received=received,
                 **data_of(payload, config.value_format, extensions))


def _event_of(payload: Payload) -> Event:
    return payload.event


class _Client(aiomqtt.Client):
    """aiomqtt's client, which stops reading its socket while the source holds ``window`` QoS 1 messages or more
    (queued in the client, or handed over and not acknowledged), so that the broker waits on TCP, and reads again
    below half of it. The broker should keep to the Receive Maximum, but mosquitto 2.0.11 does not; and aiomqtt
    has no switch for this, so the reader it registered on the event loop is taken off and put back."""

    window = 0
    held: Any = None
    """A callable: the messages the source holds and has not acknowledged."""
    _paused: tuple[int, Any] | None = None
    pauses = 0
    """Times reading stopped (a count for tests)."""

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        super()._on_message(client, userdata, message)
        if self.window and self._queue.qsize() + self.held() >= self.window:
            self.pause_reading()

    def pause_reading(self) -> None:
        sock = self._client.socket()
        if self._paused is not None or sock is None:
            return
        fd = sock.fileno()
        try:
            reader = self._loop._selector.get_key(fd).data[0]  # type: ignore[attr-defined]  # (asyncio's own handles)
        except (KeyError, AttributeError, ValueError):
            return  # (not registered, or an event loop that keeps its readers otherwise: reading goes on)
        if reader is None:
            return
        self._paused = (fd, reader._callback)
        self._loop.remove_reader(fd)
        self.pauses += 1

    def resume_reading(self) -> None:
        if self._paused is not None:
            fd, callback = self._paused
            self._paused = None
            self._loop.add_reader(fd, callback)


class MqttSource(Source[MqttSourceConfig]):
    config_model = MqttSourceConfig

    def __init__(self, config: MqttSourceConfig) -> None:
        super().__init__(config)
        self.single_reader = not config.shared  # (shared subscriptions: the broker divides the messages)
        self.pending: OrderedDict[int, list[Any]] = OrderedDict()
        """QoS 1 messages of this connection not acknowledged yet, in the order they came: [mid, settled]."""
        self.session = 0
        self._sequence = 0
        self._client: _Client | None = None
        self.most_held = 0
        """The most QoS 1 messages held unacknowledged at once (a count for tests)."""
        self.acknowledged = 0
        """PUBACKs sent (a count for tests)."""

    def client_id(self, ctx: SourceContext) -> str:
        config = self.config
        if config.client_id:
            return config.client_id
        name = f"eventswarm-{ctx.trigger}" + (f"-{ctx.replica}" if config.shared else "")
        return re.sub(r"[^A-Za-z0-9._:-]", "-", name)[:200]

    async def run(self, ctx: SourceContext) -> None:
        config = self.config
        self.session += 1
        self.pending.clear()
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0 if config.clean_start else int(config.session_expiry)
        properties.ReceiveMaximum = config.max_in_flight
        tls = None
        if config.uses_tls:
            tls = config.tls_context() if (config.ca_file or config.cert_file) else ssl.create_default_context()
        client = _Client(
            config.host, config.port, identifier=self.client_id(ctx), protocol=aiomqtt.ProtocolVersion.V5,
            username=config.secret("username").values()[0] if config.secret("username").given else None,
            password=config.secret("password").values()[0] if config.secret("password").given else None,
            clean_start=config.clean_start, properties=properties, tls_context=tls, keepalive=config.keepalive,
            timeout=CONNECT_WAIT, max_queued_incoming_messages=0)
        client._client.manual_ack_set(True)  # (aiomqtt has no switch of its own: its paho client's)
        if config.qos > 0:
            client.window, client.held = config.max_in_flight, lambda: len(self.pending)
        where = f"{config.host}:{config.port}"
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise SourceError(f"cannot connect to MQTT at {where}: {_why(exc)}") from exc
        self._client = client
        try:
            async with anyio.create_task_group() as tg:
                # Messages are taken from the start: a session kept by the broker sends what it holds before it
                # answers the subscriptions, and a client that stopped reading would never see the answer.
                tg.start_soon(self._consume, ctx, client, where)
                for topic in config.topics:
                    try:
                        await client.subscribe(topic, options=SubscribeOptions(qos=config.qos, retainHandling=1),
                                               timeout=SUBSCRIBE_WAIT)
                    except aiomqtt.MqttError as exc:
                        raise SourceError(f"MQTT at {where}: cannot subscribe to {topic}: {_why(exc)}") from exc
                log.info("MQTT: subscribed to %s at %s as %s (QoS %d)", ", ".join(config.topics), where,
                         self.client_id(ctx), config.qos)
                ctx.set_ready(True)
        finally:
            self._client = None
            self.pending.clear()  # (not acknowledged: the session keeps them, the broker sends them again)
            ctx.set_ready(False)
            try:
                await client.__aexit__(None, None, None)
            except Exception:  # (a connection already gone)
                pass

    async def _consume(self, ctx: SourceContext, client: _Client, where: str) -> None:
        try:
            async for message in client.messages:
                run = self._run(message)
                if not await ctx.offer_run(run):
                    ctx.set_paused(True)
                    await ctx.emit_run(run)
                    ctx.set_paused(False)
        except aiomqtt.MqttError as exc:
            raise SourceError(f"MQTT at {where}: {_why(exc)}") from exc

    def _run(self, message: aiomqtt.Message) -> Run:
        received = time.time()
        self._sequence += 1
        if message.qos > 0:
            self.pending[self._sequence] = [message.mid, False]
            self.most_held = max(self.most_held, len(self.pending))
        event = to_event(message, self.config, received)
        return Run([event.encode()], [event.id], [Payload(self.session, self._sequence, event)], _event_of,
                   ack=self._settle, subjects=[event.subject], partition=f"mqtt://{self.config.host}",
                   received=received)

    async def _settle(self, part: Run, outcome: Outcome) -> None:
        """Mark the part's messages settled; acknowledge, in the order they came, those with none unsettled
        before them (MQTT wants PUBACKs in order)."""
        pending = self.pending
        for payload in part.payloads:
            if payload.session == self.session and payload.sequence in pending:
                pending[payload.sequence][1] = True
        client = self._client
        while pending:
            sequence, (mid, settled) = next(iter(pending.items()))
            if not settled:
                break
            del pending[sequence]
            if client is not None:
                client._client.ack(mid, 1)
                self.acknowledged += 1
        if client is not None and client._paused is not None and \
                client._queue.qsize() + len(pending) < client.window // 2 + 1:
            client.resume_reading()


def _why(exc: BaseException) -> str:
    text = " ".join((str(exc) or type(exc).__name__).split())[:300]
    if "user name or password" in text.lower() or "not authorized" in text.lower():
        return f"{text} (the broker refused the credentials: check username and password)"
    return text
