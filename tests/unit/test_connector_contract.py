"""What every connector must honour, checked for each installed one against ``dispatcher.testing.StubContext``.

Each connector runs for real (the Kafka source against the real broker); only the daemon around it
is the stub, which settles events when, and how, the test says. A harness per connector kind feeds
it input at its origin and reads back what it acknowledged there (webhook: removed from the inbox;
Kafka: below the committed offset). A new connector needs a harness here, or the suite fails.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import pytest

from dispatcher.api import HttpRequest, HttpResponse, Source
from dispatcher.plugins import connectors
from dispatcher.testing import StubContext

pytestmark = pytest.mark.anyio


class Harness(Protocol):
    def make_source(self) -> Source[Any]:
        """A new source on the same origin (the same topic and group, the same inbox)."""
        ...

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        """Put ``count`` new events in at the origin; their event ids, in order."""
        ...

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        """Which of ``ids`` the origin holds as acknowledged (after the source saved what it may)."""
        ...


class WebhookHarness:
    path = "/hooks/contract"

    def make_source(self) -> Source[Any]:
        from connectors.webhook import WebhookSource, WebhookSourceConfig

        return WebhookSource(WebhookSourceConfig(kind="webhook", path=self.path))

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        ids = []
        for n in range(count):
            response = await ctx.request("POST", self.path, {"n": n})
            assert response.status == 202, response.body
            ids.append(json.loads(response.body)["id"])
        return ids

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        return {i for i in ids if i not in ctx.inbox.events}


class KafkaHarness:
    def __init__(self, broker: str) -> None:
        from tests.kafka import new_topic

        self.broker = broker
        self.topic = new_topic(broker, 1, prefix="contract")
        self.offset = 0

    def make_source(self) -> Source[Any]:
        from connectors.kafka import KafkaSource, KafkaSourceConfig

        return KafkaSource(KafkaSourceConfig(kind="kafka", bootstrap_servers=[self.broker], topics=[self.topic],
                                             group_id=f"g-{self.topic}", commit_interval=0.1))

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        from tests.kafka import produce

        values = [(None, json.dumps({"n": n}).encode()) for n in range(count)]
        await anyio.to_thread.run_sync(lambda: produce(self.broker, self.topic, values, partition=0))
        first, self.offset = self.offset, self.offset + count
        return [f"{self.topic}/0/{o}" for o in range(first, self.offset)]

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        from tests.kafka import committed

        await source.committer.save()  # type: ignore[attr-defined]  # what a commit interval would do
        offset = (await anyio.to_thread.run_sync(lambda: committed(self.broker, f"g-{self.topic}", self.topic, 1)))[0]
        return {i for i in ids if int(i.rsplit("/", 1)[1]) < offset}


class FileHarness:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.count = 0
        self.names: dict[str, str] = {}

    def make_source(self) -> Source[Any]:
        from connectors.file import FileSource, FileSourceConfig

        return FileSource(FileSourceConfig(kind="file", path=str(self.folder), patterns=["*.json"], stable_for=0.05))

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        import hashlib

        ids = []
        for n in range(self.count, self.count + count):
            content = json.dumps({"n": n}).encode()
            (self.folder / f".{n}.json.part").write_bytes(content)
            (self.folder / f".{n}.json.part").rename(self.folder / f"{n}.json")
            ids.append(hashlib.sha256(f"{n}.json\0{hashlib.sha256(content).hexdigest()}".encode()).hexdigest()[:32])
            self.names[ids[-1]] = f"{n}.json"
        self.count += count
        return ids

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        moved = {p.name for folder in ("done", "failed") for p in (self.folder / folder).glob("*.json")}
        return {i for i in ids if self.names[i] in moved}


class LinesHarness:
    """The file source in lines mode: one log file appended to; acknowledged = below the saved offset."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.folder = folder
        self.log = folder / "app.log"
        self.log.touch()
        self.lines: dict[str, int] = {}
        """Event id -> the offset past the line."""

    def make_source(self) -> Source[Any]:
        from connectors.file import FileSource, FileSourceConfig

        return FileSource(FileSourceConfig(kind="file", path=str(self.folder), patterns=["*.log"], mode="lines"))

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        import zlib

        st = self.log.stat()
        ids, offset = [], st.st_size
        with self.log.open("ab") as f:
            for n in range(count):
                line = json.dumps({"n": n}).encode()
                f.write(line + b"\n")
                ids.append(f"{st.st_dev}:{st.st_ino}/{offset}-{zlib.crc32(line):08x}")
                offset += len(line) + 1
                self.lines[ids[-1]] = offset
        return ids

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        await source.lines.committer.save()  # type: ignore[attr-defined]  # what a commit interval would do
        st = self.log.stat()
        saved = ctx.checkpoints.values.get(f"file/{st.st_dev}:{st.st_ino}")
        offset = json.loads(saved)["offset"] if saved else 0
        return {i for i in ids if self.lines[i] <= offset}


class EthereumHarness:
    """The Ethereum source on an anvil of the test's own, one log per block (a checkpoint is per block)."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        from tests.ethereum import Token, own_anvil

        request.getfixturevalue("eth_node")
        anvil = own_anvil(request.getfixturevalue("tmp_path") / "anvil.log")
        self.node, _ = anvil.__enter__()
        request.addfinalizer(lambda: anvil.__exit__(None, None, None))
        self.token = Token(self.node, request.getfixturevalue("token_contract"))
        self.blocks: dict[str, int] = {}

    def make_source(self) -> Source[Any]:
        from connectors.ethereum import EthereumSource, EthereumSourceConfig
        from tests.ethereum import TRANSFER

        return EthereumSource(EthereumSourceConfig(
            kind="ethereum", rpc_url=self.node, addresses=[self.token.address], events=[TRANSFER],
            from_block=self.token.deployed_at, confirmations=0, poll_interval=0.05, commit_interval=0.1))

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        def emit() -> list[str]:
            ids = []
            for n in range(count):
                ids.append(self.token.emit_one(n))
                self.blocks[ids[-1]] = self.token.head()
            return ids
        return await anyio.to_thread.run_sync(emit)

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        await source.committer.save()  # type: ignore[attr-defined]  # what a commit interval would do
        saved = ctx.checkpoints.values.get(f"block/{self.token.web3.eth.chain_id}")
        number = json.loads(saved)["number"] if saved else -1
        return {i for i in ids if self.blocks[i] <= number}


class ScheduleHarness:
    """The schedule source on a clock the test moves: feeding N events is moving it N seconds (``every = "1s"``,
    ``catch_up = "all"``: the ticks missed meanwhile fire in order); acknowledged = fired and no longer pending in
    its checkpoint."""

    def __init__(self) -> None:
        from tests.clock import FakeClock

        self.clock = FakeClock(1_800_000_000.0)

    def make_source(self) -> Source[Any]:
        from connectors.schedule import ScheduleSource, ScheduleSourceConfig

        return ScheduleSource(ScheduleSourceConfig(kind="schedule", every="1s", catch_up="all", max_catch_up=1000),
                              clock=self.clock)

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        from connectors.schedule_ticks import tick_id

        start = self.clock.now()
        await self.clock.move(count)
        return [tick_id(ctx.trigger, start + n) for n in range(1, count + 1)]

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        from connectors.schedule_ticks import tick_id

        state = json.loads(ctx.checkpoints.values["schedule"])
        pending = {tick_id(ctx.trigger, tick) for tick in state["pending"]}
        return {i for i in ids if i not in pending and i <= tick_id(ctx.trigger, state["fired"])}


class NatsHarness:
    """A stream with work-queue retention, so that an acknowledged message is gone from it: what the server holds
    as acknowledged is read message by message."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        from tests.nats import NatsServer, add_stream

        self.server = NatsServer(request.getfixturevalue("tmp_path") / "nats").start()
        request.addfinalizer(self.server.kill)
        with ThreadPoolExecutor(1) as pool:  # (the stream is there before the source starts)
            pool.submit(asyncio.run, add_stream(self.server, "CONTRACT", ["contract.>"], retention="workqueue")).result()

    def make_source(self) -> Source[Any]:
        from connectors.nats import NatsSource, NatsSourceConfig

        return NatsSource(NatsSourceConfig(kind="nats", servers=[self.server.url], stream="CONTRACT",
                                           consumer="contract"))

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        from tests.nats import publish

        last = await publish(self.server, "CONTRACT", [("contract.x", json.dumps({"n": n}).encode(), None)
                                                       for n in range(count)])
        return [f"CONTRACT/{sequence}" for sequence in range(last - count + 1, last + 1)]

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        from tests.nats import stored

        client = source.client  # type: ignore[attr-defined]
        if client is not None:
            await client.flush(timeout=10)  # (the acknowledgements sent are at the server)
        held = await stored(self.server, "CONTRACT", [int(i.rsplit("/", 1)[1]) for i in ids])
        return {i for i in ids if int(i.rsplit("/", 1)[1]) not in held}


class MqttHarness:
    """MQTT messages have no identity: the harness reads back what the source made of them (ids are the
    source's), and knows a message again by its payload. What the broker holds as acknowledged is what the source
    sent PUBACKs for: in the order the messages came, so the first ``acknowledged`` of them."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        from tests.mqtt import Mosquitto

        self.broker = Mosquitto(request.getfixturevalue("tmp_path") / "mosquitto").start()
        request.addfinalizer(self.broker.kill)
        self.count = 0

    def make_source(self) -> Source[Any]:
        from connectors.mqtt import MqttSource, MqttSourceConfig

        return MqttSource(MqttSourceConfig(kind="mqtt", host="127.0.0.1", port=self.broker.port,
                                           topics=["contract/#"], client_id="contract"))

    async def feed(self, ctx: StubContext, count: int) -> list[str]:
        from tests.mqtt import publish

        before = len(ctx.emitted)
        first, self.count = self.count, self.count + count
        await anyio.to_thread.run_sync(lambda: publish(
            self.broker, [("contract/x", json.dumps({"n": n}).encode()) for n in range(first, self.count)]))
        await ctx.wait_emitted(before + count)
        return ctx.emitted[before:before + count]

    def same(self, ctx: StubContext, event_id: str) -> Any:
        return ctx.event(event_id).data["n"]  # type: ignore[index]

    async def acknowledged(self, ctx: StubContext, source: Source[Any], ids: list[str]) -> set[str]:
        return set(ids[:source.acknowledged])  # type: ignore[attr-defined]


HARNESSES: dict[str, list[Callable[[pytest.FixtureRequest], Harness]]] = {
    "webhook": [lambda request: WebhookHarness()],
    "kafka": [lambda request: KafkaHarness(request.getfixturevalue("kafka_broker"))],
    "file": [lambda request: FileHarness(request.getfixturevalue("tmp_path") / "drop"),
             lambda request: LinesHarness(request.getfixturevalue("tmp_path") / "logs")],
    "ethereum": [EthereumHarness],
    "schedule": [lambda request: ScheduleHarness()],
    "nats": [NatsHarness],
    "mqtt": [MqttHarness],
}
VARIANTS = [(kind, i) for kind in sorted(connectors()) for i in range(len(HARNESSES.get(kind, [None])))]


@pytest.fixture(params=VARIANTS, ids=[f"{kind}-{i}" for kind, i in VARIANTS])
def harness(request: pytest.FixtureRequest) -> Harness:
    kind, variant = request.param
    if kind not in HARNESSES:
        pytest.fail(f"connector {kind!r} has no contract harness in {Path(__file__).name}")
    return HARNESSES[kind][variant](request)


async def running(source: Source[Any], ctx: StubContext, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``source`` against ``ctx`` while ``body`` runs; then stop it, as the daemon does (a cancel)."""
    async with ctx.running(source):
        await body()


async def check_acknowledgements_follow_settlement(harness: Harness) -> None:
    """Nothing is acknowledged before it is settled, and a position never passes an unsettled event."""
    ctx, source = StubContext(), harness.make_source()

    async def body() -> None:
        ids = await harness.feed(ctx, 20)
        await ctx.wait_emitted(20)
        assert sorted(ctx.unsettled()) == sorted(ids)
        assert await harness.acknowledged(ctx, source, ids) == set(), "acknowledged before anything was settled"
        # Everything but the first settles, in parts and out of order, with every settled outcome.
        await ctx.settle(ids[10:], "succeeded")
        await ctx.settle(ids[5:10], "dead-lettered")
        await ctx.settle(ids[1:5], "dropped")
        acked = await harness.acknowledged(ctx, source, ids)
        assert acked <= set(ctx.settled), f"acknowledged but not settled: {sorted(acked - set(ctx.settled))[:5]}"
        assert ids[0] not in acked
        await ctx.settle([ids[0]])
        assert await harness.acknowledged(ctx, source, ids) == set(ids)

    await running(source, ctx, body)


async def test_nothing_is_acknowledged_before_it_is_settled(harness: Harness):
    await check_acknowledgements_follow_settlement(harness)


async def test_a_stop_saves_what_is_settled_and_what_was_not_comes_again(harness: Harness):
    ctx, source = StubContext(), harness.make_source()
    ids: list[str] = []

    async def first() -> None:
        ids.extend(await harness.feed(ctx, 10))
        await ctx.wait_emitted(10)
        await ctx.settle(ids[:4])

    await running(source, ctx, first)
    assert await harness.acknowledged(ctx, source, ids) == set(ids[:4])
    ctx.forget()  # what was in flight at the stop is never acknowledged
    again = harness.make_source()

    async def second() -> None:
        await ctx.wait_emitted(16)

    await running(again, ctx, second)
    # (A message is known by its id; for a source whose messages have no identity of their own, MQTT's, by what
    # its harness says is the same message.)
    same = getattr(harness, "same", lambda ctx, event_id: event_id)
    assert sorted(same(ctx, i) for i in ctx.emitted[10:]) == sorted(same(ctx, i) for i in ids[4:])


async def test_the_suite_catches_a_source_that_acknowledges_early():
    """A webhook source broken on purpose (it drops each event from its inbox as soon as it is emitted)
    must fail the check the real sources pass."""
    from connectors.webhook import WebhookSource

    class Early(WebhookSource):
        async def handle(self, request: HttpRequest) -> HttpResponse:
            response = await super().handle(request)
            if response.status == 202:
                await self._ctx.inbox.remove(json.loads(response.body)["id"])
            return response

    class EarlyHarness(WebhookHarness):
        def make_source(self) -> Source[Any]:
            source = super().make_source()
            return Early(source.config)

    with pytest.raises(AssertionError, match="acknowledged before anything was settled"):
        await check_acknowledgements_follow_settlement(EarlyHarness())
