"""Kafka source: a consumer group whose offsets are committed only up to the lowest unfinished record.

Each record becomes a CloudEvent (``subject`` = key; topic, partition, offset, headers as
extensions; the id ``topic/partition/offset``). Offsets are committed per partition up to a
watermark — the lowest offset not yet settled — so batches may finish in any order without a
gap being committed. While the trigger's buffer is full the consumer pauses its partitions and
keeps polling (so it stays in the group); on a revoke it waits a bounded time for the revoked
partitions' records, commits what finished and lets go.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, Literal, NamedTuple

import anyio
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from pydantic import Field, model_validator

from dispatcher.api import (
    Committer,
    Duration,
    Event,
    Outcome,
    Progress,
    Run,
    Secret,
    Source,
    SourceConfig,
    SourceContext,
    SourceError,
    Span,
    pairs_json,
    rfc3339,
    rfc3339_ms,
    traceparent,
)

log = logging.getLogger("eventswarm.kafka")

REVOKE_WAIT = 10.0
"""How long a revoke waits for the revoked partitions' records in flight before letting go."""
STOP_WAIT = 10.0
"""How long stopping the consumer or the producer may take (a broker that is gone does not answer)."""
REBALANCE_TIMEOUT = REVOKE_WAIT + 20.0
"""How long the broker waits for a member to rejoin: longer than a revoke may take, or the member is dropped."""
BACKLOG = 10_000
"""Records behind from which catching up is followed as a backfill (in the logs and status)."""
LAG_EVERY = 5.0


class KafkaSourceConfig(SourceConfig):
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
    username_env: str = ""
    password_env: str = ""
    username_file: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
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
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                raise ValueError(f"{key}: {value} is not a readable file")
        return self

    def secret(self, key: str) -> Secret:
        return Secret.of(getattr(self, f"{key}_env"), getattr(self, f"{key}_file"))

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers, "security_protocol": self.security}
        if self.security in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
            options["ssl_context"] = context
        if self.security.startswith("SASL"):
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.secret("username").value(),
                           sasl_plain_password=self.secret("password").value())
        return options


Payload = tuple[int, int, bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]
"""What a run keeps of a record: offset, timestamp, key, value, headers. A tuple of these holds no
object the garbage collector must track, so a full buffer costs the collector nothing."""


def _payload(_tp: Any, record: Any) -> Payload:
    """What a run keeps of a record, from aiokafka's ``ConsumerRecord`` or from a record of a fetched batch."""
    headers = record.headers
    return record.offset, record.timestamp, record.key, record.value, tuple(headers) if headers else ()


def payloads_of(records: Iterable[Any]) -> list[Payload]:
    """Records as payloads: a record the fetcher already made a payload stays as it is."""
    return [record if type(record) is tuple else _payload(None, record) for record in records]


Undecodable = Callable[[Any, int, BaseException], None]
"""Told of a partition whose records from an offset on cannot be decoded: (its TopicPartition, the offset, why)."""


class _PayloadBuffer(OrderedDict):  # type: ignore[type-arg]
    """aiokafka's buffer of fetched partitions, whose records come out as payloads; a batch that cannot be decoded
    ends its partition's records there (those before it come out) and is told to ``undecodable``."""

    def __init__(self, undecodable: Undecodable) -> None:
        super().__init__()
        self.undecodable = undecodable

    def __setitem__(self, tp: Any, result: Any) -> None:
        records = getattr(result, "_partition_records", None)
        if isinstance(records, PartitionRecords):
            records._consumer_record = _payload
            records._records_iterator = _guarded(records, records._records_iterator, self.undecodable)
        super().__setitem__(tp, result)


def _guarded(records: Any, iterator: Any, undecodable: Undecodable) -> Any:
    """``iterator``'s records until one cannot be decoded (a batch whose codec's data is corrupt, a codec no library
    reads): then it ends, so that aiokafka hands out the records before it and keeps the partition's position at it.
    (Raised, the error would lose the records that the same fetch drained from other partitions.)"""
    try:
        yield from iterator
    except Exception as exc:
        undecodable(records._tp, records.next_fetch_offset, exc)


def fetch_payloads(consumer: AIOKafkaConsumer, undecodable: Undecodable) -> bool:
    """Have a started consumer's ``getmany`` return payloads instead of ``ConsumerRecord`` objects.

    aiokafka builds a dataclass of eleven fields per record, about half of its cost per record;
    the source keeps a tuple of five. This reaches into aiokafka's fetcher (its ``_records``
    buffer, and the ``_consumer_record`` method of ``PartitionRecords``, which still does the
    batching, transaction and position work), so it checks that both are as expected and
    otherwise leaves the consumer alone and returns False: the source then converts each record.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    buffered = getattr(fetcher, "_records", None)
    if type(buffered) is not OrderedDict or not _consumer_record_as_expected():
        return False
    replacement = _PayloadBuffer(undecodable)
    for tp, result in buffered.items():
        replacement[tp] = result
    fetcher._records = replacement  # type: ignore[union-attr]
    return True


def _consumer_record_as_expected() -> bool:
    """aiokafka's ``PartitionRecords._consumer_record(self, tp, record)``, the method the fast path replaces."""
    method = getattr(PartitionRecords, "_consumer_record", None)
    try:
        if not callable(method) or "_records_iterator" not in inspect.getsource(PartitionRecords.__init__):
            return False
    except (OSError, TypeError):
        return False
    try:
        return list(inspect.signature(method).parameters) == ["self", "tp", "record"]
    except (TypeError, ValueError):
        return False


class Record(NamedTuple):
    """A record as ``to_event`` reads it (aiokafka's ``ConsumerRecord`` has the same fields)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def _next(offset: int) -> int:
    """Where a partition resumes after the record at ``offset``."""
    return offset + 1


def _offset(payload: Payload) -> int:
    return payload[0]


_RAW_JSON = msgspec.json.Decoder(msgspec.Raw)


def json_error(value: bytes) -> str | None:
    """Why ``value`` is not RFC 8259 JSON in UTF-8, or None when it is."""
    try:
        _RAW_JSON.decode(value)  # the grammar, without building objects
        value.decode("utf-8")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return str(exc)
    return None


def to_event(record: Any, value_format: str, received: float | None = None) -> Event:
    """A consumer record as a CloudEvent; a value that does not fit ``value_format`` travels as ``data_base64``.

    A JSON value must be RFC 8259 JSON in UTF-8 (no NaN, no lone surrogates, no byte order
    mark): what every consumer of the function's input can parse.
    """
    topic, partition, offset = record.topic, record.partition, record.offset
    extensions: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset}
    if record.headers:
        extensions["kafkaheaders"] = pairs_json(record.headers)
        trace = _trace(record.headers)
        if trace:
            extensions["traceparent"] = trace
    key = record.key
    subject = None
    if key is not None:
        try:
            subject = key.decode("utf-8")
        except UnicodeDecodeError:
            subject = base64.b64encode(key).decode("ascii")
            extensions["keyencoding"] = "base64"
    common: dict[str, Any] = {
        "id": f"{topic}/{partition}/{offset}", "source": f"kafka://{topic}/{partition}",
        "type": "eventswarm.kafka.record", "subject": subject, "partition": f"{topic}/{partition}",
        "time": rfc3339_ms(record.timestamp) if record.timestamp and record.timestamp > 0 else None,
        "extensions": extensions, "received": received,
    }
    value: bytes | None = record.value
    if value is None:
        return Event(data=None, **common)
    if value_format == "json":
        error = json_error(value)
        if error is None:
            try:
                return Event(data=json.loads(value), **common)
            except ValueError as exc:  # valid JSON Python cannot hold (an integer of 5000 digits)
                error = str(exc)
        extensions["dataerror"] = f"not valid JSON: {error}"[:200]
    elif value_format == "text":
        try:
            return Event(data=value.decode("utf-8"), datacontenttype="text/plain", **common)
        except UnicodeDecodeError as exc:
            extensions["dataerror"] = f"not valid UTF-8: {exc}"[:200]
    return Event(data_base64=value, **common)


_KEYS: dict[bytes | None, tuple[str | None, bytes]] = {}
"""Record keys seen lately: the event's subject, and its JSON members (with the extension saying how it is encoded)."""


def _key(key: bytes | None) -> tuple[str | None, bytes]:
    if key is None:
        return None, b""
    try:
        subject, extra = key.decode("utf-8"), b""
    except UnicodeDecodeError:
        subject, extra = base64.b64encode(key).decode("ascii"), b',"keyencoding":"base64"'
    if len(_KEYS) >= 4096:
        _KEYS.clear()
    known = _KEYS[key] = (subject, b',"subject":' + encode_basestring(subject).encode() + extra)
    return known


def _headers(headers: Any) -> bytes:
    trace = _trace(headers)
    return (b',"kafkaheaders":' + encode_basestring(pairs_json(headers)).encode()
            + (b',"traceparent":"' + trace.encode() + b'"' if trace else b""))


def _trace(headers: Any) -> str | None:
    """A record's W3C ``traceparent`` header, when it has a well-formed one."""
    return next((trace for key, value in headers if key == "traceparent" and (trace := traceparent(value))), None)


def _json_data(values: Sequence[bytes | None]) -> Sequence[bytes | None]:
    """Each value as the event's data if it is JSON (else None: ``to_event`` says why)."""
    try:
        list(map(_RAW_JSON.decode, values))  # type: ignore[arg-type]
        # Each value begins and ends with ASCII, so the whole is UTF-8 only if each value is.
        b"".join(values).decode("utf-8")  # type: ignore[arg-type]
        return values
    except (msgspec.DecodeError, UnicodeDecodeError, TypeError):
        return [value if value is not None and json_error(value) is None else None for value in values]


def _text_data(values: Sequence[bytes | None]) -> list[bytes | None]:
    data: list[bytes | None] = []
    for value in values:
        try:
            data.append(encode_basestring(value.decode("utf-8")).encode() if value is not None else None)
        except UnicodeDecodeError:
            data.append(None)
    return data


def _bytes_data(values: Sequence[bytes | None]) -> list[bytes | None]:
    return [b'"%s"' % base64.b64encode(value) if value is not None else None for value in values]


_CONTENT = {"json": (b"application/json", b"data", _json_data), "text": (b"text/plain", b"data", _text_data),
            "bytes": (b"application/octet-stream", b"data_base64", _bytes_data)}


def encode_records(topic: str, partition: int, payloads: list[Payload], value_format: str,
                   received: float) -> tuple[list[bytes], list[str], list[str | None], Sequence[int], str | None]:
    """The CloudEvents JSON, ids, subjects and offsets of consecutive records of one partition, and the first
    well-formed ``traceparent`` among their headers.

    The same events as ``to_event`` would make (a test holds them equal), but built from a byte
    template over whole lists, with a JSON value embedded as it came: this is the cost per record
    of the whole source. A record without a value, or whose value does not fit ``value_format``,
    goes through ``to_event``.
    """
    content, field, to_data = _CONTENT[value_format]

    def literal(text: str) -> bytes:
        return encode_basestring(text).encode().replace(b"%", b"%%")

    prefix = f"{topic}/{partition}/"
    template = b"".join((
        b'{"specversion":"1.0","id":', literal(prefix)[:-1], b'%d","source":', literal(f"kafka://{topic}/{partition}"),
        b',"type":"eventswarm.kafka.record","time":"%s","datacontenttype":"', content, b'"%s,"topic":', literal(topic),
        b',"partition":', str(partition).encode(), b',"offset":%d,"', field, b'":%s}'))
    offsets, stamps, record_keys, values, headers = zip(*payloads, strict=True)
    ids = [prefix + str(offset) for offset in offsets]
    data = to_data(values)
    times = {stamp: (rfc3339_ms(stamp) if stamp and stamp > 0 else rfc3339(received)).encode() for stamp in set(stamps)}
    keys = [_KEYS.get(key) or _key(key) for key in record_keys]
    members = [key[1] for key in keys]  # the subject, and the extensions a record may add (their order is free)
    trace = None
    if any(headers):
        members = [member + _headers(pairs) if pairs else member for member, pairs in zip(members, headers, strict=True)]
        trace = next((found for pairs in headers if pairs and (found := _trace(pairs))), None)
    encoded = [template % (offset, times[stamp], member, offset, value) if value is not None
               else to_event(Record(topic, partition, *payload), value_format, received).encode()
               for offset, stamp, member, value, payload in zip(offsets, stamps, members, data, payloads, strict=True)]
    return encoded, ids, [key[0] for key in keys], offsets, trace


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


class KafkaSource(Source[KafkaSourceConfig]):
    config_model = KafkaSourceConfig

    def __init__(self, config: KafkaSourceConfig) -> None:
        super().__init__(config)
        self.committer = Committer(self._commit_offsets, config.commit_interval, final_wait=STOP_WAIT)
        self.marks: dict[TopicPartition, Progress[int]] = self.committer.trackers
        """Each owned partition's progress, by partition."""
        self.held: dict[TopicPartition, list[Payload]] = {}
        """Fetched records of partitions paused at ``max_uncommitted``, handed over once there is room."""
        self.revocations = 0
        """Rebalances that took partitions from this member (a count for status and tests)."""
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.fetches_payloads = False
        self.undecodable: dict[TopicPartition, str] = {}
        """Partitions paused at records that cannot be decoded, and why (until the source restarts)."""
        self._told: list[tuple[TopicPartition, str]] = []
        self._backlog: int | None = None
        """The most records behind since a backfill began (None: none under way)."""
        """Whether a fetch came back as payloads (``fetch_payloads``): the fast path is in effect."""

    async def run(self, ctx: SourceContext) -> None:
        config = self.config
        consumer = AIOKafkaConsumer(
            group_id=config.group_id, enable_auto_commit=False, auto_offset_reset=config.start,
            fetch_max_bytes=config.fetch_max_bytes, max_partition_fetch_bytes=min(config.fetch_max_bytes, 1024 * 1024),
            isolation_level=config.isolation,
            rebalance_timeout_ms=int(REBALANCE_TIMEOUT * 1000), **config.client_options())
        if config.topics:
            consumer.subscribe(config.topics, listener=_Rebalance(self))
        else:
            consumer.subscribe(pattern=config.topic_pattern, listener=_Rebalance(self))
        try:
            await consumer.start()
            if config.dead_letter_topic:
                self._producer = AIOKafkaProducer(acks="all", **config.client_options())
                await self._producer.start()
        except KafkaError as exc:
            await self._stop_clients(consumer)
            why = await tls_problem(config) if config.security in ("SSL", "SASL_SSL") else None
            raise SourceError(f"cannot connect to Kafka at {','.join(config.bootstrap_servers)}: "
                              f"{why or exc}") from exc
        self._consumer = consumer
        self.undecodable.clear()
        if not fetch_payloads(consumer, self._undecodable):
            log.info("this aiokafka's fetcher is not the one expected: records are converted one by one (slower)")
        ctx.set_ready(True)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.committer.run)  # saves once more when cancelled
                tg.start_soon(self._report_lag, ctx)
                await self._consume(ctx, consumer)
        finally:
            with anyio.CancelScope(shield=True):
                # A restart begins again from what was committed; runs still in flight settle on trackers
                # no longer listed, which commit nothing.
                self.marks.clear()
                self.held.clear()
                self._consumer = None
                await self._stop_clients(consumer)
                ctx.set_ready(False)

    async def _stop_clients(self, consumer: AIOKafkaConsumer) -> None:
        producer, self._producer = self._producer, None
        for client in (producer, consumer):
            if client is not None:
                with anyio.move_on_after(STOP_WAIT):
                    await client.stop()

    def _undecodable(self, tp: TopicPartition, offset: int, exc: BaseException) -> None:
        """(From inside a fetch.) The partition's records from ``offset`` cannot be decoded."""
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        self._told.append((tp, f"the records of {tp.topic}/{tp.partition} from offset {offset} cannot be decoded "
                               f"({why}): that partition is paused, its offset stays before them; the other "
                               "partitions go on"))

    def _pause_undecodable(self, ctx: SourceContext, consumer: AIOKafkaConsumer) -> None:
        told, self._told = self._told, []
        for tp, message in told:
            if tp not in consumer.assignment():
                continue  # (revoked meanwhile: its new owner sees the same, and says so)
            consumer.pause(tp)
            if self.undecodable.get(tp) != message:
                log.error("%s", message)
            self.undecodable[tp] = message
        if told:
            ctx.set_ready(False, "; ".join(self.undecodable.values())[:1000])

    async def _consume(self, ctx: SourceContext, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=500, max_records=2000)
            except KafkaError as exc:
                raise SourceError(f"Kafka fetch failed: {exc}") from exc
            if self._told:
                self._pause_undecodable(ctx, consumer)
            if self.held:
                await self._release(ctx, consumer)
            for tp, records in fetched.items():
                mark = self.marks.get(tp)
                if mark is None or not records:
                    continue  # revoked while the fetch was under way
                if type(records[0]) is tuple:
                    self.fetches_payloads = True
                    payloads = records
                else:
                    payloads = payloads_of(records)
                if mark.has_room(len(payloads)):
                    await self._hand_over(ctx, consumer, tp, mark, payloads)
                else:
                    self._hold(ctx, consumer, tp, mark, payloads)

    async def _hand_over(self, ctx: SourceContext, consumer: AIOKafkaConsumer, tp: TopicPartition,
                         mark: Progress[int], payloads: list[Payload]) -> None:
        run = self._run(tp, mark, payloads)
        if not await ctx.offer_run(run):
            await self._emit_paused(ctx, consumer, run)

    def _hold(self, ctx: SourceContext, consumer: AIOKafkaConsumer, tp: TopicPartition, mark: Progress[int],
              payloads: list[Payload]) -> None:
        """The partition's tracker is full (``max_uncommitted``): pause it, keep the records until there is room."""
        consumer.pause(tp)
        self.held[tp] = payloads
        ctx.set_paused(True)
        log.info("partition %s/%d paused: %d records are in flight behind offset %d, which is not settled yet "
                 "(max_uncommitted)", tp.topic, tp.partition, mark.in_flight, mark.committable)

    async def _release(self, ctx: SourceContext, consumer: AIOKafkaConsumer) -> None:
        """Hand over the held records of each partition whose tracker has room again, and resume it."""
        for tp, payloads in list(self.held.items()):
            mark = self.marks.get(tp)
            if mark is not None and not mark.has_room(len(payloads)):
                continue
            del self.held[tp]
            if mark is not None:
                consumer.resume(tp)
                log.info("partition %s/%d resumed", tp.topic, tp.partition)
                await self._hand_over(ctx, consumer, tp, mark, payloads)
        ctx.set_paused(bool(self.held))

    def _run(self, tp: TopicPartition, mark: Progress[int], payloads: list[Payload]) -> Run:
        """One fetch's records of one partition as a run, tracked by the partition's watermark."""
        received = time.time()
        value_format = self.config.value_format
        encoded, ids, subjects, offsets, trace = encode_records(tp.topic, tp.partition, payloads, value_format, received)
        span = mark.track_nowait(offsets, begin=offsets[0])  # records below it (compacted) need no settling

        def event(payload: Payload) -> Event:
            return to_event(Record(tp.topic, tp.partition, *payload), value_format, received)
        run = Run(encoded, ids, payloads, event, ack=self._settle, token=span,
                  partition=f"{tp.topic}/{tp.partition}", subjects=subjects, received=received)
        run.trace = trace
        return run

    async def _emit_paused(self, ctx: SourceContext, consumer: AIOKafkaConsumer, run: Run) -> None:
        """The buffer is full: pause every partition, keep polling (to stay in the group) until there is room."""
        consumer.pause(*consumer.assignment())
        ctx.set_paused(True)

        async def poll() -> None:
            while True:
                await anyio.sleep(1.0)
                await consumer.getmany(timeout_ms=0)  # returns nothing for paused partitions

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(poll)
                await ctx.emit_run(run)
                tg.cancel_scope.cancel()
        finally:
            consumer.resume(*(consumer.assignment() - self.held.keys() - self.undecodable.keys()))
            ctx.set_paused(bool(self.held))

    async def _settle(self, run: Run, outcome: Outcome) -> None:
        span: Span[int] = run.token
        if outcome.status == "dead-lettered" and self.config.dead_letter_topic and span.progress in self.marks.values():
            # (A run of a partition no longer owned is read again by its owner, and dead-lettered there.)
            await self._dead_letter(run)
        span.settle(run.payloads, key=_offset)  # a span of a revoked partition changes nothing committed

    async def _dead_letter(self, run: Run) -> None:
        """Produce the run's records to the dead-letter topic, all acknowledged, retrying up to ``dead_letter_timeout``;
        past it, a ``SourceError``: the records stay unsettled and the source restarts."""
        topic, timeout = self.config.dead_letter_topic, self.config.dead_letter_timeout
        error: Exception | None = None
        delay = 0.5
        with anyio.move_on_after(timeout):
            while True:
                producer = self._producer
                if producer is not None:
                    try:
                        sent = [await producer.send(
                            topic, value=value, key=key,
                            headers=[*headers, ("eventswarm-source", f"{run.partition}/{offset}".encode())])
                            for offset, _, key, value, headers in run.payloads]
                        await asyncio.gather(*sent)  # produced together, all acknowledged before the records settle
                        return
                    except KafkaError as exc:
                        error = exc
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise SourceError(f"dead-letter topic {topic!r}: {len(run)} records (from {run.ids[0]}) could not be produced "
                          f"in {timeout:g}s: {error or 'no answer from the broker'}")

    async def _commit_offsets(self, positions: Mapping[TopicPartition, int]) -> None:
        consumer = self._consumer
        if consumer is None:
            raise SourceError("not connected")
        try:
            await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in positions.items()})
        except KafkaError as exc:
            raise SourceError(f"Kafka commit failed: {exc}") from exc

    async def _report_lag(self, ctx: SourceContext) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            lag = 0
            for tp, mark in list(self.marks.items()):
                high = consumer.highwater(tp)
                if high is not None:
                    lag += max(0, high - mark.committable)
            ctx.set_lag(lag, "records")
            self._follow_backlog(ctx, lag)
            await anyio.sleep(LAG_EVERY)

    def _follow_backlog(self, ctx: SourceContext, lag: int) -> None:
        """A lag of ``BACKLOG`` records or more is a backfill (a start far behind, a stall): its progress, records
        committed of records behind (which grows while more arrive than are handled), goes to the daemon."""
        if self._backlog is None and lag < BACKLOG:
            return
        self._backlog = max(self._backlog or 0, lag)
        if lag <= BACKLOG // 10:
            ctx.set_backfill(self._backlog, self._backlog, "records")  # caught up: it ends
            self._backlog = None
        else:
            ctx.set_backfill(self._backlog - lag, self._backlog, "records")

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        consumer = self._consumer
        for tp in partitions:
            if tp not in self.marks:
                committed = await consumer.committed(tp) if consumer is not None else None
                position = committed if committed is not None else await consumer.position(tp) if consumer else 0
                self.marks[tp] = Progress(position, after=_next, limit=self.config.max_uncommitted)

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        owned = [tp for tp in partitions if tp in self.marks]
        self.revocations += bool(owned)
        for tp in partitions:
            self.held.pop(tp, None)  # never tracked: the next owner reads them
            self.undecodable.pop(tp, None)  # (its next owner finds the same records, and says so)
        await self.committer.drain(owned, wait=REVOKE_WAIT)
        for tp in owned:
            del self.marks[tp]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.source.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.source.assigned(set(assigned))


