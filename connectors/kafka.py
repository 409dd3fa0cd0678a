"""Kafka source: a consumer group whose offsets are committed only up to the lowest unfinished record.

Each record becomes a CloudEvent (``subject`` = key; topic, partition, offset, headers as
extensions; the id ``topic/partition/offset``). Offsets are committed per partition up to a
watermark — the lowest offset not yet settled — so batches may finish in any order without a
gap being committed. While the trigger's buffer is full the consumer pauses its partitions and
keeps polling (so it stays in the group); on a revoke it waits a bounded time for the revoked
partitions' records, commits what finished and lets go.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import model_validator

from dispatcher.api import Duration, Event, Outcome, Source, SourceConfig, SourceContext, SourceError, rfc3339

try:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
    from aiokafka.errors import KafkaError
    from aiokafka.structs import OffsetAndMetadata
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the kafka source needs aiokafka: pip install 'eventswarm[kafka]'") from exc

log = logging.getLogger("eventswarm.kafka")

REVOKE_WAIT = 10.0
"""How long a revoke waits for the revoked partitions' records in flight before letting go."""
REBALANCE_TIMEOUT = REVOKE_WAIT + 20.0
"""How long the broker waits for a member to rejoin: longer than a revoke may take, or the member is dropped."""
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
    commit_interval: Duration = 1.0
    fetch_max_bytes: int = 8 * 1024 * 1024
    """Bytes one fetch may bring (bounds what the client holds beyond the trigger's buffer)."""

    @model_validator(mode="after")
    def _check(self) -> KafkaSourceConfig:
        if bool(self.topics) == bool(self.topic_pattern):
            raise ValueError("give exactly one of topics or topic_pattern")
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers: name at least one broker (host:port)")
        if self.security.startswith("SASL"):
            for key in ("username", "password"):
                env, file = getattr(self, f"{key}_env"), getattr(self, f"{key}_file")
                if not env and not file:
                    raise ValueError(f"{key}_env or {key}_file is required with security = {self.security!r}")
                if env and not os.environ.get(env):
                    raise ValueError(f"{key}_env: environment variable {env} is not set")
                if file and not Path(file).is_file():
                    raise ValueError(f"{key}_file: {file} is not a readable file")
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                raise ValueError(f"{key}: {value} is not a readable file")
        return self

    def secret(self, key: str) -> str:
        env, file = getattr(self, f"{key}_env"), getattr(self, f"{key}_file")
        return os.environ.get(env, "") if env else Path(file).read_text().strip()

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers, "security_protocol": self.security}
        if self.security in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
            options["ssl_context"] = context
        if self.security.startswith("SASL"):
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.secret("username"),
                           sasl_plain_password=self.secret("password"))
        return options


class Watermark:
    """One partition's records in flight, in offset order: what may be committed is below the first unsettled.

    Memory is bounded by the records in flight (the trigger's buffer and its batches).
    """

    __slots__ = ("_done", "_idle", "_pending", "committable", "committed")

    def __init__(self, start: int) -> None:
        self._idle: anyio.Event | None = None
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self.committable = start
        """The next offset to commit: every record below it is settled."""
        self.committed = start

    def track(self, offset: int) -> None:
        if not self._pending and offset > self.committable:
            self.committable = offset  # records skipped (compacted, or transaction markers) need no settling
        self._pending.append(offset)

    def settle(self, offset: int) -> None:
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            finished = self._pending.popleft()
            self._done.discard(finished)
            self.committable = finished + 1
        if not self._pending and self._idle is not None:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def idle(self) -> None:
        """Wait until no record of the partition is in flight."""
        while self._pending:
            self._idle = anyio.Event()
            await self._idle.wait()


def to_event(record: Any, value_format: str) -> Event:
    """A consumer record as a CloudEvent; a value that does not fit ``value_format`` travels as ``data_base64``."""
    topic, partition, offset = record.topic, record.partition, record.offset
    extensions: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset}
    if record.headers:
        extensions["kafkaheaders"] = json.dumps(
            {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in record.headers})
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
        "time": rfc3339(record.timestamp / 1000) if record.timestamp and record.timestamp > 0 else None,
        "extensions": extensions,
    }
    value: bytes | None = record.value
    if value is None:
        return Event(data=None, **common)
    if value_format == "json":
        try:
            return Event(data=json.loads(value), **common)
        except (ValueError, UnicodeDecodeError) as exc:
            extensions["dataerror"] = f"not valid JSON: {exc}"[:200]
    elif value_format == "text":
        try:
            return Event(data=value.decode("utf-8"), datacontenttype="text/plain", **common)
        except UnicodeDecodeError as exc:
            extensions["dataerror"] = f"not valid UTF-8: {exc}"[:200]
    return Event(data_base64=value, **common)


class KafkaSource(Source[KafkaSourceConfig]):
    config_model = KafkaSourceConfig

    def __init__(self, config: KafkaSourceConfig) -> None:
        super().__init__(config)
        self.marks: dict[TopicPartition, Watermark] = {}
        self.revocations = 0
        """Rebalances that took partitions from this member (a count for status and tests)."""
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._commit_lock = anyio.Lock()

    async def run(self, ctx: SourceContext) -> None:
        config = self.config
        consumer = AIOKafkaConsumer(
            group_id=config.group_id, enable_auto_commit=False, auto_offset_reset=config.start,
            fetch_max_bytes=config.fetch_max_bytes, max_partition_fetch_bytes=min(config.fetch_max_bytes, 1024 * 1024),
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
            await consumer.stop()
            raise SourceError(f"cannot connect to Kafka at {','.join(config.bootstrap_servers)}: {exc}") from exc
        self._consumer = consumer
        ctx.set_ready(True)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._commit_periodically)
                tg.start_soon(self._report_lag, ctx)
                await self._consume(ctx, consumer)
        finally:
            with anyio.CancelScope(shield=True):
                await self.commit()
                if self._producer is not None:
                    await self._producer.stop()
                await consumer.stop()
                ctx.set_ready(False)

    async def _consume(self, ctx: SourceContext, consumer: AIOKafkaConsumer) -> None:
        value_format = self.config.value_format
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=500, max_records=2000)
            except KafkaError as exc:
                raise SourceError(f"Kafka fetch failed: {exc}") from exc
            for tp, records in fetched.items():
                mark = self.marks.get(tp)
                if mark is None:
                    continue  # revoked while the fetch was under way
                for record in records:
                    mark.track(record.offset)
                    event = to_event(record, value_format)
                    ack = self._acker(tp, mark, record)
                    if not await ctx.offer(event, ack):
                        await self._emit_paused(ctx, consumer, event, ack)

    async def _emit_paused(self, ctx: SourceContext, consumer: AIOKafkaConsumer, event: Event,
                           ack: Callable[[Outcome], Awaitable[None]]) -> None:
        """The buffer is full: pause every partition, keep polling (to stay in the group) until there is room."""
        consumer.pause(*consumer.assignment())
        ctx.set_paused(True)
        try:
            while True:
                with anyio.move_on_after(1.0):
                    await ctx.emit(event, ack)
                    return
                await consumer.getmany(timeout_ms=0)  # returns nothing for paused partitions
        finally:
            consumer.resume(*consumer.assignment())
            ctx.set_paused(False)

    def _acker(self, tp: TopicPartition, mark: Watermark, record: Any) -> Callable[[Outcome], Awaitable[None]]:
        async def ack(outcome: Outcome) -> None:
            if outcome.status == "dead-lettered" and self._producer is not None:
                await self._producer.send_and_wait(
                    self.config.dead_letter_topic, value=record.value, key=record.key,
                    headers=[*(record.headers or ()), ("eventswarm-source", f"{tp.topic}/{tp.partition}/{record.offset}".encode())])
            mark.settle(record.offset)  # a mark no longer in self.marks (revoked) changes nothing committed
        return ack

    async def commit(self, partitions: list[TopicPartition] | None = None) -> None:
        """Commit, per owned partition, every offset below its first unsettled record."""
        consumer = self._consumer
        if consumer is None:
            return
        async with self._commit_lock:
            offsets = {tp: mark for tp, mark in self.marks.items()
                       if (partitions is None or tp in partitions) and mark.committable > mark.committed}
            if not offsets:
                return
            try:
                await consumer.commit({tp: OffsetAndMetadata(m.committable, "") for tp, m in offsets.items()})
            except KafkaError as exc:
                log.warning("commit failed (it is retried): %s", exc)
                return
            for mark in offsets.values():
                mark.committed = mark.committable

    async def _commit_periodically(self) -> None:
        while True:
            await anyio.sleep(self.config.commit_interval)
            await self.commit()

    async def _report_lag(self, ctx: SourceContext) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            lag = 0
            for tp, mark in list(self.marks.items()):
                high = consumer.highwater(tp)
                if high is not None:
                    lag += max(0, high - mark.committable)
            ctx.set_lag(lag)
            await anyio.sleep(LAG_EVERY)

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        consumer = self._consumer
        for tp in partitions:
            if tp not in self.marks:
                committed = await consumer.committed(tp) if consumer is not None else None
                position = committed if committed is not None else await consumer.position(tp) if consumer else 0
                self.marks[tp] = Watermark(position)

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        owned = [tp for tp in partitions if tp in self.marks]
        self.revocations += bool(owned)
        with anyio.move_on_after(REVOKE_WAIT):
            for tp in owned:
                await self.marks[tp].idle()
        await self.commit(owned)
        for tp in owned:
            del self.marks[tp]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.source.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.source.assigned(set(assigned))


