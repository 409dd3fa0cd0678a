"""Traces over OTLP through the real daemon (``eventswarm run``) to a real OTLP/HTTP receiver (oteltap): a webhook's
trace joins the sender's span, the daemon's receive and invoke spans (and its phases) and the function's own span;
a container's phases, cold and warm; a Kafka batch of 100 records links its 100 receive spans; a collector that is
away costs dropped spans, counted, and one line."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support import BUSYBOX, base_config, free_port, post, store_of, wait_for

pytestmark = pytest.mark.anyio

SENDER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SENDER_SPAN = "00f067aa0ba902b7"
FUNCTION = """\
import os, sys
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

sys.stdin.read()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=os.environ["COLLECTOR"])))
parent = TraceContextTextMapPropagator().extract({"traceparent": os.environ["TRACEPARENT"]})
with provider.get_tracer("function").start_as_current_span("resize the image", context=parent):
    pass
provider.shutdown()
print(os.environ["TRACEPARENT"])
"""


class Spans:
    """Every span the receiver got, kept as they come."""

    def __init__(self, receiver: Any) -> None:
        self.receiver = receiver
        self.all: list[Any] = []

    async def collect(self) -> None:
        async for span in self.receiver.stream_traces():
            self.all.append(span)

    def named(self, prefix: str) -> list[Any]:
        return [s for s in self.all if s.name.startswith(prefix)]


@contextlib.asynccontextmanager
async def collecting(port: int) -> AsyncIterator[Spans]:
    """A real OTLP/HTTP receiver on ``port``, and the spans it gets, for the time of the block."""
    from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

    receiver = OtelTapHttpProtobufReceiver(OtelTapHttpProtobufReceiverSettings(http_port=port))
    async with receiver, anyio.create_task_group() as tg:
        spans = Spans(receiver)
        tg.start_soon(spans.collect)
        yield spans
        tg.cancel_scope.cancel()


def telemetry_env(port: int) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_SERVICE_NAME": "eventswarm-test"}


def traced_function(tmp_path: Path, executor: str, function: dict[str, Any], port: int, **daemon: Any,
                    ) -> dict[str, Any]:
    """A webhook trigger running ``function``, which sends its own span to the collector on ``port``."""
    doc = base_config(tmp_path, executor=executor, port=free_port(), **daemon)
    doc["functions"]["f"] = {**function, "env": {"COLLECTOR": f"http://127.0.0.1:{port}/v1/traces"}}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "batch": {"max_events": 1, "max_wait": "10ms"}}
    return doc


async def start_and_send(daemon_process: Any, doc: dict[str, Any], port: int) -> tuple[Any, str]:
    """The daemon, exporting to the collector on ``port``, and the id of a webhook sent with the sender's trace."""
    daemon = daemon_process(doc, env=telemetry_env(port))
    await anyio.to_thread.run_sync(daemon.start)
    status, _, body = await anyio.to_thread.run_sync(lambda: post(
        f"http://127.0.0.1:{daemon.port}/hooks/t", b'{"n": 1}', {"traceparent": f"00-{SENDER_TRACE}-{SENDER_SPAN}-01"}))
    assert status == 202
    return daemon, json.loads(body)["id"]


async def test_a_webhooks_trace_joins_the_sender_the_daemon_and_the_function(tmp_path: Path, daemon_process: Any):
    port = free_port()
    script = tmp_path / "function.py"
    script.write_text(FUNCTION)
    doc = traced_function(tmp_path, "process", {"command": [sys.executable, str(script)]}, port, log_format="json")
    async with collecting(port) as spans:
        daemon, event_id = await start_and_send(daemon_process, doc, port)
        refused, _, _ = await anyio.to_thread.run_sync(lambda: post(
            f"http://127.0.0.1:{daemon.port}/hooks/t", b'{"n": ', {"Content-Type": "application/json"}))
        assert refused == 400
        await wait_for(lambda: spans.named("resize") and spans.named("invoke") and spans.named("run")
                       and len(spans.named("POST /hooks/t")) == 2, timeout=30,
                       what="the server, invoke, run and function spans")
        await anyio.to_thread.run_sync(daemon.stop)
    served = {{a.key: a.value for a in span.attributes}["http.response.status_code"].int_value: span
              for span in spans.named("POST /hooks/t")}
    receive, bad = served[202], served[400]
    (invoke,), (run,), (function,) = (spans.named(n) for n in ("invoke", "run", "resize"))
    # The request's server span (HTTP server conventions) is the event's receive span; a bad request has one too,
    # not an error (a 4xx is the client's), in a trace of its own.
    assert receive.kind == bad.kind == 2  # SPAN_KIND_SERVER
    http = {a.key: a.value for a in receive.attributes}
    assert (http["http.request.method"].string_value, http["http.route"].string_value, http["url.scheme"].string_value,
            http["server.port"].int_value, http["client.address"].string_value) == \
        ("POST", "/hooks/t", "http", daemon.port, "127.0.0.1")
    assert bad.status.code == 0 and bad.trace_id.hex() != SENDER_TRACE
    # One trace: the sender's (its span the parent of receive), the daemon's spans and the function's own.
    assert {s.trace_id.hex() for s in (receive, invoke, run, function)} == {SENDER_TRACE}
    assert receive.parent_span_id.hex() == SENDER_SPAN
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in invoke.links] == \
        [(SENDER_TRACE, receive.span_id.hex())]  # the batch links its event; a link, not a parent
    assert run.parent_span_id == invoke.span_id and function.parent_span_id == invoke.span_id
    phases = [s.name for s in sorted(spans.all, key=lambda s: s.start_time_unix_nano)
              if s.parent_span_id == invoke.span_id and s is not function]
    assert phases == ["wait in the buffer", "wait for a slot", "prepare input", "run"], phases
    attributes = {a.key: a.value for a in invoke.attributes}
    assert attributes["faas.trigger"].string_value == "http" and attributes["faas.name"].string_value == "f"
    receive_attributes = {a.key: a.value.string_value for a in receive.attributes}
    assert receive_attributes["messaging.message.id"] == event_id
    # The function got the invocation's context as its TRACEPARENT.
    record = store_of(doc).invocations(limit=10)[0]
    assert store_of(doc).logs(record.id)[0].decode().strip() == record.trace == \
        f"00-{SENDER_TRACE}-{invoke.span_id.hex()}-01"  # (the record keeps it: `invocations show` has it)
    assert attributes["faas.invocation_id"].string_value == record.id


@pytest.fixture(scope="module")
def otel_function_image(daemon_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A function image whose Python has the OpenTelemetry SDK: the daemon's image (which carries it) with the
    test's function as its entry point (built offline: there is no registry to pull a Python image from)."""
    import subprocess

    context = tmp_path_factory.mktemp("otel-function")
    (context / "function.py").write_text(FUNCTION)
    (context / "Dockerfile").write_text(f'FROM {daemon_image}\nCOPY function.py /function.py\n'
                                        'ENTRYPOINT ["python3", "/function.py"]\nCMD []\n')
    built = subprocess.run(["docker", "build", "-q", "-t", "eventswarm/otel-function:test", str(context)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    return "eventswarm/otel-function:test"


async def test_a_function_in_an_image_with_the_sdk_continues_the_trace(tmp_path: Path, daemon_process: Any,
                                                                      otel_function_image: str):
    """The function's container (an image with the OpenTelemetry SDK, on the host network to reach the collector)
    starts its own span from TRACEPARENT: a child of the daemon's invoke span, in the sender's trace."""
    port = free_port()
    doc = traced_function(tmp_path, "docker", {"image": otel_function_image}, port)
    doc["executor"]["network"] = "host"
    async with collecting(port) as spans:
        daemon, _ = await start_and_send(daemon_process, doc, port)
        await wait_for(lambda: spans.named("resize") and spans.named("invoke"), timeout=60,
                       what="the invoke span and the function's own")
        await anyio.to_thread.run_sync(daemon.stop)
    (invoke,), (function,) = spans.named("invoke"), spans.named("resize")
    assert function.trace_id.hex() == invoke.trace_id.hex() == SENDER_TRACE
    assert function.parent_span_id == invoke.span_id
    record = store_of(doc).invocations(limit=1)[0]
    assert record.status == "succeeded" and record.trace == f"00-{SENDER_TRACE}-{invoke.span_id.hex()}-01"


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_containers_phases_are_spans_of_the_invocation(tmp_path: Path, daemon_process: Any, docker_engine: Any,
                                                               warm: bool):
    port = free_port()
    doc = base_config(tmp_path, executor="docker", port=free_port())
    doc["functions"]["f"] = {"image": BUSYBOX, "command": ["cat"], **({"warm": {"min_idle": 1}} if warm else {})}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "batch": {"max_events": 1, "max_wait": "10ms"}}
    async with collecting(port) as spans:
        daemon = daemon_process(doc, env=telemetry_env(port))
        await anyio.to_thread.run_sync(daemon.start)
        await anyio.to_thread.run_sync(lambda: post(f"http://127.0.0.1:{daemon.port}/hooks/t", b"{}"))
        await wait_for(lambda: spans.named("invoke") and spans.named("run"), timeout=60, what="the invocation's spans")
        await anyio.to_thread.run_sync(daemon.stop)
    (invoke,) = spans.named("invoke")
    phases = [s.name for s in sorted(spans.all, key=lambda s: s.start_time_unix_nano)
              if s.parent_span_id == invoke.span_id]
    expected = ["take a warm container", "run"] if warm else ["prepare input", "start container", "run",
                                                             "collect output"]
    assert phases == ["wait in the buffer", "wait for a slot", *expected], phases
    for span in spans.all:
        if span.parent_span_id == invoke.span_id:
            assert invoke.start_time_unix_nano <= span.end_time_unix_nano <= invoke.end_time_unix_nano


async def test_a_failed_invocations_log_line_carries_its_trace(tmp_path: Path, daemon_process: Any):
    port = free_port()
    doc = base_config(tmp_path, executor="process", port=free_port(), log_format="json")
    doc["functions"]["f"] = {"command": ["sh", "-c", "cat >/dev/null; exit 3"]}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "batch": {"max_events": 1, "max_wait": "10ms"}, "retry": {"max_attempts": 1}}
    async with collecting(port) as spans:
        daemon = daemon_process(doc, env=telemetry_env(port))
        await anyio.to_thread.run_sync(daemon.start)
        await anyio.to_thread.run_sync(lambda: post(f"http://127.0.0.1:{daemon.port}/hooks/t", b"{}"))
        await wait_for(lambda: spans.named("invoke") and spans.named("dead letter"), timeout=30,
                       what="the invoke and dead letter spans")
        await anyio.to_thread.run_sync(daemon.stop)
    (invoke,) = spans.named("invoke")
    assert invoke.status.code == 2 and "exit code 3" in invoke.status.message  # ERROR, with why
    (letter,) = spans.named("dead letter")  # retries used up: a span of its own, linked to the event
    (receive,) = spans.named("POST /hooks/t")
    assert [link.span_id for link in letter.links] == [receive.span_id] and letter.status.code == 2
    lines = [json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{")]
    failed = [line for line in lines if "invocation failed" in line.get("message", "")]
    assert failed and failed[0]["trace_id"] == invoke.trace_id.hex() and failed[0]["span_id"] == invoke.span_id.hex()
    stored = [line for line in lines if "stored as dead letters" in line.get("message", "")]
    assert stored and (stored[0]["trace_id"], stored[0]["span_id"]) == (letter.trace_id.hex(), letter.span_id.hex())


async def test_a_kafka_batch_of_100_records_links_its_100_receive_spans(tmp_path: Path, daemon_process: Any,
                                                                       kafka_broker: str):
    """100 records with their senders' traceparents: a receive span each, one invocation linking the 100. Beside
    it, 2,000 records without one: received together, a span per fetch rather than per record."""
    from confluent_kafka import Producer

    from tests.kafka import new_topic

    port = free_port()
    topic, plain = new_topic(kafka_broker, 1, prefix="otel"), new_topic(kafka_broker, 1, prefix="otel-plain")
    senders = [f"00-{n:032x}-{n:016x}-01" for n in range(1, 101)]
    producer = Producer({"bootstrap.servers": kafka_broker, "linger.ms": 50})
    for n, trace in enumerate(senders):
        producer.produce(topic, json.dumps({"n": n}).encode(), partition=0, headers=[("traceparent", trace.encode())])
    for n in range(2000):
        producer.produce(plain, json.dumps({"n": n}).encode(), partition=0)
    assert producer.flush(30) == 0
    doc = base_config(tmp_path, executor="process", port=free_port())
    doc["functions"]["f"] = {"command": ["sh", "-c", "cat >/dev/null"]}
    for name, read in (("t", topic), ("plain", plain)):
        doc["triggers"][name] = {"function": "f", "source": {"kind": "kafka", "bootstrap_servers": [kafka_broker],
                                                             "topics": [read], "group_id": f"g-{read}",
                                                             "start": "earliest"},
                                 "batch": {"max_events": 100 if name == "t" else 500, "max_wait": "2s"}}

    def counted(span: Any) -> int:
        found = {a.key: a.value.int_value for a in span.attributes}.get("messaging.batch.message_count")
        return found if found is not None else 1

    async with collecting(port) as spans:
        daemon = daemon_process(doc, env=telemetry_env(port))
        await anyio.to_thread.run_sync(daemon.start)
        await wait_for(lambda: spans.named("invoke f") and len(spans.named("receive t")) >= 100
                       and sum(map(counted, spans.named("invoke f"))) >= 2100, timeout=60,
                       what="100 receive spans and the invocations of all 2,100 records")
        await anyio.to_thread.run_sync(daemon.stop)
    (invoke,) = [s for s in spans.named("invoke f") if s.trace_id.hex() in {t[3:35] for t in senders}]
    receives = spans.named("receive t")
    assert sorted(r.parent_span_id.hex() for r in receives) == sorted(t[36:52] for t in senders)
    assert len(invoke.links) == 100
    assert {link.span_id for link in invoke.links} == {r.span_id for r in receives}
    assert {a.key: a.value.string_value for a in receives[0].attributes}["messaging.system"] == "kafka"
    # The records without a traceparent: a batch receive span per fetch (each the root of a trace), every record
    # counted once, each invocation linking the spans its records came in.
    together = spans.named("receive plain")
    assert sum(map(counted, together)) == 2000 and len(together) <= 2000 // 100, len(together)
    assert all(not span.parent_span_id for span in together)
    runs = [s for s in spans.named("invoke f") if s not in (invoke,)]
    assert {link.span_id for s in runs for link in s.links} == {span.span_id for span in together}


async def test_a_collector_that_is_away_costs_dropped_spans_counted_and_one_line(tmp_path: Path, daemon_process: Any):
    doc = base_config(tmp_path, executor="process", port=free_port())
    doc["telemetry"] = {"enabled": True, "endpoint": f"http://127.0.0.1:{free_port()}/v1/traces", "max_queue": 50,
                        "export_timeout": "1s", "export_interval": "200ms"}
    doc["functions"]["f"] = {"command": ["sh", "-c", "cat >/dev/null"]}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "batch": {"max_events": 10, "max_wait": "20ms"}}
    daemon = daemon_process(doc)
    await anyio.to_thread.run_sync(daemon.start)

    def send() -> None:
        for n in range(300):
            assert post(f"http://127.0.0.1:{daemon.port}/hooks/t", json.dumps({"n": n}).encode())[0] == 202

    await anyio.to_thread.run_sync(send)
    await wait_for(lambda: sum(r.batch_size for r in store_of(doc).invocations(limit=1000)
                               if r.status == "succeeded") == 300, timeout=60, what="every event run")

    def dropped() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(float(v) for v in re.findall(r"eventswarm_telemetry_spans_dropped_total\{[^}]*\} (\S+)", text))

    await wait_for(lambda: dropped() >= 300, timeout=30, what=f"the spans counted as dropped ({dropped()} so far)")
    await anyio.to_thread.run_sync(daemon.stop)
    warnings = [line for line in daemon.log.read_text().splitlines() if "telemetry:" in line and "dropped" in line]
    assert len(warnings) == 1, warnings  # one line a minute at most
