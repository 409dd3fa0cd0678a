"""The pipeline through a running daemon: batching by count, bytes and wait; ordering; filters; exhaustion policies.

Functions run on the process executor here (``sh``); the docker executor keeps the same
contract (tests/integration/test_executor_contract.py) and has its own delivery tests.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import anyio
import pytest

from dispatcher.events import Event
from tests.support import base_config, running_daemon, store_of, wait_for

pytestmark = pytest.mark.anyio


def config(tmp_path, script: str = "cat >/dev/null", **trigger: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, executor="process")
    doc["functions"]["f"] = {"command": ["sh", "-c", script], "timeout": "20s"}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "ordering": "none", "max_in_flight": 2, **trigger}
    return doc


def recorder():
    """A list of outcome statuses and the ack callback that fills it."""
    outcomes: list[str] = []

    async def ack(outcome):
        outcomes.append(outcome.status)

    return outcomes, ack


def settled(doc, count: int):
    def check():
        records = store_of(doc).invocations(limit=10_000)
        done = [r for r in records if r.status == "succeeded"]
        return done if sum(r.batch_size for r in done) >= count else None
    return check


async def test_a_batch_is_cut_at_max_events(tmp_path):
    doc = config(tmp_path, batch={"max_events": 10, "max_wait": "30s"})
    async with running_daemon(doc) as daemon:
        for i in range(30):
            await daemon.triggers["t"].emit(Event(source="test", type="t", data={"n": i}))
        done = await wait_for(settled(doc, 30), timeout=20, what="three batches of ten")
    assert sorted(r.batch_size for r in done) == [10, 10, 10]


async def test_a_batch_is_cut_at_max_bytes(tmp_path):
    payload = "x" * 1000  # an encoded event is about 1,200 bytes: two fit in 3,500, three do not
    doc = config(tmp_path, batch={"max_events": 1000, "max_bytes": "3500B", "max_wait": "60s"})
    async with running_daemon(doc) as daemon:
        for i in range(9):
            await daemon.triggers["t"].emit(Event(source="test", type="t", data={"n": i, "p": payload}))
        # The ninth event waits for max_wait (a minute); the first eight go at once, in twos.
        done = await wait_for(settled(doc, 8), timeout=20, what="batches cut by size")
    assert [r.batch_size for r in done] == [2, 2, 2, 2]


async def test_a_partial_batch_goes_when_max_wait_has_passed(tmp_path):
    doc = config(tmp_path, batch={"max_events": 1000, "max_wait": "300ms"})
    async with running_daemon(doc) as daemon:
        for i in range(5):
            await daemon.triggers["t"].emit(Event(source="test", type="t", data={"n": i}))
        done = await wait_for(settled(doc, 5), timeout=10, what="the partial batch")
    assert [r.batch_size for r in done] == [5]


async def test_events_of_one_key_keep_their_order_and_never_overlap(tmp_path):
    log = tmp_path / "order.log"
    # Each batch appends "start <subjects...>" and "end", so overlapping batches of one key would show.
    script = (f"input=$(cat); keys=$(echo \"$input\" | grep -o '\"subject\":\"k[0-9]*\"' | tr '\\n' ' '); "
              f"nums=$(echo \"$input\" | grep -o '\"n\":[0-9]*' | tr '\\n' ' '); "
              f"echo \"$keys|$nums\" >> {log}; sleep 0.05")
    doc = config(tmp_path, script, ordering="key", max_in_flight=4, batch={"max_events": 5, "max_wait": "20ms"})
    async with running_daemon(doc) as daemon:
        for i in range(120):
            await daemon.triggers["t"].emit(Event(source="test", type="t", subject=f"k{i % 6}", data={"n": i}))
        await wait_for(settled(doc, 120), timeout=60, what="all batches")
    seen: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        keys, nums = line.split("|")
        for key, num in zip(keys.split(), nums.split(), strict=True):
            seen.setdefault(key.split(":")[1].strip('"'), []).append(int(num.split(":")[1]))
    assert set(seen) == {f"k{i}" for i in range(6)}
    for order in seen.values():
        assert order == sorted(order)
        assert len(order) == 20


async def test_filtered_events_are_acknowledged_without_running(tmp_path):
    doc = config(tmp_path, filter='type == "keep" and data.n > 2', batch={"max_events": 100, "max_wait": "50ms"})
    outcomes, ack = recorder()
    async with running_daemon(doc) as daemon:
        for i in range(6):
            await daemon.triggers["t"].emit(Event(source="test", type="keep" if i % 2 else "skip", data={"n": i}), ack)
        await wait_for(lambda: len(outcomes) == 6, timeout=10, what="six acks")
    assert outcomes.count("dropped") == 4 and outcomes.count("succeeded") == 2
    assert sum(r.batch_size for r in store_of(doc).invocations()) == 2


async def test_drop_on_exhausted_acknowledges_without_a_dead_letter(tmp_path):
    doc = config(tmp_path, "exit 3", on_exhausted="drop",
                 retry={"max_attempts": 2, "initial": "10ms", "jitter": False}, batch={"max_events": 1})
    outcomes, ack = recorder()
    async with running_daemon(doc) as daemon:
        await daemon.triggers["t"].emit(Event(source="test", type="t"), ack)
        await wait_for(lambda: outcomes, timeout=10, what="the drop")
    assert outcomes == ["dropped"]
    assert store_of(doc).dead_letters() == []
    assert [r.exit_code for r in store_of(doc).invocations()] == [3, 3]


async def test_stop_on_exhausted_stops_the_trigger_and_leaves_the_event_unacknowledged(tmp_path):
    doc = config(tmp_path, "exit 4", on_exhausted="stop",
                 retry={"max_attempts": 2, "initial": "10ms", "jitter": False}, batch={"max_events": 1})
    outcomes, ack = recorder()
    async with running_daemon(doc) as daemon:
        await daemon.triggers["t"].emit(Event(source="test", type="t"), ack)
        await wait_for(lambda: daemon.triggers["t"].stopped, timeout=10, what="the trigger to stop")
        status = await daemon._status()
    assert outcomes == []
    assert status["triggers"][0]["state"] == "stopped"
    assert "on_exhausted" in status["triggers"][0]["last_error"]


async def test_an_event_older_than_max_event_age_is_not_retried(tmp_path):
    doc = config(tmp_path, "exit 2", retry={"max_attempts": 5, "initial": "10ms", "max_event_age": "1m"},
                 batch={"max_events": 1})
    outcomes, ack = recorder()
    async with running_daemon(doc) as daemon:
        await daemon.triggers["t"].emit(Event(source="test", type="t", received=time.time() - 120), ack)
        await wait_for(lambda: outcomes, timeout=10, what="the dead letter")
    assert outcomes == ["dead-lettered"]
    assert len(store_of(doc).invocations()) == 1


async def test_recent_invocations_are_served_over_http(tmp_path):
    doc = config(tmp_path)
    async with running_daemon(doc) as daemon:
        await daemon.triggers["t"].emit(Event(source="test", type="t"))
        await wait_for(settled(doc, 1), timeout=10, what="the invocation")
        url = f"http://127.0.0.1:{daemon.http.port}/v1/invocations?trigger=t&limit=5"
        records = await anyio.to_thread.run_sync(lambda: json.loads(urllib.request.urlopen(url, timeout=10).read()))
    assert [r["status"] for r in records] == ["succeeded"]
