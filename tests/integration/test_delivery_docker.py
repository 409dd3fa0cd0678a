"""Delivery through real containers (cold and warm) and Swarm jobs: bisect isolates poison, timeouts retry, partial
failures, gc."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import docker
import pytest

from dispatcher.daemon import owner_id
from dispatcher.events import Event
from dispatcher.executors.base import LABEL_MANAGED, LABEL_OWNER
from tests.support import BUSYBOX, base_config, free_port, post, running_daemon, store_of, toml, wait_for, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def engine(docker_engine):
    return docker_engine


@pytest.fixture(params=["docker", "warm", "swarm"])
def kind(request) -> str:
    """``warm``: the docker executor with a warm function."""
    return request.param


def config(tmp_path, script: str, kind: str = "docker", **trigger: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, executor="docker" if kind == "warm" else kind)
    doc["functions"]["f"] = {"image": BUSYBOX, "command": ["sh", "-c", script], "timeout": "30s",
                             **({"warm": {"min_idle": 1, "max": 4}} if kind == "warm" else {})}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"},
                            "ordering": "none", "max_in_flight": 4,
                            "retry": {"max_attempts": 3, "initial": "50ms", "max": "200ms"}, **trigger}
    return doc


def leftovers(doc) -> list[Any]:
    """Containers, services and configs of this test's daemon still on the engine.

    The containers are listed sparse: a full listing inspects each one after the list, and one the daemon
    removes in between raised NotFound.
    """
    client = docker.from_env()
    try:
        owner = owner_id(doc["daemon"]["state"].removeprefix("sqlite:///"))
        labels = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
        return (client.services.list(filters=labels) + client.configs.list(filters=labels)
                + client.containers.list(all=True, sparse=True, filters=labels))
    finally:
        client.close()


async def test_one_poison_event_in_a_batch_of_64_ends_as_exactly_one_dead_letter(tmp_path, kind):
    doc = config(tmp_path, 'if grep -q poison "$EVENTSWARM_INPUT"; then echo poisoned >&2; exit 1; fi', kind,
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
    await wait_for(lambda: leftovers(doc) == [], timeout=30, what="every container, job and config to be gone")


async def test_a_function_past_its_timeout_is_killed_and_retried(tmp_path, kind):
    doc = config(tmp_path, "trap 'exit 143' TERM; sleep 60 & wait", kind, batch={"max_events": 1},
                 retry={"max_attempts": 2, "initial": "50ms"})
    doc["functions"]["f"]["timeout"] = "1s"
    async with running_daemon(doc) as daemon:
        await daemon.triggers["t"].emit(Event(source="test", type="t"))
        await wait_for(lambda: store_of(doc).dead_letters(), timeout=60, what="the dead letter")
    records = store_of(doc).invocations()
    assert [r.status for r in records] == ["timed_out", "timed_out"]
    assert sorted(r.attempt for r in records) == [1, 2]
    assert all(r.finished_at - r.started_at < 10 for r in records)
    await wait_for(lambda: leftovers(doc) == [], timeout=20, what="the timed-out jobs to be gone")


@pytest.mark.parametrize("kind", ["docker", "warm"])
async def test_the_partial_failure_line_retries_only_the_named_events(tmp_path, kind):
    # Fails the events whose id starts with "bad" on the first attempt only.
    script = ('input=$(cat); if [ "$EVENTSWARM_ATTEMPT" = 1 ]; then '
              'ids=$(echo "$input" | grep -o \'"id":"bad[^"]*"\' | sed \'s/"id"://\' | tr "\\n" "," | sed "s/,$//"); '
              'echo "processing"; echo "{\\"failed\\": [$ids]}"; fi')
    doc = config(tmp_path, script, kind, batch={"max_events": 10, "max_wait": "5s"})
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
        assert "removed 1 containers, services, configs or processes" in done.stdout
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(mine.id)
        assert client.containers.get(other.id).id == other.id
    finally:
        other.remove(force=True)
        client.close()


async def test_a_swarm_jobs_stdout_is_in_the_invocation_record(tmp_path):
    doc = config(tmp_path, 'echo "events=$EVENTSWARM_EVENT_COUNT"; echo note >&2', "swarm", batch={"max_events": 3, "max_wait": "2s"})
    async with running_daemon(doc) as daemon:
        assert daemon.executor.kind == "swarm"
        for i in range(3):
            await daemon.triggers["t"].emit(Event(source="test", type="t", data={"n": i}))
        record = (await wait_for(lambda: store_of(doc).invocations(status="succeeded"), timeout=60, what="the job"))[0]
    assert store_of(doc).logs(record.id) == (b"events=3\n", b"note\n")
    assert record.executor_ref and record.batch_size == 3
    await wait_for(lambda: leftovers(doc) == [], timeout=30, what="the job and its config to be gone")


def test_kill_9_with_8_swarm_jobs_in_flight_leaves_nothing_behind_and_every_event_runs(tmp_path, daemon_process):
    port = free_port()
    doc = config(tmp_path, "sleep 300", "swarm", max_in_flight=8, batch={"max_events": 2, "max_wait": "10ms"})
    doc["daemon"]["listen"] = f"127.0.0.1:{port}"
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{port}/hooks/t"
    accepted = {json.loads(post(url, json.dumps({"n": i}).encode())[2])["id"] for i in range(24)}
    wait_until(lambda: len([t for s in _services(doc) for t in s.tasks() if t["Status"]["State"] == "running"]) == 8,
               timeout=120, what="8 jobs running")
    daemon.kill()
    assert len(_services(doc)) == 8
    doc["functions"]["f"]["command"] = ["sh", "-c", "cat $EVENTSWARM_INPUT >/dev/null"]
    restarted = daemon_process(doc).start()
    wait_until(lambda: accepted <= {i for r in store_of(doc).invocations(status="succeeded", limit=1000) for i in r.event_ids},
               timeout=180, what="every accepted event to run")
    assert restarted.stop() == 0
    wait_until(lambda: leftovers(doc) == [], timeout=30, what="nothing left behind")
    interrupted = store_of(doc).invocations(status="failed", limit=1000)
    assert len(interrupted) == 8 and all("interrupted" in (r.error or "") for r in interrupted)


async def test_a_stop_past_shutdown_grace_leaves_no_container_behind(tmp_path):
    """The batches cut off at shutdown are handed back; their containers (whose shell ignores SIGTERM: they take the
    engine's stop grace to die) are gone once the daemon has stopped, not left to worker threads that a process exit
    would abandon."""
    doc = config(tmp_path, "sleep 300", max_in_flight=4, batch={"max_events": 1, "max_wait": "10ms"})
    doc["daemon"]["shutdown_grace"] = "1s"
    async with running_daemon(doc) as daemon:
        for i in range(4):
            await daemon.triggers["t"].emit(Event(source="test", type="t", data={"n": i}))
        await wait_for(lambda: len([c for c in leftovers(doc) if c.status == "running"]) == 4, timeout=60,
                       what="4 containers running")
    assert leftovers(doc) == []


def _services(doc) -> list[Any]:
    client = docker.from_env()
    try:
        owner = owner_id(doc["daemon"]["state"].removeprefix("sqlite:///"))
        return client.services.list(filters={"label": f"{LABEL_OWNER}={owner}"})
    finally:
        client.close()


async def test_a_batch_over_the_swarm_config_limit_is_dead_lettered_with_the_advice(tmp_path):
    doc = config(tmp_path, "true", "swarm", batch={"max_events": 100, "max_bytes": "4MiB", "max_wait": "2s"})
    outcomes: list[str] = []

    async def ack(outcome):
        outcomes.append(outcome.status)

    async with running_daemon(doc) as daemon:
        for i in range(60):
            await daemon.triggers["t"].emit(Event(source="test", type="t", data={"n": i, "pad": "x" * 10_000}), ack)
        await wait_for(lambda: len(outcomes) == 60, timeout=60, what="every event settled")
    assert set(outcomes) == {"dead-lettered"}
    letters = store_of(doc).dead_letters()
    assert len(letters) == 60
    assert "lower batch.max_bytes" in letters[0].attempts[0]["error"]
    assert len(store_of(doc).invocations()) == 1  # failed at once: no retries of a batch that cannot fit
