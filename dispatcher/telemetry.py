"""Traces over OTLP (``[telemetry]``, or the standard ``OTEL_*`` variables): a ``receive`` span per event (a child of
the sender's ``traceparent``), an ``invoke`` span per invocation with links to its events' spans and children for its
phases, and the invocation's context as the function's ``TRACEPARENT``. Off by default; when off nothing here is
imported by the hot path (``Telemetry`` is None).

Spans leave through a queue of ``max_queue`` spans and one exporting thread: when the queue is full, or the
collector cannot be reached, spans are dropped and counted (``eventswarm_telemetry_spans_dropped_total``), with one
warning line a minute at most, so the pipeline never waits on telemetry and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from dispatcher.config import TelemetryConfig
from dispatcher.metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Span, SpanContext

log = logging.getLogger("eventswarm")

LINKS_KEPT = 100_000
"""Receive spans remembered for the invocations that will link to them (the oldest are forgotten first)."""
MAX_LINKS = 1000
"""Links on one invocation span at most (one per event; a batch larger than that links its first ones)."""
WARN_EVERY = 60.0
FAAS_TRIGGER = {"webhook": "http", "kafka": "pubsub", "file": "datasource", "ethereum": "pubsub", "schedule": "timer"}
"""The FaaS semantic conventions' ``faas.trigger`` of each source kind (``other`` for the rest)."""


def _queue(exporter: Any, metrics: Metrics, size: int, interval: float) -> Any:
    """A span processor that hands finished spans to one exporting thread through a bounded queue (the SDK's
    ``BatchSpanProcessor`` drops silently when full: this one counts)."""
    from opentelemetry.sdk.trace import SpanProcessor

    class _Queue(SpanProcessor):
        def __init__(self, exporter: Any, metrics: Metrics, size: int, interval: float) -> None:
            self.exporter = exporter
            self.metrics = metrics
            self.interval = interval
            self.spans: queue.Queue[ReadableSpan] = queue.Queue(maxsize=size)
            self.stopped = threading.Event()
            self._warned = 0.0
            self.thread = threading.Thread(target=self._export_loop, name="eventswarm-otlp", daemon=True)
            self.thread.start()

        # -- SpanProcessor ----------------------------------------------------------------------

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            pass

        def on_end(self, span: ReadableSpan) -> None:
            try:
                self.spans.put_nowait(span)
            except queue.Full:
                self._dropped("queue_full", 1, "the span queue is full (the collector is slow or away)")

        def shutdown(self) -> None:
            self.stopped.set()
            self.thread.join(timeout=self.interval + 15)
            self.exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

        # -- the exporting thread ---------------------------------------------------------------

        def _export_loop(self) -> None:
            from opentelemetry.sdk.trace.export import SpanExportResult

            while True:
                batch: list[ReadableSpan] = []
                deadline = time.monotonic() + self.interval
                while len(batch) < 512:
                    try:
                        batch.append(self.spans.get(timeout=max(0.0, deadline - time.monotonic())))
                    except queue.Empty:
                        break
                if batch:
                    try:
                        result = self.exporter.export(batch)
                    except Exception as exc:  # (an exporter's own failure: counted, never raised into the daemon)
                        result, why = None, str(exc)
                    else:
                        why = "the collector did not take them"
                    if result != SpanExportResult.SUCCESS:
                        self._dropped("export_failed", len(batch), why)
                if self.stopped.is_set() and self.spans.empty():
                    return

        def _dropped(self, reason: str, count: int, why: str) -> None:
            self.metrics.telemetry_dropped.labels(reason).inc(count)
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY:
                self._warned = now
                log.warning("telemetry: %d span%s dropped: %s (counted in eventswarm_telemetry_spans_dropped_total; "
                            "one line a minute at most)", count, "s"[:count - 1], why)

    return _Queue(exporter, metrics, size, interval)


class Telemetry:
    """The daemon's tracer while export is on."""

    def __init__(self, config: TelemetryConfig, metrics: Metrics) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider

        # The exporter logs each retry and failure itself: this module counts them and says so once a minute.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        name = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or "eventswarm"
        resource = Resource.create({"service.name": name})  # (and OTEL_RESOURCE_ATTRIBUTES)
        self.provider = TracerProvider(resource=resource, span_limits=SpanLimits(max_links=MAX_LINKS))
        self.url = config.traces_url()
        self.processor = _queue(OTLPSpanExporter(endpoint=self.url, timeout=config.export_timeout), metrics,
                                config.max_queue, config.export_interval)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("eventswarm")
        self._received: OrderedDict[str, tuple[SpanContext, bool]] = OrderedDict()
        """Each event's receive span, and whether it came with its sender's trace."""
        log.info("telemetry: traces go to %s over OTLP/HTTP (service.name %s)", self.url, name)

    def received(self, trigger: str, source: str, ids: Sequence[str], traces: Sequence[str | None],
                 received: float) -> None:
        """A ``receive`` span for each event (a child of its sender's ``traceparent``), remembered for the link from
        the invocation that runs it."""
        from opentelemetry.trace import SpanKind

        start = int(received * 1e9)
        for event_id, trace in zip(ids, traces, strict=False):
            span = self.tracer.start_span(
                f"receive {trigger}", context=_parent(trace), kind=SpanKind.CONSUMER, start_time=start,
                attributes={"messaging.operation.type": "receive", "messaging.message.id": event_id,
                            "messaging.system": "kafka" if source == "kafka" else "eventswarm",
                            "eventswarm.trigger": trigger, "eventswarm.source": source})
            span.end()
            self._received[event_id] = (span.get_span_context(), bool(trace))
            if len(self._received) > LINKS_KEPT:
                self._received.popitem(last=False)

    @contextlib.contextmanager
    def invocation(self, trigger: str, source: str, function: str, invocation_id: str, attempt: int,
                   ids: Sequence[str]) -> Iterator[Span]:
        """The ``invoke`` span of one invocation, linked to its events' ``receive`` spans. It continues the trace of
        its first event that came with one (a child of that event's receive span): the sender's trace runs on
        through the daemon into the function; without one, it begins a trace."""
        from opentelemetry.trace import Link, NonRecordingSpan, SpanKind, set_span_in_context

        received = [found for event_id in ids[:MAX_LINKS] if (found := self._received.get(event_id)) is not None]
        links = [Link(context) for context, _ in received]
        parent = next((context for context, traced in received if traced), None)
        with self.tracer.start_as_current_span(
                f"invoke {function}", kind=SpanKind.CONSUMER, links=links, end_on_exit=True,
                context=set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None,
                record_exception=False, set_status_on_exception=False,
                attributes={"faas.invocation_id": invocation_id, "faas.trigger": FAAS_TRIGGER.get(source, "other"),
                            "faas.name": function, "messaging.operation.type": "process",
                            "messaging.batch.message_count": len(ids), "eventswarm.trigger": trigger,
                            "eventswarm.attempt": attempt}) as span:
            yield span

    def gave_up(self, trigger: str, ids: Sequence[str], status: str, why: str | None, attempts: int,
                invocation_id: str) -> None:
        """A ``dead letter`` (or ``drop``) span for events whose retries are used up, linked to their ``receive``
        spans, with status ``ERROR`` and the last attempt's reason."""
        from opentelemetry.trace import Link, NonRecordingSpan, Status, StatusCode, set_span_in_context

        received = [found for event_id in ids[:MAX_LINKS] if (found := self._received.get(event_id)) is not None]
        parent = next((context for context, traced in received if traced), None)
        span = self.tracer.start_span(
            f"{'dead letter' if status == 'dead-lettered' else 'drop'} {trigger}",
            links=[Link(context) for context, _ in received],
            context=set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None,
            attributes={"eventswarm.trigger": trigger, "eventswarm.outcome": status, "eventswarm.attempts": attempts,
                        "faas.invocation_id": invocation_id, "messaging.batch.message_count": len(ids)})
        span.set_status(Status(StatusCode.ERROR, why or status))
        span.end()

    def ended(self, span: Span, ok: bool, error: str | None, exit_code: int | None) -> None:
        """The invocation's outcome on its span: the status (an error with why), the exit code."""
        from opentelemetry.trace import Status, StatusCode

        if not ok:
            span.set_status(Status(StatusCode.ERROR, error or "failed"))
        span.set_attribute("eventswarm.outcome", "succeeded" if ok else "failed")
        if exit_code is not None:
            span.set_attribute("process.exit.code", exit_code)

    def phases(self, phases: Sequence[tuple[str, float, float]]) -> None:
        """Child spans of the current invocation for phases already over: (name, start, end) on the wall clock
        (``Result.phases``: the executor's preparing, starting, running and collecting)."""
        for name, start, end in phases:
            self.tracer.start_span(name, start_time=int(start * 1e9)).end(end_time=int(end * 1e9))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A child span of the current invocation for one of its phases (``wait for a slot``, ``run``)."""
        with self.tracer.start_as_current_span(name):
            yield

    def shutdown(self) -> None:
        self.provider.shutdown()


def traceparent_of(span: Span) -> str:
    """``span``'s context as a W3C ``traceparent`` (the function's ``TRACEPARENT``)."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def ids_of(span: Span | None) -> dict[str, str]:
    """``trace_id`` and ``span_id`` for a log line, when there is a span."""
    if span is None:
        return {}
    context = span.get_span_context()
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def _parent(trace: str | None) -> Any:
    if not trace:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": trace})


def create(config: TelemetryConfig, metrics: Metrics) -> Telemetry | None:
    """The daemon's telemetry when export is on, else None."""
    return Telemetry(config, metrics) if config.active() else None
