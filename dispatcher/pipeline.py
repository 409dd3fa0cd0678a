"""Per trigger: the bounded buffer, the filter, ordering lanes and the batcher feeding the dispatcher."""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import operator
import zlib
from collections import defaultdict, deque

import anyio

from dispatcher.api import Ack, Outcome
from dispatcher.config import TriggerBase
from dispatcher.dispatch import Dispatcher, HandedBack
from dispatcher.events import Event, Run
from dispatcher.filters import compile_filter
from dispatcher.metrics import Metrics

log = logging.getLogger("eventswarm.pipeline")

STICKY_PARTITIONS = 4096
"""Partitions given lanes in turn; later ones are hashed to a lane (the map never forgets, so a partition never moves)."""


class BatchBuilder:
    """Collects runs of events into one batch within ``max_events`` and ``max_bytes``.

    ``room`` says how many of a run's leading events fit; a run that does not fit whole is cut
    there. An event larger than ``max_bytes`` on its own still forms a batch of one: it is never stuck.
    """

    __slots__ = ("bytes", "count", "max_bytes", "max_events", "runs")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.runs: list[Run] = []
        self.count = 0
        self.bytes = 0

    def room(self, run: Run) -> int:
        """How many of ``run``'s first events fit (at least 1 in an empty batch)."""
        events = min(len(run), self.max_events - self.count)
        space = self.max_bytes - self.bytes
        if run.nbytes <= space:
            return events  # all of it fits the bytes: the count decides
        sizes = map(operator.add, map(len, run.encoded[:events]), itertools.repeat(1))  # each event and its comma
        fits = bisect.bisect_right(list(itertools.accumulate(sizes)), space)
        return fits if fits or self.count else 1

    def add(self, run: Run) -> None:
        self.runs.append(run)
        self.count += len(run)
        self.bytes += run.nbytes

    @property
    def full(self) -> bool:
        return self.count >= self.max_events or self.bytes >= self.max_bytes

    def take(self) -> list[Run]:
        runs, self.runs, self.count, self.bytes = self.runs, [], 0, 0
        return runs


class RunQueue:
    """A lane's bounded queue of runs. Its capacity counts events; a run larger than the capacity
    still enters an empty queue, so memory is bounded by the capacity or the largest run."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.bytes = 0
        self.runs: deque[Run] = deque()
        self.closed = False
        self._arrived = anyio.Event()
        self._left = anyio.Event()
        self._wanted = (1, 1)

    def has_room(self, run: Run) -> bool:
        return not self.count or self.count + len(run) <= self.capacity

    def put_nowait(self, run: Run) -> bool:
        if self.closed:
            raise anyio.ClosedResourceError
        if not self.has_room(run):
            return False
        self.runs.append(run)
        self.count += len(run)
        self.bytes += run.nbytes
        if self.count >= self._wanted[0] or self.bytes >= self._wanted[1]:
            self._arrived.set()
        return True

    async def put(self, run: Run) -> None:
        while not self.put_nowait(run):
            if self._left.is_set():
                self._left = anyio.Event()
            await self._left.wait()

    async def wait(self, count: int = 1, nbytes: int = 1) -> None:
        """Wait until ``count`` events, or ``nbytes`` bytes of them, are queued.

        A batcher that waits for more events to fill its batch is woken once they are there (or at its
        deadline), not at every single event: with events arriving one at a time (webhooks), waking per
        event was most of the pipeline's cost.
        """
        while self.count < count and self.bytes < nbytes:
            if self.closed:
                if self.count:
                    break
                raise anyio.ClosedResourceError
            self._wanted = (count, nbytes)
            if self._arrived.is_set():
                self._arrived = anyio.Event()
            await self._arrived.wait()
        self._wanted = (1, 1)

    def take(self, count: int) -> Run:
        """The first ``count`` events of the first run (the run itself when that is all of it)."""
        head = self.runs[0]
        if count >= len(head):
            self.runs.popleft()
            taken = head
        else:
            taken, rest = head.slice(0, count), head.slice(count)
            rest.nbytes = head.nbytes - taken.nbytes
            self.runs[0] = rest
        self.count -= len(taken)
        self.bytes -= taken.nbytes
        self._left.set()
        return taken

    def close(self) -> None:
        self.closed = True
        self._arrived.set()
        self._left.set()


class Lane:
    """One bounded queue of runs and the batches cut from it.

    With ``ordering = "none"`` a trigger has one lane that all its workers cut batches from (one
    worker at a time); with ``key`` or ``partition``, one lane per worker, so a key or partition,
    always routed to the same lane, never has two batches in flight.
    """

    def __init__(self, capacity: int, max_events: int, max_bytes: int, max_wait: float) -> None:
        self.queue = RunQueue(capacity)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self.collected = 0
        """Events taken from the queue into the batch being collected."""
        self._lock = anyio.Lock()

    @property
    def depth(self) -> int:
        return self.queue.count

    async def next_batch(self) -> list[Run]:
        """The next batch: waits for a first event, then up to ``max_wait`` for more, until a limit is hit."""
        async with self._lock:
            queue = self.queue
            builder = BatchBuilder(self.max_events, self.max_bytes)
            await queue.wait()
            deadline = anyio.current_time() + self.max_wait
            try:
                while True:
                    while queue.runs:
                        head = queue.runs[0]
                        fits = builder.room(head)
                        if fits:
                            builder.add(queue.take(fits))
                            self.collected = builder.count
                        if fits < len(head) or builder.full:
                            return builder.take()
                    remaining = deadline - anyio.current_time()
                    if remaining <= 0:
                        return builder.take()
                    with anyio.move_on_after(remaining):
                        await queue.wait(builder.max_events - builder.count, builder.max_bytes - builder.bytes)
            finally:
                self.collected = 0


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
        self._sticky: dict[str, int] = {}
        self._collecting: set[anyio.CancelScope] = set()
        self.delivering = 0
        """Batches being delivered (run, retried, acknowledged) now."""
        self._delivered: anyio.Event | None = None
        """Set as a batch's delivery ends, while ``emptied`` waits."""
        metrics.buffered.labels(trigger).set_function(lambda: self.depth)

    @property
    def depth(self) -> int:
        return sum(lane.depth for lane in self.lanes)

    def _routed(self, run: Run) -> list[tuple[Lane, Run]]:
        """The lanes ``run`` goes to: by partition, or split by key (each key's events in order), or the one lane."""
        lanes = self.lanes
        if len(lanes) == 1:
            return [(lanes[0], run)]
        if self.config.ordering == "partition" or run.subjects is None:
            return [(self._partition_lane(run.partition), run)]
        by_lane: defaultdict[int, list[int]] = defaultdict(list)
        for index, subject in enumerate(run.subjects):
            by_lane[self._lane_index(subject)].append(index)
        if len(by_lane) == 1:
            return [(lanes[next(iter(by_lane))], run)]
        return [(lanes[lane], run.select(indexes)) for lane, indexes in by_lane.items()]

    def _lane_index(self, key: str | None) -> int:
        if key is None:
            self._round_robin += 1
            return self._round_robin % len(self.lanes)
        return zlib.crc32(key.encode()) % len(self.lanes)

    def _partition_lane(self, partition: str | None) -> Lane:
        """A partition's lane: the next lane in turn when first seen (so 4 partitions over 4 lanes never
        share one), then always the same; past ``STICKY_PARTITIONS`` distinct partitions, by hash."""
        index = self._sticky.get(partition) if partition is not None else None
        if index is None:
            if partition is not None and len(self._sticky) < STICKY_PARTITIONS:
                index = self._sticky[partition] = len(self._sticky) % len(self.lanes)
            else:
                index = self._lane_index(partition)
        return self.lanes[index]

    async def emit(self, event: Event, ack: Ack | None = None) -> None:
        """Filter ``event`` and put it in its lane, waiting while the lane is full (the backpressure)."""
        await self.emit_run(Run.single(event, ack))

    async def offer(self, event: Event, ack: Ack | None = None) -> bool:
        """``emit`` without waiting: False (and nothing taken) when the event's lane is full."""
        return await self.offer_run(Run.single(event, ack))

    async def emit_run(self, run: Run) -> None:
        """Filter ``run`` and put it in its lanes, waiting while one is full (the backpressure)."""
        self.metrics.received(self.trigger, len(run))
        kept = run if self.filter is None else await self._filter(run)
        if kept is None:
            return
        for lane, part in self._routed(kept):
            await lane.queue.put(part)

    async def offer_run(self, run: Run) -> bool:
        """``emit_run`` without waiting: False (and nothing taken) when a lane it may go to lacks room for it."""
        if len(self.lanes) == 1:
            lanes = self.lanes
        elif self.config.ordering == "partition" and run.partition is not None:
            lanes = [self._partition_lane(run.partition)]
        else:
            lanes = self.lanes  # split by key: every lane must have room for all of it
        if not all(lane.queue.has_room(run) for lane in lanes):
            return False
        await self.emit_run(run)
        return True

    async def _filter(self, run: Run) -> Run | None:
        """The events of ``run`` the trigger's filter keeps (None if none); the others are acknowledged as dropped."""
        if self.filter is None:
            return run
        keep: list[int] = []
        drop: list[int] = []
        for index, event in enumerate(run.events()):
            (keep if self.filter(event) else drop).append(index)
        if drop:
            dropped = run.select(drop)
            self.metrics.events_dropped.labels(self.trigger, "filtered").inc(len(dropped))
            try:
                await self.dispatcher.ack(dropped, Outcome("dropped"))
            except HandedBack:
                return None  # the daemon stops while the store fails: unacknowledged, they come again
        if not keep:
            return None
        return run if not drop else run.select(keep)

    async def run(self) -> None:
        """Cut batches and deliver them until ``drain`` is called; the caller's scope bounds the rest."""
        async with anyio.create_task_group() as tg:
            for lane in self.lanes:
                for _ in range(self.workers_per_lane):
                    tg.start_soon(self._work, lane)

    def close(self) -> None:
        """Release the lanes' streams (what is still in them is handed back, never acknowledged)."""
        for lane in self.lanes:
            lane.queue.close()

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
            self.delivering += 1
            try:
                await self.dispatcher.deliver(batch)
            finally:
                self.delivering -= 1
                if self._delivered is not None:
                    self._delivered.set()
                    self._delivered = None

    async def emptied(self) -> None:
        """Returns once the pipeline holds nothing: it can only come to hold nothing as a delivery ends (events taken
        from the buffer are being collected, and a collected batch is being delivered), unless it held nothing."""
        while self.holding:
            self._delivered = event = self._delivered or anyio.Event()
            await event.wait()

    @property
    def holding(self) -> int:
        """Events buffered or being collected into a batch, plus batches being delivered (0: it holds nothing)."""
        return self.depth + sum(lane.collected for lane in self.lanes) + self.delivering
