"""NATS JetStream source: a durable pull consumer whose messages are acknowledged one by one, each only once its
batch succeeded, or its events were dead-lettered or dropped.

Each message becomes a CloudEvent (``subject`` = the message's subject; the stream and its sequence, the headers
as extensions; the id ``<stream>/<stream sequence>``, the same on every delivery). The trigger's own retries
handle a failed batch (backoff, bisect, dead letters): the server is not asked to deliver again for that. What
the server's redelivery is left for: the messages of a reader that is gone (a daemon killed, a replica lost),
delivered again after the consumer's ``ack_wait``; while this reader holds a message it tells the server it is in
progress, so a long batch is not delivered twice. Messages held when the source stops are handed back with a
``nak`` (delivered again at once, to this replica or another), not left to wait for ``ack_wait``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from connectors.nats_config import NatsSourceConfig
from connectors.values import data_of
from dispatcher.api import Event, Outcome, Run, Source, SourceContext, SourceError, pairs_json, rfc3339, traceparent

log = logging.getLogger("eventswarm.nats")

FETCH_WAIT = 1.0
"""How long one pull waits for messages when there are none."""
CONNECT_WAIT = 10
"""How long connecting (each server) and each request to JetStream may take."""
STOP_WAIT = 10.0
"""How long handing back what is held, and closing, may take when the source stops."""
LAG_EVERY = 5.0


class _RawHeaders(dict[str, str]):
    """The client's headers, which keep one value per name, with the header block as it came (``raw``)."""

    raw: bytes = b""


class _Client(Client):
    """nats-py's client, keeping each message's header block as it came: the client's own parse keeps one value of
    a repeated header, and replaces bytes that are not UTF-8, and an event keeps every header losslessly."""

    async def _process_headers(self, headers: Any) -> Any:
        parsed = await super()._process_headers(headers)
        if parsed is None or not headers:
            return parsed
        kept = _RawHeaders(parsed)
        kept.raw = bytes(headers)
        return kept


class Payload(NamedTuple):
    msg: Msg
    event: Event


def header_pairs(headers: Any) -> Iterator[tuple[str, bytes]]:
    """A message's headers as name-value pairs, in order, repeated names and all (from the raw block when the
    client kept it; else what the client parsed)."""
    raw = getattr(headers, "raw", b"")
    if not raw:
        for name, value in (headers or {}).items():
            yield name, value.encode("utf-8", "surrogateescape")
        return
    for line in raw.split(b"\r\n")[1:]:  # (the first line is NATS/1.0, and a status)
        name, sep, value = line.partition(b":")
        if sep and name:
            yield name.decode("utf-8", "replace"), value.lstrip(b" \t")


def to_event(msg: Msg, value_format: str, received: float) -> Event:
    meta = msg.metadata
    sequence = meta.sequence.stream
    extensions: dict[str, Any] = {"stream": meta.stream, "sequence": sequence}
    if msg.headers:
        pairs = list(header_pairs(msg.headers))
        extensions["natsheaders"] = pairs_json(pairs)
        trace = next((found for name, value in pairs if name.lower() == "traceparent"
                      and (found := traceparent(value))), None)
        if trace:
            extensions["traceparent"] = trace
    return Event(id=f"{meta.stream}/{sequence}", source=f"nats://{meta.stream}", type="eventswarm.nats.message",
                 subject=msg.subject, time=rfc3339(meta.timestamp.timestamp()) if meta.timestamp else None,
                 partition=f"nats://{meta.stream}", extensions=extensions, received=received,
                 **data_of(msg.data, value_format, extensions))


def _event_of(payload: Payload) -> Event:
    return payload.event


class NatsSource(Source[NatsSourceConfig]):
    config_model = NatsSourceConfig

    def __init__(self, config: NatsSourceConfig) -> None:
        super().__init__(config)
        self.held: dict[int, Msg] = {}
        """Messages handed over and not settled, by stream sequence."""
        self._room = anyio.Event()
        self.ack_wait = config.ack_wait
        """The consumer's ``ack_wait`` (the server's, for a consumer that was there before)."""
        self.redelivered = 0
        """Messages delivered again while this reader still held them (not handed over twice; a count for tests)."""
        self._told: set[str] = set()
        self.client: Client | None = None
        """The connection while the source runs."""
        self._sub: Any = None
        self._connecting = False
        self._last_error: Exception | None = None

    async def run(self, ctx: SourceContext) -> None:
        config = self.config
        client = _Client()
        self._connecting, self._last_error = True, None
        try:
            # Each server twice at most: a first connection that fails is the source's error (the trigger starts it
            # again, waiting longer each time); once connected, the client reconnects for as long as it takes.
            await client.connect(**config.client_options(), connect_timeout=CONNECT_WAIT, allow_reconnect=True,
                                 max_reconnect_attempts=1, reconnect_time_wait=1,
                                 error_cb=self._error, disconnected_cb=self._disconnected,
                                 reconnected_cb=self._reconnected, closed_cb=self._closed)
        except Exception as exc:  # (nats-py raises many kinds: refused, TLS, authorization)
            await _close(client)
            raise SourceError(f"cannot connect to NATS at {', '.join(config.servers)}: "
                              f"{_why(self._last_error or exc)}") from exc
        finally:
            self._connecting = False
        client.options["max_reconnect_attempts"] = -1
        self.client = client
        try:
            js = client.jetstream(timeout=CONNECT_WAIT)
            await self._consumer(js)
            sub = self._sub = await js.pull_subscribe_bind(durable=config.consumer, stream=config.stream,
                                                           pending_msgs_limit=config.fetch_batch * 2)
            ctx.set_ready(True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_in_progress)
                tg.start_soon(self._report_lag, ctx, js)
                await self._consume(ctx, sub)
        except nats.errors.Error as exc:
            raise SourceError(f"NATS: {_why(exc)}") from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_WAIT):
                await self._hand_back()
            with anyio.CancelScope(shield=True):
                await _close(client)
            self.client = None
            ctx.set_ready(False)

    async def _consumer(self, js: Any) -> None:
        """Bind the durable consumer, or create it as the config says."""
        config = self.config
        try:
            info = await js.consumer_info(config.stream, config.consumer)
        except nats.js.errors.NotFoundError as exc:
            if "stream" in (exc.description or "").lower():
                raise SourceError(f"NATS: there is no stream {config.stream!r} on the server (the daemon does not "
                                  "create streams)") from exc
            consumer = ConsumerConfig(
                durable_name=config.consumer, ack_policy=AckPolicy.EXPLICIT, ack_wait=config.ack_wait,
                max_deliver=-1, max_ack_pending=config.max_ack_pending,
                deliver_policy=DeliverPolicy.ALL if config.start == "all" else DeliverPolicy.NEW,
                **({"filter_subject": config.subjects[0]} if len(config.subjects) == 1 else
                   {"filter_subjects": config.subjects} if config.subjects else {}))
            try:
                info = await js.add_consumer(config.stream, consumer)
            except nats.js.errors.BadRequestError as exc2:  # (another replica created it meanwhile: bind it)
                if "already" not in (exc2.description or ""):
                    raise SourceError(f"NATS: cannot create consumer {config.consumer!r} on stream "
                                      f"{config.stream!r}: {exc2.description}") from exc2
                info = await js.consumer_info(config.stream, config.consumer)
            else:
                log.info("created the durable consumer %s on stream %s", config.consumer, config.stream)
        if info.config.deliver_subject:
            raise SourceError(f"NATS: consumer {config.consumer!r} of stream {config.stream!r} is a push consumer: "
                              "this source reads through a pull consumer (name another, and it is created)")
        if info.config.ack_policy != AckPolicy.EXPLICIT:
            raise SourceError(f"NATS: consumer {config.consumer!r} acknowledges with policy "
                              f"{info.config.ack_policy}: this source needs explicit acknowledgements")
        self.ack_wait = float(info.config.ack_wait or config.ack_wait)
        if info.config.max_deliver not in (None, -1, 0) and "max_deliver" not in self._told:
            self._told.add("max_deliver")
            log.warning("consumer %s of stream %s has max_deliver %d: a message whose reader died that many times "
                        "is dropped by the server, unrun", config.consumer, config.stream, info.config.max_deliver)

    async def _consume(self, ctx: SourceContext, sub: Any) -> None:
        config = self.config
        while True:
            room = config.max_in_flight - len(self.held)
            if room <= 0:
                self._room = anyio.Event()
                ctx.set_paused(True)
                await self._room.wait()
                ctx.set_paused(False)
                continue
            try:
                msgs = await sub.fetch(min(config.fetch_batch, room), timeout=FETCH_WAIT)
            except nats.errors.TimeoutError:
                continue  # (none now; or the connection is away: the client reconnects meanwhile)
            except nats.errors.ConnectionClosedError as exc:
                raise SourceError("NATS: the connection was closed") from exc
            run = self._run(msgs)
            if run is not None and not await ctx.offer_run(run):
                ctx.set_paused(True)
                await ctx.emit_run(run)
                ctx.set_paused(False)

    def _run(self, msgs: list[Msg]) -> Run | None:
        received = time.time()
        value_format = self.config.value_format
        payloads: list[Payload] = []
        for msg in msgs:
            try:
                sequence = msg.metadata.sequence.stream
            except Exception:  # (not a JetStream message: a status the client let through)
                continue
            if sequence in self.held:  # delivered again while held: its batch is under way, acknowledged from here
                self.held[sequence] = msg
                self.redelivered += 1
                continue
            self.held[sequence] = msg
            payloads.append(Payload(msg, to_event(msg, value_format, received)))
        if not payloads:
            return None
        events = [p.event for p in payloads]
        return Run([e.encode() for e in events], [e.id for e in events], payloads, _event_of, ack=self._settle,
                   partition=events[0].partition, subjects=[e.subject for e in events], received=received)

    async def _settle(self, part: Run, outcome: Outcome) -> None:
        """Acknowledge each message of ``part``: succeeded, dead-lettered or dropped, it is done with."""
        for payload in part.payloads:
            sequence = payload.msg.metadata.sequence.stream
            msg = self.held.pop(sequence, payload.msg)
            try:
                await msg.ack()
            except nats.errors.Error as exc:  # the connection is away: the server delivers it again (at least once)
                self._once("ack", f"cannot acknowledge to NATS ({_why(exc)}): those messages are delivered again "
                                  f"after ack_wait ({self.ack_wait:g}s)")
        if not self._room.is_set():
            self._room.set()

    async def _keep_in_progress(self) -> None:
        """Tell the server the messages held are in progress, a few times per ``ack_wait``, so that none is
        delivered again while its batch waits or runs."""
        every = max(0.5, self.ack_wait / 3)
        while True:
            await anyio.sleep(every)
            for msg in list(self.held.values()):
                try:
                    await msg.in_progress()
                except nats.errors.Error:
                    break  # (the connection is away: try again at the next round)

    async def _report_lag(self, ctx: SourceContext, js: Any) -> None:
        """The consumer's pending count (messages in the stream not yet delivered to it), as the source's lag."""
        config = self.config
        while True:
            try:
                info = await js.consumer_info(config.stream, config.consumer)
                ctx.set_lag(float(info.num_pending or 0), "messages")
            except (nats.errors.Error, TimeoutError):
                pass
            await anyio.sleep(LAG_EVERY)

    async def _hand_back(self) -> None:
        """The messages held and not settled (the source stops): delivered again at once, not after ack_wait.
        The pull subscription goes first: a pull still waiting at the server would take them, for a reader that
        is no longer there, and they would wait for ack_wait after all."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
                if self.client is not None:
                    await self.client.flush(timeout=int(STOP_WAIT))
            except (nats.errors.Error, TimeoutError):
                pass
        held, self.held = self.held, {}
        for msg in held.values():
            try:
                await msg.nak()
            except nats.errors.Error:
                return

    def _once(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            log.warning("%s", message)

    async def _error(self, exc: Exception) -> None:
        # (What the server said, a refused sign-in, outweighs the reset of the connection it then closes.)
        if self._last_error is None or isinstance(self._last_error, OSError) or not isinstance(exc, OSError):
            self._last_error = exc
        if not self._connecting:  # (a first connection's failure is the source's error, said once by the trigger)
            self._once(f"error {type(exc).__name__}", f"NATS: {_why(exc)}")

    async def _disconnected(self) -> None:
        if self.client is not None and not self.client.is_closed:
            log.warning("NATS: disconnected from %s; reconnecting", ", ".join(self.config.servers))
        self._told.discard("ack")

    async def _reconnected(self) -> None:
        log.info("NATS: reconnected")

    async def _closed(self) -> None:
        pass


async def _close(client: Client) -> None:
    """Send what is pending (acknowledgements, naks), then close."""
    with anyio.move_on_after(STOP_WAIT):
        try:
            if client.is_connected:
                await client.flush(timeout=int(STOP_WAIT))
        except Exception:  # (a connection that is away: what was not sent is delivered again)
            pass
        try:
            await client.close()
        except Exception:  # (closing a client that never connected, or one already closed)
            pass


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "authorization violation" in text.lower():
        return f"{text} (the server refused the credentials: check username/password, token, nkey_file or creds_file)"
    return " ".join(text.split())[:300]
