"""Prometheus metrics, one registry per daemon: every series is listed, with what to alert on, in docs/metrics.md."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: a timestamp per counter nobody alerts on


def _version() -> str:
    try:
        return version("eventswarm")
    except PackageNotFoundError:
        return "unknown"


class Counts:
    """A trigger's counts as plain numbers beside their series (for ``/v1/status``; prometheus_client keeps a
    series' value private)."""

    __slots__ = ("acked", "in_flight", "received")

    def __init__(self) -> None:
        self.received = 0
        self.acked = 0
        self.in_flight = 0


class PoolCollector(Collector):
    """The warm pools' series, read from the executor when scraped: size, idle, starts and replacements."""

    def __init__(self) -> None:
        self.source: Callable[[], list[dict[str, Any]]] = list

    def collect(self) -> Iterator[Metric]:
        pools = self.source()
        size = GaugeMetricFamily("eventswarm_warm_pool_size", "Warm containers of a function's pool, busy, idle and "
                                 "starting.", labels=["function"])
        idle = GaugeMetricFamily("eventswarm_warm_pool_idle", "Warm containers waiting for a batch.", labels=["function"])
        starts = CounterMetricFamily("eventswarm_warm_starts", "Warm containers started.", labels=["function"])
        replaced = CounterMetricFamily("eventswarm_warm_replacements", "Warm containers removed, by why: timeout, oom, protocol, "
                                       "runner_ended, max_batches, idle_ttl, image, failed, interrupted, retired.",
                                       labels=["function", "reason"])
        for pool in pools:
            size.add_metric([pool["function"]], pool["size"])
            idle.add_metric([pool["function"]], pool["idle"])
            starts.add_metric([pool["function"]], pool["starts"])
            for reason, count in pool["replacements"].items():
                replaced.add_metric([pool["function"], reason], count)
        yield from (size, idle, starts, replaced)

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    def __init__(self) -> None:
        self.counts: dict[str, Counts] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.pools = PoolCollector()
        r.register(self.pools)
        self.events_received = Counter("eventswarm_events_received", "Events a source handed to a trigger.", ["trigger"], registry=r)
        self.events_acked = Counter("eventswarm_events_acked", "Events acknowledged to their source.", ["trigger"], registry=r)
        self.telemetry_dropped = Counter("eventswarm_telemetry_spans_dropped", "Trace spans not exported, by why: "
                                         "queue_full, export_failed.", ["reason"], registry=r)
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
        self.source_lag = Gauge("eventswarm_source_lag", "How far behind the source is, in its unit (the unit label): "
                                "records (Kafka), blocks (Ethereum), files or bytes (file).", ["trigger", "unit"], registry=r)
        self.webhook_responses = Counter("eventswarm_webhook_responses", "Webhook requests answered, by status code.",
                                         ["trigger", "code"], registry=r)
        self.event_latency = Histogram("eventswarm_event_latency_seconds", "From events received to settled "
                                       "(acknowledged or dead-lettered), one observation per run of events handed over "
                                       "together (a webhook request, a Kafka fetch's records of a partition, a block range's logs).",
                                       ["trigger"], registry=r, buckets=LATENCY_BUCKETS)
        self.records_bytes = Gauge("eventswarm_records_bytes", "Bytes the invocation records and their logs are counted "
                                   "for in the state store (what max_records_size bounds; docs/capacity.md).", registry=r)
        self.records_budget = Gauge("eventswarm_records_budget_bytes", "max_records_size (0: no size bound).", registry=r)
        self.records_oldest = Gauge("eventswarm_records_oldest_timestamp_seconds", "When the oldest invocation record "
                                    "kept was queued (Unix time; 0 with none).", registry=r)
        self.records_pruned = Counter("eventswarm_records_pruned", "Invocation records deleted, by reason: age "
                                      "(keep_invocations) or size (max_records_size).", ["reason"], registry=r)
        self.dead_letters_kept = Gauge("eventswarm_dead_letters_kept", "Dead letters in the state store now (never "
                                       "pruned: replay or purge them).", registry=r)
        self.build_info = Gauge("eventswarm_build_info", "Always 1: the daemon's version and Python's.", ["version", "python"],
                                registry=r)
        self.build_info.labels(_version(), platform.python_version()).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def counted(self, trigger: str) -> Counts:
        """``trigger``'s plain counts (kept by whoever moves its ``events_received``, ``events_acked`` and
        ``in_flight`` series)."""
        return self.counts.setdefault(trigger, Counts())

    def received(self, trigger: str, count: int = 1) -> None:
        self.events_received.labels(trigger).inc(count)
        self.counted(trigger).received += count

    def acked(self, trigger: str, count: int = 1) -> None:
        self.events_acked.labels(trigger).inc(count)
        self.counted(trigger).acked += count

    def running(self, trigger: str, change: int) -> None:
        """``change`` invocations of ``trigger`` began (1) or ended (-1)."""
        self.in_flight.labels(trigger).inc(change)
        self.counted(trigger).in_flight += change

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics and their content type: OpenMetrics when ``accept`` (the scraper's Accept header) asks for it,
        else Prometheus text."""
        if "application/openmetrics-text" in accept:
            return generate_openmetrics(self.registry), OPENMETRICS_TYPE  # type: ignore[no-untyped-call]
        return generate_latest(self.registry), CONTENT_TYPE
