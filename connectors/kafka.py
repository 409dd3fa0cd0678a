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
import logging
import time
from collections.abc import Mapping

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from connectors.kafka_config import KafkaSourceConfig, tls_problem
from connectors.kafka_records import (
    Payload,
    Record,
    encode_records,
    fetch_payloads,
    next_offset,
    offset_of,
    payloads_of,
    to_event,
)
from dispatcher.api import (
    Committer,
    Event,
    Outcome,
    Progress,
    Run,
    Source,
    SourceContext,
    SourceError,
    Span,
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
        """Whether a fetch came back as payloads (``fetch_payloads``): the fast path is in effect."""
        self.undecodable: dict[TopicPartition, str] = {}
        """Partitions paused at records that cannot be decoded, and why (until the source restarts)."""
        self._told: list[tuple[TopicPartition, str]] = []
        self._backlog: int | None = None
        """The most records behind since a backfill began (None: none under way)."""

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
        encoded, ids, subjects, offsets, traces = encode_records(tp.topic, tp.partition, payloads, value_format, received)
        span = mark.track_nowait(offsets, begin=offsets[0])  # records below it (compacted) need no settling

        def event(payload: Payload) -> Event:
            return to_event(Record(tp.topic, tp.partition, *payload), value_format, received)
        run = Run(encoded, ids, payloads, event, ack=self._settle, token=span,
                  partition=f"{tp.topic}/{tp.partition}", subjects=subjects, received=received)
        run.traces = traces
        run.trace = next(filter(None, traces), None) if traces else None
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
        span.settle(run.payloads, key=offset_of)  # a span of a revoked partition changes nothing committed

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
                self.marks[tp] = Progress(position, after=next_offset, limit=self.config.max_uncommitted)

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


