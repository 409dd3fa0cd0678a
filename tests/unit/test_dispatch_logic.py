"""Pure parts of delivery: backoff, the partial-failure line, argument templates, output capture."""

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.config import RetryConfig
from dispatcher.dispatch import Delivery, backoff, failed_ids, halves, input_document, render_args
from dispatcher.events import Event, Run
from dispatcher.executors import Capture


def test_backoff_doubles_from_initial_up_to_max_without_jitter():
    retry = RetryConfig(initial="1s", max="10s", jitter=False)
    assert [backoff(a, retry) for a in range(2, 8)] == [1, 2, 4, 8, 10, 10]


@given(st.integers(min_value=2, max_value=60), st.integers(min_value=0, max_value=2**32))
def test_jittered_backoff_stays_between_half_and_the_full_delay(attempt, seed):
    retry = RetryConfig(initial="100ms", max="30s", jitter=True)
    plain = RetryConfig(initial="100ms", max="30s", jitter=False)
    delay = backoff(attempt, retry, random.Random(seed))
    assert backoff(attempt, plain) / 2 <= delay <= backoff(attempt, plain)


def test_the_last_stdout_line_names_the_failed_events():
    stdout = b'working\n{"failed": ["b", "zzz"]}\n'
    assert failed_ids(stdout, lambda: {"a", "b", "c"}) == {"b"}


@pytest.mark.parametrize("stdout", [b"", b"done\n", b'{"failed": "b"}', b'{"failed": ["b"]}\nmore output\n', b"{not json"])
def test_without_a_failed_list_on_the_last_line_there_is_no_partial_failure(stdout):
    assert failed_ids(stdout, lambda: {"b"}) is None


def test_args_templates_fill_from_event_fields():
    event = Event(source="s", type="t", data={"voter_id": 17, "vote": "yes", "tags": ["a"]})
    assert render_args(["{data.voter_id}", "--vote={data.vote}", "{data.tags}", "plain"], event) == ["17", "--vote=yes", '["a"]', "plain"]
    with pytest.raises(KeyError):
        render_args(["{data.nope}"], event)


def test_the_input_document_is_json_with_the_events_as_cloudevents():
    events = [Event(source="s", type="t", data={"n": i}) for i in range(3)]
    doc = json.loads(input_document("votes", "record", "b1", 2, [Run.of(events[:1]), Run.of(events[1:])]))
    assert doc["trigger"] == "votes" and doc["function"] == "record" and doc["batch_id"] == "b1" and doc["attempt"] == 2
    assert [e["data"]["n"] for e in doc["events"]] == [0, 1, 2]
    assert all(e["specversion"] == "1.0" for e in doc["events"])


def test_capture_keeps_head_and_tail_within_its_limit():
    capture = Capture(100)
    for i in range(1000):
        capture.write(f"line {i}\n".encode())
    value = capture.getvalue()
    assert value.startswith(b"line 0\n") and value.endswith(b"line 999\n")
    assert b"bytes cut by eventswarm" in value
    assert len(value) < 100 + 64


def test_a_follower_reads_a_capture_from_where_it_was_and_is_told_what_the_cut_dropped():
    capture = Capture(100)
    capture.write(b"first\n")
    chunk, position = capture.since(0)
    assert (chunk, position) == (b"first\n", 6) and capture.since(position) == (b"", 6)
    capture.write(b"second\n")
    assert capture.since(position) == (b"second\n", 13)
    whole = b"".join(f"line {i}\n".encode() for i in range(100))
    capture.write(whole)
    chunk, end = capture.since(13)
    assert end == 13 + len(whole) and b"bytes cut by eventswarm" in chunk and chunk.endswith(b"line 99\n")
    assert capture.since(end - 8) == (b"line 99\n", end)  # within the tail: exact


def test_event_round_trips_through_cloudevents_json():
    event = Event(source="kafka://votes/0", type="eventswarm.kafka.record", data_base64=b"\xff\x00", subject="k",
                  extensions={"partition": 0, "offset": 7})
    back = Event.decode(event.encode())
    assert back.to_dict() == event.to_dict()
    assert back.data_base64 == b"\xff\x00"


@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=12))
def test_bisect_halves_cut_runs_into_equal_event_counts_in_order(sizes):
    deliveries = [Delivery(Run.of([Event(source="s", type="t") for _ in range(n)])) for n in sizes]
    first, second = halves(deliveries)
    total = sum(sizes)
    left, right = (sum(len(d.run) for d in side) for side in (first, second))
    assert left == total // 2 and right == total - total // 2
    assert [i for d in first + second for i in d.run.ids] == [i for d in deliveries for i in d.run.ids]
    assert all(len(d.run) for d in first + second)
