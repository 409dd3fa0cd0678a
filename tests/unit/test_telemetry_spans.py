"""The tracer's own logic, with the SDK and an exporter that records what it is given: which receive spans are made
for events handed over together, the links an invocation gets, and the bounded span queue (drops counted, a flush
that waits for what is queued)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dispatcher.config import TelemetryConfig
from dispatcher.events import Event, Run
from dispatcher.metrics import Metrics
from dispatcher.telemetry import Telemetry, _queue


class Exporter:
    """Takes every batch (after ``gate`` opens, when there is one) and keeps its spans."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.spans: list[Any] = []
        self.gate = gate

    def export(self, batch: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        if self.gate is not None:
            self.gate.wait(10)
        self.spans.extend(batch)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


@pytest.fixture
def traced() -> tuple[Telemetry, Exporter]:
    telemetry = Telemetry(TelemetryConfig(enabled=True, endpoint="http://127.0.0.1:9/v1/traces",
                                          export_interval=0.01), Metrics())
    exporter = Exporter()
    telemetry.processor.exporter = exporter
    yield telemetry, exporter
    telemetry.shutdown()


def dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("eventswarm_telemetry_spans_dropped_total", {"reason": reason}) or 0.0


def test_events_without_a_trace_share_one_receive_span_and_traced_ones_get_their_own(traced: Any) -> None:
    telemetry, exporter = traced
    sender = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ids = [f"t/0/{n}" for n in range(1000)]
    first, second = Run([b"{}"] * 1000, ids, [None] * 1000), Run([b"{}"] * 2, ["u/0/0", "u/0/1"], [None] * 2)
    first.traces = [sender if n == 500 else None for n in range(1000)]
    for run in (first, second):
        run.receipt = telemetry.received("t", "kafka", run.ids, run.traces, 1.0)
    telemetry.received_one("t", "webhook", "w", None, 2.0)  # an event handed over on its own: remembered by id
    runs = [first.slice(0, 600), first.slice(600), second, Run.of([Event(id="w", source="s", type="t")])]
    with telemetry.invocation("t", "kafka", "f", "inv", 1, runs, 1003) as span:
        pass
    assert telemetry.processor.force_flush(5000)
    receives = [s for s in exporter.spans if s.name == "receive t"]
    counts = sorted(s.attributes.get("messaging.batch.message_count", 1) for s in receives)
    assert counts == [1, 1, 2, 999]  # the traced one alone, the rest of its run together, the second run, the one
    (own,) = [s for s in receives if s.parent is not None]  # (the slices of a run link its receive span once)
    assert own.parent.span_id == 0xb7ad6b7169203331 and own.attributes["messaging.message.id"] == "t/0/500"
    (invoke,) = [s for s in exporter.spans if s.name == "invoke f"]
    assert sorted(link.context.span_id for link in invoke.links) == sorted(s.context.span_id for s in receives)
    assert invoke.parent.span_id == own.context.span_id  # the sender's trace goes on through its event
    assert span.get_span_context().trace_id == 0x0af7651916cd43dd8448eb211c80319c


def test_a_full_queue_drops_and_counts_and_a_flush_waits_for_what_is_queued() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    metrics, gate = Metrics(), threading.Event()
    exporter = Exporter(gate)
    processor = _queue(exporter, metrics, 10, 0.01)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    for n in range(30):
        tracer.start_span(f"s{n}").end()
    # The exporting thread holds a batch (up to the 10 it took) while the gate is shut: what came after is dropped.
    assert dropped(metrics, "queue_full") >= 10
    assert not processor.force_flush(50)  # a batch is still going out
    gate.set()
    assert processor.force_flush(5000)
    assert len(exporter.spans) + dropped(metrics, "queue_full") == 30
    provider.shutdown()
