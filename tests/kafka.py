"""Kafka helpers for the tests, through an independent client (confluent-kafka / librdkafka)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def new_topic(broker: str, partitions: int = 4, prefix: str = "t", client: dict[str, str] | None = None) -> str:
    """A new topic (``client``: more librdkafka settings, TLS for one)."""
    name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker, **(client or {})})  # kept alive until the result is in
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=30)
    return name


def produce(broker: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]],
            partition: int | None = None, *, compression: str = "none",
            headers: list[tuple[str, bytes | None]] | None = None, client: dict[str, str] | None = None) -> dict[int, int]:
    """Produce (key, value) pairs (compressed with ``compression``, each with ``headers``; ``client``: more
    librdkafka settings); returns each partition's high watermark from the delivery reports."""
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 5, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 1_000_000, "compression.type": compression, **(client or {})})
    extra = {"headers": headers} if headers else {}
    high: dict[int, int] = {}
    errors: list[str] = []

    def delivered(err, msg) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            high[msg.partition()] = max(high.get(msg.partition(), 0), msg.offset() + 1)

    for key, value in messages:
        while True:
            try:
                if partition is None:
                    producer.produce(topic, value=value, key=key, on_delivery=delivered, **extra)
                else:
                    producer.produce(topic, value=value, key=key, partition=partition, on_delivery=delivered, **extra)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not errors, errors[:3]
    return high


def committed(broker: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": broker, "group.id": group, "enable.auto.commit": False})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
        return {tp.partition: tp.offset for tp in offsets}
    finally:
        consumer.close()


def consume_all(broker: str, topic: str, expected: int, timeout: float = 30,
                partitions: int = 1) -> list[tuple[bytes | None, bytes | None, list]]:
    """Read ``expected`` records from the start of ``topic`` (assigned directly: no group to join)."""
    import time

    consumer = Consumer({"bootstrap.servers": broker, "group.id": f"reader-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    out: list[tuple[bytes | None, bytes | None, list]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append((msg.key(), msg.value(), msg.headers() or []))
    finally:
        consumer.close()
    return out


@contextlib.contextmanager
def own_broker(log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A tansu broker of the test's own on a free port (for faults: the test may stop it, and only it).

    Its binary is the one ``scripts/kafka.sh`` installed (the ``kafka_broker`` fixture runs that script).
    """
    from tests.support import SERVICES_HOME, free_port, own_service

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [str(SERVICES_HOME / "tansu"), "broker", "--listener-url", url, "--advertised-listener-url", url]
    with own_service(argv, port, log, "the test's own broker") as proc:
        yield f"127.0.0.1:{port}", proc


def produce_undecodable(broker: str, topic: str, partition: int, codec: int, count: int = 3) -> None:
    """A record batch that says it is compressed with ``codec`` (1 gzip, 2 snappy, 3 lz4, 4 zstd) and is not: what
    a broken producer, or a disk's damage behind a valid CRC, leaves. The broker keeps it (tansu does not decode
    batches); no consumer library can read it. Sent as a raw ProduceRequest through aiokafka's client."""
    import asyncio
    import struct

    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.produce import ProduceRequest
    from aiokafka.record._crc32c import crc as crc32c
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.structs import TopicPartition as AioTopicPartition

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for n in range(count):
        builder.append(n, timestamp=1_700_000_000_000 + n, key=None, value=b'{"undecodable": %d}' % n, headers=[])
    batch = bytearray(builder.build())
    attributes = struct.unpack_from(">h", batch, 21)[0]
    struct.pack_into(">h", batch, 21, (attributes & ~7) | codec)
    struct.pack_into(">I", batch, 17, crc32c(bytes(batch[21:])))  # a valid CRC over the lie

    async def send() -> None:
        client = AIOKafkaClient(bootstrap_servers=broker)
        await client.bootstrap()
        try:
            await client.force_metadata_update()
            leader = client.cluster.leader_for_partition(AioTopicPartition(topic, partition))
            answer = await client.send(leader, ProduceRequest(None, -1, 30000, [(topic, [(partition, bytes(batch))])]))
            errors = [p[1] for t in answer.topics for p in t[1]]
            assert errors == [0], answer
        finally:
            await client.close()

    asyncio.run(send())
