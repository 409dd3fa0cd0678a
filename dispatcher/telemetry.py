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
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from dispatcher.config import TelemetryConfig
from dispatcher.events import Run, traceparent
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
_SERVING: ContextVar[tuple[Any, bool] | None] = ContextVar("eventswarm_serving", default=None)
"""The server span of the webhook request being answered (and whether it continues its sender's trace)."""


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
            self.exporting = False
            """A batch taken from the queue is being exported."""
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
            """Wait until what is queued now has been exported (or dropped), within the timeout."""
            deadline = time.monotonic() + timeout_millis / 1000
            while (self.exporting or not self.spans.empty()) and time.monotonic() < deadline:
                time.sleep(0.01)  # (the exporting thread's progress: there is no event to wait on for a queue)
            return not self.exporting and self.spans.empty()

        # -- the exporting thread ---------------------------------------------------------------

        def _export_loop(self) -> None:
            from opentelemetry.sdk.trace.export import SpanExportResult

            while True:
                batch: list[ReadableSpan] = []
                deadline = time.monotonic() + self.interval
                while len(batch) < 512:
                    try:
                        batch.append(self.spans.get(timeout=max(0.0, deadline - time.monotonic())))
                        self.exporting = True
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
                    self.exporting = False
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

    def received(self, trigger: str, source: str, ids: Sequence[str], traces: Sequence[str | None] | None,
                 received: float) -> SpanContext | None:
        """Receive spans for events handed over together: one per event that came with its sender's
        ``traceparent`` (its child), remembered by event id for the link from the invocation that runs it, and one
        for the rest together (a batch receive, ``messaging.batch.message_count``, beginning a trace), as the
        messaging conventions have a batch received; its context is returned, for the run to carry
        (``Run.receipt``). An event handed over while a request to a webhook is served is received by that
        request's server span (``serving``), with no span of its own."""
        serving = _SERVING.get()
        if serving is not None:
            server, traced = serving
            context = server.get_span_context()
            for event_id in ids:
                self._remember(event_id, context, traced)
            server.set_attribute("messaging.message.id", ids[0])
            return None
        from opentelemetry.trace import SpanKind

        start = int(received * 1e9)
        system = "kafka" if source == "kafka" else "eventswarm"
        untraced = len(ids)
        if traces is not None:
            for event_id, trace in zip(ids, traces, strict=True):
                if trace:
                    untraced -= 1
                    span = self.tracer.start_span(
                        f"receive {trigger}", context=_parent(trace), kind=SpanKind.CONSUMER, start_time=start,
                        attributes={"messaging.operation.type": "receive", "messaging.message.id": event_id,
                                    "messaging.system": system, "eventswarm.trigger": trigger,
                                    "eventswarm.source": source})
                    span.end()
                    self._remember(event_id, span.get_span_context(), True)
        if not untraced:
            return None
        first = ids[0] if traces is None else next(i for i, t in zip(ids, traces, strict=True) if not t)
        attributes: dict[str, Any] = {"messaging.operation.type": "receive", "messaging.system": system,
                                      "eventswarm.trigger": trigger, "eventswarm.source": source}
        if untraced == 1:
            attributes["messaging.message.id"] = first
        else:
            attributes["messaging.batch.message_count"] = untraced
            attributes["eventswarm.first_event"] = first
        span = self.tracer.start_span(f"receive {trigger}", kind=SpanKind.CONSUMER, start_time=start,
                                      attributes=attributes)
        span.end()
        return span.get_span_context()

    def received_one(self, trigger: str, source: str, event_id: str, trace: str | None, received: float) -> None:
        """The receive span of one event handed over on its own, remembered by its id."""
        context = self.received(trigger, source, [event_id], [trace] if trace else None, received)
        if context is not None:
            self._remember(event_id, context, False)

    @contextlib.contextmanager
    def serving(self, trigger: str, method: str, route: str, headers: Mapping[str, str], scheme: str,
                host: str, port: int, peer: str | None) -> Iterator[Any]:
        """The server span of one request to a source's route (the HTTP server conventions: ``POST /hooks/x``), a
        child of the request's ``traceparent``; it is the receive span of the events the request hands over.
        Yields a setter for the response's status code (5xx sets the status ``ERROR``, as the conventions say)."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        trace = traceparent(headers.get("traceparent"))
        attributes: dict[str, Any] = {
            "http.request.method": method, "http.route": route, "url.path": route, "url.scheme": scheme,
            "server.address": host, "server.port": port, "eventswarm.trigger": trigger,
            "eventswarm.source": "webhook", "messaging.operation.type": "receive", "messaging.system": "eventswarm"}
        if peer:
            attributes["client.address"] = peer
        agent = headers.get("User-Agent")
        if agent:
            attributes["user_agent.original"] = agent
        span = self.tracer.start_span(f"{method} {route}", context=_parent(trace), kind=SpanKind.SERVER,
                                      attributes=attributes)
        token = _SERVING.set((span, bool(trace)))

        def answered(status: int) -> None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(status)))
        try:
            yield answered
        finally:
            _SERVING.reset(token)
            span.end()

    def _remember(self, event_id: str, context: SpanContext, traced: bool) -> None:
        received = self._received
        received[event_id] = (context, traced)
        if len(received) > LINKS_KEPT:
            received.popitem(last=False)

    def _links(self, runs: Sequence[Run]) -> tuple[list[Any], SpanContext | None]:
        """Links to the receive spans of the events of ``runs`` (each span once, ``MAX_LINKS`` at most), and the
        first one that continues a sender's trace."""
        from opentelemetry.trace import Link

        links: list[Any] = []
        seen: set[int] = set()
        parent = None

        def link(context: SpanContext) -> None:
            if context.span_id not in seen and len(links) < MAX_LINKS:
                seen.add(context.span_id)
                links.append(Link(context))

        remembered = self._received
        for run in runs:
            if run.receipt is not None:
                link(run.receipt)
                if run.traces is None:
                    continue
                ids: Sequence[str] = [event_id for event_id, trace in zip(run.ids, run.traces, strict=True) if trace]
            else:
                ids = run.ids
            for event_id in ids:
                found = remembered.get(event_id)
                if found is not None:
                    if parent is None and found[1]:
                        parent = found[0]
                    link(found[0])
        return links, parent

    @contextlib.contextmanager
    def invocation(self, trigger: str, source: str, function: str, invocation_id: str, attempt: int,
                   runs: Sequence[Run], count: int) -> Iterator[Span]:
        """The ``invoke`` span of one invocation, linked to its events' ``receive`` spans. It continues the trace of
        its first event that came with one (a child of that event's receive span): the sender's trace runs on
        through the daemon into the function; without one, it begins a trace."""
        from opentelemetry.trace import NonRecordingSpan, SpanKind, set_span_in_context

        links, parent = self._links(runs)
        with self.tracer.start_as_current_span(
                f"invoke {function}", kind=SpanKind.CONSUMER, links=links, end_on_exit=True,
                context=set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None,
                record_exception=False, set_status_on_exception=False,
                attributes={"faas.invocation_id": invocation_id, "faas.trigger": FAAS_TRIGGER.get(source, "other"),
                            "faas.name": function, "messaging.operation.type": "process",
                            "messaging.batch.message_count": count, "eventswarm.trigger": trigger,
                            "eventswarm.attempt": attempt}) as span:
            yield span

    def gave_up(self, trigger: str, run: Run, status: str, why: str | None, attempts: int,
                invocation_id: str) -> Span:
        """A ``dead letter`` (or ``drop``) span for events whose retries are used up, linked to their ``receive``
        spans, with status ``ERROR`` and the last attempt's reason."""
        from opentelemetry.trace import NonRecordingSpan, Status, StatusCode, set_span_in_context

        links, parent = self._links([run])
        span = self.tracer.start_span(
            f"{'dead letter' if status == 'dead-lettered' else 'drop'} {trigger}", links=links,
            context=set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None,
            attributes={"eventswarm.trigger": trigger, "eventswarm.outcome": status, "eventswarm.attempts": attempts,
                        "faas.invocation_id": invocation_id, "messaging.batch.message_count": len(run)})
        span.set_status(Status(StatusCode.ERROR, why or status))
        span.end()
        return span

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
