"""Prometheus metrics (SPEC §6), one registry per daemon."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_received = Counter("eventswarm_events_received", "Events a source handed to a trigger.", ["trigger"], registry=r)
        self.events_acked = Counter("eventswarm_events_acked", "Events acknowledged to their source.", ["trigger"], registry=r)
        self.events_dropped = Counter("eventswarm_events_dropped", "Events dropped, by reason.", ["trigger", "reason"], registry=r)
        self.batches = Counter("eventswarm_batches", "Invocations (batches) by how they ended.", ["trigger", "status"], registry=r)
        self.batch_size = Histogram("eventswarm_batch_size", "Events per batch.", ["trigger"], registry=r,
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000))
        self.invocation_seconds = Histogram("eventswarm_invocation_seconds", "Time an invocation ran.", ["trigger"], registry=r,
                                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.in_flight = Gauge("eventswarm_in_flight", "Invocations running now.", ["trigger"], registry=r)
        self.buffered = Gauge("eventswarm_buffered_events", "Events waiting in the trigger's buffer.", ["trigger"], registry=r)
        self.dead_letters = Counter("eventswarm_dead_letters", "Events stored as dead letters.", ["trigger"], registry=r)
        self.source_paused = Gauge("eventswarm_source_paused", "1 while the source stopped reading: the buffer is full, or (Kafka) a partition reached max_uncommitted.",
                                   ["trigger"], registry=r)
        self.source_errors = Counter("eventswarm_source_errors", "Times a source failed (it restarts; last_error in status says why).",
                                     ["trigger"], registry=r)
        self.source_lag = Gauge("eventswarm_source_lag", "How far behind the source is (offsets, blocks, files).", ["trigger"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
