"""Per trigger: the bounded buffer, the filter, ordering lanes and the batcher feeding the dispatcher."""

from __future__ import annotations

import logging
import math
import zlib

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dispatcher.api import Ack, Outcome
from dispatcher.config import TriggerBase
from dispatcher.dispatch import Delivery, Dispatcher
from dispatcher.events import Event
from dispatcher.filters import compile_filter
from dispatcher.metrics import Metrics

log = logging.getLogger("eventswarm.pipeline")


class BatchBuilder:
    """Collects deliveries into one batch within ``max_events`` and ``max_bytes``.

    An event larger than ``max_bytes`` on its own still forms a batch of one: it is never stuck.
    """

    __slots__ = ("bytes", "items", "max_bytes", "max_events")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.items: list[Delivery] = []
        self.bytes = 0

    def fits(self, delivery: Delivery) -> bool:
        if not self.items:
            return True
        return len(self.items) < self.max_events and self.bytes + delivery.event.size + 1 <= self.max_bytes

    def add(self, delivery: Delivery) -> None:
        self.items.append(delivery)
        self.bytes += delivery.event.size + 1

    @property
    def full(self) -> bool:
        return len(self.items) >= self.max_events or self.bytes >= self.max_bytes

    def take(self) -> list[Delivery]:
        items, self.items, self.bytes = self.items, [], 0
        return items


class Lane:
    """One bounded queue of deliveries and the batches cut from it.

    With ``ordering = "none"`` a trigger has one lane that all its workers cut batches from (one
    worker at a time); with ``key`` or ``partition``, one lane per worker, so a key or partition,
    always routed to the same lane, never has two batches in flight.
    """

    def __init__(self, capacity: int, max_events: int, max_bytes: int, max_wait: float) -> None:
        self.send: MemoryObjectSendStream[Delivery]
        self.receive: MemoryObjectReceiveStream[Delivery]
        self.send, self.receive = anyio.create_memory_object_stream[Delivery](capacity)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self._carry: Delivery | None = None
        self._lock = anyio.Lock()

    @property
    def depth(self) -> int:
        return self.receive.statistics().current_buffer_used + (self._carry is not None)

    async def next_batch(self) -> list[Delivery]:
        """The next batch: waits for a first event, then up to ``max_wait`` for more, until a limit is hit."""
        async with self._lock:
            builder = BatchBuilder(self.max_events, self.max_bytes)
            if self._carry is not None:
                builder.add(self._carry)
                self._carry = None
            else:
                builder.add(await self.receive.receive())
            deadline = anyio.current_time() + self.max_wait
            while not builder.full:
                try:
                    delivery = self.receive.receive_nowait()
                except anyio.WouldBlock:
                    remaining = deadline - anyio.current_time()
                    if remaining <= 0:
                        break
                    waited: Delivery | None = None
                    with anyio.move_on_after(remaining):
                        waited = await self.receive.receive()
                    if waited is None:
                        break
                    delivery = waited
                if not builder.fits(delivery):
                    self._carry = delivery
                    break
                builder.add(delivery)
            return builder.take()


class Pipeline:
    """Takes a trigger's events from its source and keeps its workers busy with batches."""

    def __init__(self, trigger: str, config: TriggerBase, dispatcher: Dispatcher, metrics: Metrics,
                 *, single_events: bool = False) -> None:
        self.trigger = trigger
        self.config = config
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.filter = compile_filter(config.filter)
        max_events = 1 if single_events else config.batch.max_events
        batch = config.batch
        if config.ordering == "none":
            self.lanes = [Lane(config.buffer, max_events, batch.max_bytes, batch.max_wait)]
            self.workers_per_lane = config.max_in_flight
        else:
            count = config.max_in_flight
            capacity = max(1, math.ceil(config.buffer / count))
            self.lanes = [Lane(capacity, max_events, batch.max_bytes, batch.max_wait) for _ in range(count)]
            self.workers_per_lane = 1
        self._round_robin = 0
        self._collecting: set[anyio.CancelScope] = set()
        self._received = metrics.events_received.labels(trigger)
        metrics.buffered.labels(trigger).set_function(lambda: self.depth)

    @property
    def depth(self) -> int:
        return sum(lane.depth for lane in self.lanes)

    def _lane(self, event: Event) -> Lane:
        if len(self.lanes) == 1:
            return self.lanes[0]
        key = event.subject if self.config.ordering == "key" else event.partition
        if key is None:
            self._round_robin += 1
            return self.lanes[self._round_robin % len(self.lanes)]
        return self.lanes[zlib.crc32(key.encode()) % len(self.lanes)]

    async def emit(self, event: Event, ack: Ack | None = None) -> None:
        """Filter ``event`` and put it in its lane, waiting while the lane is full (the backpressure)."""
        self._received.inc()
        if await self._filtered_out(event, ack):
            return
        await self._lane(event).send.send(Delivery(event, ack))

    async def offer(self, event: Event, ack: Ack | None = None) -> bool:
        """``emit`` without waiting: False (and nothing taken) when the event's lane is full."""
        if self.filter is not None and not self.filter(event):
            self._received.inc()
            await self._filtered_out(event, ack)
            return True
        try:
            self._lane(event).send.send_nowait(Delivery(event, ack))
        except anyio.WouldBlock:
            return False
        self._received.inc()
        return True

    async def _filtered_out(self, event: Event, ack: Ack | None) -> bool:
        if self.filter is None or self.filter(event):
            return False
        self.metrics.events_dropped.labels(self.trigger, "filtered").inc()
        self.metrics.events_acked.labels(self.trigger).inc()
        if ack is not None:
            await ack(Outcome("dropped"))
        return True

    async def run(self) -> None:
        """Cut batches and deliver them until ``drain`` is called; the caller's scope bounds the rest."""
        async with anyio.create_task_group() as tg:
            for lane in self.lanes:
                for _ in range(self.workers_per_lane):
                    tg.start_soon(self._work, lane)

    def close(self) -> None:
        """Release the lanes' streams (what is still in them is handed back, never acknowledged)."""
        for lane in self.lanes:
            lane.send.close()
            lane.receive.close()

    def drain(self) -> None:
        """Stop cutting new batches; batches in flight finish (or are handed back at their next retry)."""
        self.dispatcher.draining.set()
        for scope in list(self._collecting):
            scope.cancel()

    async def _work(self, lane: Lane) -> None:
        while not self.dispatcher.draining.is_set():
            with anyio.CancelScope() as scope:
                self._collecting.add(scope)
                try:
                    batch = await lane.next_batch()
                finally:
                    self._collecting.discard(scope)
            if scope.cancelled_caught or self.dispatcher.draining.is_set():
                return  # what was collected is handed back: never acknowledged
            await self.dispatcher.deliver(batch)
