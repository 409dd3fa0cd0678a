"""W3C trace context: a traceparent sent with a webhook or a Kafka record reaches the function, as its
TRACEPARENT and as the event's CloudEvents distributed-tracing extension."""

from __future__ import annotations

from tests.integration import test_kafka, test_webhook
from tests.kafka import new_topic
from tests.support import free_port, post, store_of, wait_until

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SHOW = 'echo "env=$TRACEPARENT"; python3 -c "import json,sys; print(\'ext=\' + str(json.load(sys.stdin)' \
       '[\'events\'][0].get(\'traceparent\')))"'


def test_a_traceparent_sent_with_a_webhook_is_the_functions_traceparent(tmp_path, daemon_process):
    doc = test_webhook.config(tmp_path, executor="process", script=SHOW, port=free_port(), mode="sync")
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{daemon.port}/hooks/t"
    status, _, body = post(url, b'{"n": 1}', {"traceparent": TRACE, "tracestate": "vendor=1"})
    assert status == 200 and body.decode().split() == [f"env={TRACE}", f"ext={TRACE}"], body
    status, _, body = post(url, b'{"n": 2}', {"traceparent": "00-not-a-trace-01"})  # malformed: dropped
    assert status == 200 and body.decode().split() == ["env=", "ext=None"], body
    assert daemon.stop() == 0


def test_a_traceparent_header_on_a_kafka_record_is_the_functions_traceparent(tmp_path, kafka_broker, daemon_process):
    from confluent_kafka import Producer

    topic = new_topic(kafka_broker, 1)
    producer = Producer({"bootstrap.servers": kafka_broker})
    producer.produce(topic, value=b'{"n": 1}', headers=[("traceparent", TRACE.encode())])
    assert producer.flush(30) == 0
    doc = test_kafka.config(tmp_path, kafka_broker, topic, SHOW)
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    daemon = daemon_process(doc).start()
    record = wait_until(lambda: store_of(doc).invocations(status="succeeded"), timeout=60, what="the record")[0]
    assert store_of(doc).logs(record.id)[0].decode().split() == [f"env={TRACE}", f"ext={TRACE}"]
    assert daemon.stop() == 0
