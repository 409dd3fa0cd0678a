"""Delivery through real containers: bisect isolates poison, timeouts retry, partial failures, cleanup and gc."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import docker
import pytest

from dispatcher.daemon import owner_id
from dispatcher.events import Event
from dispatcher.executors.base import LABEL_MANAGED, LABEL_OWNER
from tests.support import BUSYBOX, base_config, running_daemon, store_of, toml, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def engine(docker_engine):
    return docker_engine


def config(tmp_path, script: str, **trigger: Any) -> dict[str, Any]:
    doc = base_config(tmp_path)
    doc["functions"]["f"] = {"image": BUSYBOX, "command": ["sh", "-c", script], "timeout": "30s"}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "ordering": "none", "max_in_flight": 4,
                            "retry": {"max_attempts": 3, "initial": "50ms", "max": "200ms"}, **trigger}
    return doc


def leftovers(doc) -> list[Any]:
    client = docker.from_env()
    try:
        owner = owner_id(doc["daemon"]["state"].removeprefix("sqlite:///"))
        return client.containers.list(all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]})
    finally:
        client.close()


async def test_one_poison_event_in_a_batch_of_64_ends_as_exactly_one_dead_letter(tmp_path):
    doc = config(tmp_path, "if grep -q poison; then echo poisoned >&2; exit 1; fi",
                 batch={"max_events": 64, "max_wait": "5s"})
    acks: dict[str, str] = {}

    def ack_for(event_id):
        async def ack(outcome):
            acks[event_id] = outcome.status
        return ack

    events = [Event(source="test", type="t", data={"n": i, **({"poison": True} if i == 41 else {})}) for i in range(64)]
    async with running_daemon(doc) as daemon:
        for event in events:
            await daemon.triggers["t"].emit(event, ack_for(event.id))
        await wait_for(lambda: len(acks) == 64, timeout=120, what="all 64 events settled")
    store = store_of(doc)
    letters = store.dead_letters()
    assert len(letters) == 1
    assert letters[0].event["id"] == events[41].id and letters[0].event["data"]["poison"] is True
    assert len(letters[0].attempts) >= 3 and all(a["exit_code"] == 1 for a in letters[0].attempts)
    assert "poisoned" in letters[0].attempts[-1]["stderr_tail"]
    succeeded = {i for r in store.invocations(status="succeeded", limit=1000) for i in r.event_ids}
    assert succeeded == {e.id for i, e in enumerate(events) if i != 41}
    assert acks[events[41].id] == "dead-lettered" and list(acks.values()).count("succeeded") == 63
    assert store.invocations(limit=1000)[-1].batch_size == 64  # the first try ran the whole batch
    assert leftovers(doc) == []


async def test_a_function_past_its_timeout_is_killed_and_retried(tmp_path):
    doc = config(tmp_path, "trap 'exit 143' TERM; sleep 60 & wait", batch={"max_events": 1},
                 retry={"max_attempts": 2, "initial": "50ms"})
    doc["functions"]["f"]["timeout"] = "1s"
    async with running_daemon(doc) as daemon:
        await daemon.triggers["t"].emit(Event(source="test", type="t"))
        await wait_for(lambda: store_of(doc).dead_letters(), timeout=60, what="the dead letter")
    records = store_of(doc).invocations()
    assert [r.status for r in records] == ["timed_out", "timed_out"]
    assert sorted(r.attempt for r in records) == [1, 2]
    assert all(r.finished_at - r.started_at < 10 for r in records)
    assert leftovers(doc) == []


async def test_the_partial_failure_line_retries_only_the_named_events(tmp_path):
    # Fails the events whose id starts with "bad" on the first attempt only.
    script = ('input=$(cat); if [ "$EVENTSWARM_ATTEMPT" = 1 ]; then '
              'ids=$(echo "$input" | grep -o \'"id":"bad[^"]*"\' | sed \'s/"id"://\' | tr "\\n" "," | sed "s/,$//"); '
              'echo "processing"; echo "{\\"failed\\": [$ids]}"; fi')
    doc = config(tmp_path, script, batch={"max_events": 10, "max_wait": "5s"})
    events = [Event(id=("bad" if i in (2, 7) else "ok") + f"-{i}", source="test", type="t") for i in range(10)]
    async with running_daemon(doc) as daemon:
        for event in events:
            await daemon.triggers["t"].emit(event)
        await wait_for(lambda: len(store_of(doc).invocations(status="succeeded")) == 2, timeout=60, what="the retry")
    first, second = sorted(store_of(doc).invocations(), key=lambda r: r.attempt)
    assert first.batch_size == 10 and first.attempt == 1
    assert second.attempt == 2 and sorted(second.event_ids) == ["bad-2", "bad-7"]
    assert store_of(doc).dead_letters() == []


def test_gc_removes_labelled_leftovers_of_this_daemon_only(tmp_path):
    doc = config(tmp_path, "true")
    config_file = tmp_path / "eventswarm.toml"
    config_file.write_text(toml(doc))
    owner = owner_id(str(tmp_path / "state.db"))
    client = docker.from_env()
    mine = client.containers.create(BUSYBOX, ["sleep", "60"], network_mode="none",
                                    labels={LABEL_MANAGED: "true", LABEL_OWNER: owner})
    other = client.containers.create(BUSYBOX, ["sleep", "60"], network_mode="none",
                                     labels={LABEL_MANAGED: "true", LABEL_OWNER: "someone-else"})
    try:
        mine.start()
        done = subprocess.run([sys.executable, "-m", "dispatcher", "gc", "-c", str(config_file)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "removed 1 containers" in done.stdout
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(mine.id)
        assert client.containers.get(other.id).id == other.id
    finally:
        other.remove(force=True)
        client.close()
