"""Warm functions (docs/warm.md): a pool of running containers per function, the runner as their PID 1.

What the cold docker executor guarantees is in the executor contract suite, which runs the warm
executor too; these tests hold what only a pool has: isolation between batches, replacement
(timeout, out-of-memory kill, max_batches, idle TTL, a new image), prewarming, the pool's bound,
hardening, and a daemon killed with warm containers running.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.config import ExecutorConfig, WarmConfig
from dispatcher.daemon import owner_id
from dispatcher.errors import ExecutorError
from dispatcher.events import Event
from dispatcher.executors import AutoExecutor
from dispatcher.executors import warm as warm_module
from dispatcher.executors.base import LABEL_MANAGED, LABEL_OWNER
from dispatcher.executors.docker import DockerExecutor
from dispatcher.executors.warm import LABEL_WARM
from tests.integration.test_executor_contract import invocation
from tests.support import BUSYBOX, ROOT, base_config, free_port, post, store_of, toml, wait_for, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def engine(docker_engine):
    return docker_engine


@pytest.fixture
async def executor(tmp_path):
    executor = DockerExecutor(ExecutorConfig(kind="docker", max_in_flight=8), str(tmp_path / "inputs"))
    await executor.start()
    yield executor
    await executor.close()


def warm(script: str, owner: str = "warm-tests", settings: dict[str, Any] | None = None, **function: Any):
    inv = invocation(script, owner=owner, **function)
    return dataclasses.replace(inv, function=inv.function.model_copy(update={"warm": WarmConfig(**(settings or {}))}))


def again(inv):
    """The same function's next batch (a new invocation id, the same pool)."""
    other = invocation("true")
    return dataclasses.replace(inv, id=other.id)


def pool(executor) -> dict[str, Any]:
    (found,) = executor.pools()
    return found


def containers(**labels: str) -> list[Any]:
    client = docker.from_env()
    try:
        filters = [f"{LABEL_WARM}=true"] + [f"{k}={v}" for k, v in labels.items()]
        return client.containers.list(all=True, sparse=True, filters={"label": filters})
    finally:
        client.close()


async def test_isolation_between_batches_of_the_same_container(executor):
    # One function whose batches differ by their event: the first leaves a file and a process, the second looks.
    script = ('if [ "$(cat "$EVENTSWARM_INPUT" | grep -c leave)" = 1 ]; then '
              "echo secret > /tmp/left; mkdir -p /tmp/d/e; chmod 500 /tmp/d; (trap '' TERM HUP; exec sleep 300) </dev/null >/dev/null 2>&1 & echo left; "
              "else echo tmp=$(ls -A /tmp | wc -l) sleeping=$(ps -o comm | grep -c '^sleep'); fi")
    first = warm(script)
    first = dataclasses.replace(first, input=b'{"leave": true}')
    one = await executor.run(first)
    assert one.ok and one.stdout == b"left\n", one.stderr
    two = await executor.run(dataclasses.replace(first, id=Event(source="x", type="x").id, input=b"{}"))
    assert two.ref == one.ref, "not the same container: the test proves nothing"
    assert two.stdout == b"tmp=0 sleeping=0\n", two.stderr


async def test_a_timeout_replaces_the_container_and_the_next_batch_succeeds(executor):
    slow = warm('grep -q slow "$EVENTSWARM_INPUT" && sleep 30; echo ok', timeout="1s")
    first = await executor.run(dataclasses.replace(slow, input=b'{"slow": 1}'))
    assert first.timed_out and not first.ok
    second = await executor.run(dataclasses.replace(again(slow), input=b"{}"))
    assert second.ok and second.stdout == b"ok\n"
    assert second.ref != first.ref
    assert pool(executor)["replacements"] == {"timeout": 1}


async def test_an_out_of_memory_kill_replaces_the_container_and_the_next_batch_succeeds(executor):
    hungry = warm('if grep -q big "$EVENTSWARM_INPUT"; then head -c 300m /dev/zero | tail > /dev/null; fi; echo ok',
                  memory="48MiB")
    first = await executor.run(dataclasses.replace(hungry, input=b'{"big": 1}'))
    assert first.oom_killed and not first.ok, (first.exit_code, first.stderr)
    second = await executor.run(dataclasses.replace(again(hungry), input=b"{}"))
    assert second.ok and second.stdout == b"ok\n"
    assert second.ref != first.ref
    assert pool(executor)["replacements"] == {"oom": 1}


async def test_max_batches_replaces_the_container(executor):
    inv = warm("echo hi", settings={"max_batches": 2})
    refs = [(await executor.run(again(inv))).ref for _ in range(3)]
    assert refs[0] == refs[1] != refs[2]
    assert pool(executor)["replacements"] == {"max_batches": 1}


async def test_idle_containers_past_their_ttl_are_replaced_and_min_idle_prewarmed(executor):
    inv = warm("echo hi", settings={"min_idle": 2, "idle_ttl": "1s"})
    await executor.prepare({"fn": inv.function}, "warm-tests")
    await wait_for(lambda: pool(executor)["idle"] == 2 or None, timeout=60, what="two prewarmed containers")
    first = await executor.run(inv)
    assert first.ok
    await wait_for(lambda: pool(executor)["replacements"].get("idle_ttl", 0) >= 2 or None, timeout=60,
                   what="idle containers replaced after their TTL")
    await wait_for(lambda: pool(executor)["idle"] == 2 or None, timeout=60, what="the pool to be back at min_idle")
    assert first.ref not in {c.id for c in containers(**{LABEL_OWNER: "warm-tests"}) if c.status == "running"}


async def test_the_pool_never_holds_more_than_max_and_batches_wait_for_a_container(executor):
    inv = warm("sleep 0.3; echo hi", settings={"min_idle": 0, "max": 2})
    results = []

    async def one() -> None:
        results.append(await executor.run(again(inv)))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)
    assert all(r.ok for r in results) and len(results) == 8
    assert len({r.ref for r in results}) == 2
    assert pool(executor)["starts"] == 2 and pool(executor)["size"] == 2


async def test_warm_containers_are_hardened_and_log_nowhere(executor):
    inv = warm("grep -E 'CapEff|NoNewPrivs' /proc/self/status; touch /x 2>/dev/null || echo read-only; "
               "cat \"$EVENTSWARM_INPUT\" > /dev/null && echo input", read_only=True, owner="warm-hardened")
    result = await executor.run(inv)
    assert result.ok, result.stderr
    assert b"CapEff:\t0000000000000000" in result.stdout and b"NoNewPrivs:\t1" in result.stdout
    assert result.stdout.endswith(b"read-only\ninput\n")
    (container,) = containers(**{LABEL_OWNER: "warm-hardened"})
    container.reload()  # (listed sparse)
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"] and host["LogConfig"]["Type"] == "none"
    assert container.labels[LABEL_MANAGED] == "true" and "/tmp" in host["Tmpfs"]


@pytest.mark.parametrize("read_only", [False, True])
async def test_the_runner_is_copied_in_where_the_engine_does_not_see_the_daemons_files(tmp_path, read_only):
    executor = DockerExecutor(ExecutorConfig(kind="docker", input="copy"), str(tmp_path / "inputs"))
    await executor.start()
    try:
        result = await executor.run(warm('cat "$EVENTSWARM_INPUT" | grep -c batch_id', read_only=read_only))
    finally:
        await executor.close()
    assert result.ok and result.stdout == b"1\n", result.stderr


async def test_a_missing_runner_is_a_clear_permanent_error(executor, monkeypatch):
    monkeypatch.setattr(warm_module, "RUNNER", Path("/nonexistent/eventswarm-runner"))
    with pytest.raises(ExecutorError, match="make install") as caught:
        await executor.run(warm("true"))
    assert not caught.value.temporary


def test_kill_9_with_warm_containers_running_loses_nothing_and_the_restart_removes_them(tmp_path, daemon_process):
    port = free_port()
    doc = base_config(tmp_path, executor="docker")
    doc["daemon"]["listen"] = f"127.0.0.1:{port}"
    doc["functions"]["f"] = {"image": BUSYBOX, "command": ["sh", "-c", "sleep 300"], "timeout": "10m",
                             "warm": {"min_idle": 1, "max": 4}}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"}, "ordering": "none",
                            "max_in_flight": 4, "batch": {"max_events": 2, "max_wait": "10ms"}}
    owner = owner_id(doc["daemon"]["state"].removeprefix("sqlite:///"))
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{port}/hooks/t"
    accepted = {json.loads(post(url, json.dumps({"n": i}).encode())[2])["id"] for i in range(16)}
    wait_until(lambda: len([c for c in containers(**{LABEL_OWNER: owner}) if c.status == "running"]) == 4,
               timeout=120, what="4 warm containers busy")
    before = {c.id for c in containers(**{LABEL_OWNER: owner})}
    daemon.kill()
    doc["functions"]["f"]["command"] = ["sh", "-c", "cat > /dev/null"]
    restarted = daemon_process(doc).start()
    wait_until(lambda: not before & {c.id for c in containers(**{LABEL_OWNER: owner})}, timeout=60,
               what="the killed daemon's warm containers to be removed")
    wait_until(lambda: accepted <= {i for r in store_of(doc).invocations(status="succeeded", limit=1000)
                                    for i in r.event_ids}, timeout=180, what="every accepted event to run")
    assert restarted.stop() == 0
    wait_until(lambda: containers(**{LABEL_OWNER: owner}) == [], timeout=30, what="no warm container left")
    interrupted = store_of(doc).invocations(status="failed", limit=1000)
    assert len(interrupted) == 4 and all("interrupted" in (r.error or "") for r in interrupted)


def test_status_and_metrics_show_each_pool_through_a_running_daemon(tmp_path, daemon_process):
    port = free_port()
    doc = base_config(tmp_path, executor="docker")
    doc["daemon"]["listen"] = f"127.0.0.1:{port}"
    doc["functions"]["echo"] = {"image": BUSYBOX, "command": ["cat"], "warm": {"min_idle": 2, "max": 3}}
    doc["triggers"]["sync"] = {"function": "echo",
                               "source": {"kind": "webhook", "path": "/hooks/sync", "mode": "sync"}}
    daemon_process(doc).start()

    def status() -> str:
        done = subprocess.run([sys.executable, "-m", "dispatcher", "status", "-c", str(tmp_path / "eventswarm.toml")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        return done.stdout

    line = wait_until(lambda: next((row for row in status().splitlines() if row.startswith("echo ")
                                    and row.split()[1:6] == ["runner", "2", "3", "2", "0"]), None),
                      timeout=60, what="the pool prewarmed to 2 idle in `eventswarm status`")
    assert line.split()[6] == "2" and line.endswith("none")  # 2 starts, nothing replaced
    code, _, body = post(f"http://127.0.0.1:{port}/hooks/sync", b'{"hello": "warm"}')
    assert code == 200 and b'"hello":"warm"' in body
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    size = {s.labels["function"]: s.value for s in families["eventswarm_warm_pool_size"].samples}
    assert size == {"echo": 2.0}
    starts = [s for s in families["eventswarm_warm_starts"].samples if s.name == "eventswarm_warm_starts_total"]
    assert [(s.labels["function"], s.value) for s in starts] == [("echo", 2.0)]
    assert "eventswarm_warm_pool_idle" in families and "eventswarm_warm_replacements" in families


async def test_a_persistent_function_keeps_its_state_between_batches(executor, python_image):
    # The example in docs/examples, as users would start from it: it counts the events it has seen.
    inv = invocation("", events=[Event(source="t", type="t", data={"n": 1})] * 2)
    inv = dataclasses.replace(inv, function=inv.function.model_copy(update={
        "image": python_image, "command": ["python3", "/examples/persistent_function.py"],
        "mounts": [f"{ROOT / 'docs' / 'examples'}:/examples"], "warm": WarmConfig(mode="persistent")}))
    results = [await executor.run(again(inv)) for _ in range(3)]
    assert [r.stdout for r in results] == [f"2 events, {2 * i} since this container started\n".encode()
                                           for i in (1, 2, 3)], [r.stderr for r in results]
    assert len({r.ref for r in results}) == 1 and all(r.ok for r in results)


async def test_a_persistent_function_that_never_answers_is_timed_out_and_replaced(executor):
    # Says it is ready, then reads nothing: the daemon ends the batch at the timeout and replaces the container.
    inv = warm("", settings={"mode": "persistent"}, timeout="1s")
    inv = dataclasses.replace(inv, function=inv.function.model_copy(
        update={"command": ["sh", "-c", r"printf 'R\000\000\000\000'; exec sleep 600"]}))
    first = await executor.run(inv)
    assert first.timed_out and not first.ok
    second = await executor.run(again(inv))
    assert second.timed_out and second.ref != first.ref
    assert pool(executor)["replacements"] == {"timeout": 2}


BREAKER = r"""
import json, struct, sys

def send(kind, payload):
    sys.stdout.buffer.write(kind + struct.pack(">I", len(payload)) + payload)
    sys.stdout.buffer.flush()

send(b"R", b"breaker")
mode = "good"
while len(header := sys.stdin.buffer.read(5)) == 5:
    kind, payload = header[:1], sys.stdin.buffer.read(struct.unpack(">I", header[1:])[0])
    if kind == b"I":
        mode = json.loads(payload)["events"][0]["data"]["mode"]
    elif kind == b"G":
        if mode != "tokenless":
            send(b"B", payload)
        send(b"O", mode.encode() + b"\n")
        if mode == "stale":     # a report that is not this batch's (a forged one, or the last batch's)
            send(b"X", b"0123456789abcdef 0")
        elif mode == "untyped":  # a type no frame has
            send(b"Z", b"")
        elif mode == "huge":     # a length no frame has: the daemon must not wait for 2 GiB
            sys.stdout.buffer.write(b"O\x7f\xff\xff\xff")
            sys.stdout.buffer.flush()
        elif mode == "tokenless":  # the status alone, as persistent functions sent before tokens
            send(b"X", b"0")
        else:
            send(b"X", payload + b" 0")
            if mode == "chatter":  # then speaks while no batch runs
                send(b"O", b"late\n")
"""


@pytest.fixture
def breaker(python_image, tmp_path):
    """A batch, ``breaker(mode)``, of the persistent function BREAKER (one function: one pool)."""
    (tmp_path / "breaker.py").write_text(BREAKER)
    function = {"image": python_image, "command": ["python3", "/fn/breaker.py"], "mounts": [f"{tmp_path}:/fn"],
                "warm": WarmConfig(mode="persistent", min_idle=0), "timeout": 60.0}

    def batch(mode: str):
        inv = invocation("", events=[Event(source="t", type="t", data={"mode": mode})])
        return dataclasses.replace(inv, function=inv.function.model_copy(update=function))

    return batch


@pytest.mark.parametrize("mode", ["stale", "untyped", "huge", "tokenless"])
async def test_a_frame_that_breaks_the_protocol_fails_the_batch_at_once_and_replaces_the_container(
        executor, breaker, mode):
    batch = breaker
    broken = await executor.run(batch(mode))
    assert broken.exit_code is None and not broken.ok and broken.duration < 10, broken
    assert b"broke the frame protocol" in broken.stderr and "frame protocol" in broken.notes[0]
    fine = await executor.run(batch("good"))
    assert fine.ok and fine.stdout == b"good\n" and fine.ref != broken.ref, fine
    assert pool(executor)["replacements"] == {"protocol": 1}


async def test_a_container_that_speaks_between_batches_is_replaced_before_the_next(executor, breaker):
    batch = breaker
    first = await executor.run(batch("chatter"))
    assert first.ok and first.stdout == b"chatter\n"  # (its own batch reported as it should)
    # (the upkeep looks at idle containers every second; a batch taking it first would refuse it too, as a protocol
    # error of its own, then run again: waiting here makes the test say which)
    await wait_for(lambda: pool(executor)["replacements"] == {"protocol": 1}, what="the upkeep to replace it")
    second = await executor.run(batch("good"))
    assert second.ok and second.stdout == b"good\n" and second.ref != first.ref, second
    assert pool(executor)["replacements"] == {"protocol": 1}


async def test_on_a_swarm_manager_auto_runs_warm_functions_on_the_engines_pool(tmp_path):
    executor = AutoExecutor(ExecutorConfig(kind="auto"), str(tmp_path / "inputs"))
    await executor.start()
    try:
        assert executor.kind == "swarm"
        inv = warm("echo warm", owner="warm-auto")
        first, second = await executor.run(inv), await executor.run(again(inv))
        assert first.stdout == second.stdout == b"warm\n" and first.ref == second.ref
        assert [c.id for c in containers(**{LABEL_OWNER: "warm-auto"})] == [first.ref]
        assert executor.pools()[0]["starts"] == 1
    finally:
        await executor.close()
    assert containers(**{LABEL_OWNER: "warm-auto"}) == []


async def test_a_program_that_cannot_start_fails_its_batch_and_the_container_serves_the_next(executor):
    inv = warm("true")
    missing = dataclasses.replace(inv, function=inv.function.model_copy(update={"command": ["/no/such/program"]}))
    result = await executor.run(missing)
    assert result.exit_code == 127 and b"cannot run '/no/such/program'" in result.stderr
    again_ = await executor.run(again(missing))
    assert again_.exit_code == 127 and again_.ref == result.ref and pool(executor)["replacements"] == {}


async def test_a_missing_image_is_said_in_one_line_and_fails_batches_for_good(executor, caplog):
    inv = warm("true")
    inv = dataclasses.replace(inv, function=inv.function.model_copy(update={"image": "eventswarm/nope:none"}))
    await executor.prepare({"fn": inv.function}, "warm-tests")
    await wait_for(lambda: any("cannot start a container" in r.getMessage() for r in caplog.records) or None,
                   timeout=30, what="the upkeep to say the pool cannot start")
    with pytest.raises(ExecutorError, match="image not found") as caught:
        await executor.run(inv)
    assert not caught.value.temporary
    warnings = [r for r in caplog.records if r.name == "eventswarm.warm"]
    assert all(r.exc_info is None for r in warnings) and len(warnings) == 1


def test_a_reload_that_changes_the_function_replaces_its_pool(tmp_path, daemon_process):
    port = free_port()
    doc = base_config(tmp_path, executor="docker")
    doc["daemon"]["listen"] = f"127.0.0.1:{port}"
    doc["functions"]["f"] = {"image": BUSYBOX, "command": ["sh", "-c", "echo v=$VERSION"], "env": {"VERSION": "1"},
                             "warm": {"min_idle": 1, "max": 2}}
    doc["triggers"]["sync"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/sync", "mode": "sync"}}
    owner = owner_id(doc["daemon"]["state"].removeprefix("sqlite:///"))
    daemon = daemon_process(doc).start()
    url = f"http://127.0.0.1:{port}/hooks/sync"
    assert post(url, b"{}")[2] == b"v=1\n"
    old = {c.id for c in containers(**{LABEL_OWNER: owner})}
    assert old
    doc["functions"]["f"]["env"]["VERSION"] = "2"
    (tmp_path / "eventswarm.toml").write_text(toml(doc))
    done = subprocess.run([sys.executable, "-m", "dispatcher", "reload", "-c", str(tmp_path / "eventswarm.toml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert post(url, b"{}")[2] == b"v=2\n"
    wait_until(lambda: not old & {c.id for c in containers(**{LABEL_OWNER: owner})}, timeout=30,
               what="the old pool's containers to be removed")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=10) as answer:
        pools = json.load(answer)["pools"]
    assert [p["function"] for p in pools] == ["f"]  # the old pool is gone from status
    assert daemon.stop() == 0
    wait_until(lambda: containers(**{LABEL_OWNER: owner}) == [], timeout=30, what="no warm container after the stop")


async def test_a_new_image_behind_the_tag_replaces_the_pools_containers(executor, tmp_path, monkeypatch):
    monkeypatch.setattr(warm_module, "IMAGE_CHECK_EVERY", 0.2)
    client = docker.from_env()
    tag = "eventswarm/warm-retag:test"
    try:
        client.images.get(BUSYBOX).tag(tag)
        inv = warm("echo hi")
        inv = dataclasses.replace(inv, function=inv.function.model_copy(update={"image": tag}))
        first = await executor.run(inv)
        (tmp_path / "Dockerfile").write_text(f"FROM {BUSYBOX}\nLABEL io.eventswarm.test.version=2\n")
        client.images.build(path=str(tmp_path), tag=tag, rm=True)
        await wait_for(lambda: pool(executor)["replacements"].get("image") or None, timeout=30,
                       what="the pool to see the new image")
        second = await executor.run(again(inv))
        assert second.ok and second.ref != first.ref
        assert client.containers.get(second.ref).image.id == client.images.get(tag).id
    finally:
        client.images.remove(tag, force=True)
        client.close()


async def test_an_idle_container_killed_from_outside_is_replaced_before_a_batch_meets_it(executor):
    inv = warm("echo hi", settings={"min_idle": 1, "max": 1})
    first = await executor.run(inv)
    client = docker.from_env()
    try:
        client.containers.get(first.ref).kill()
    finally:
        client.close()
    await wait_for(lambda: pool(executor)["replacements"].get("runner_ended") or None, timeout=30,
                   what="the upkeep to notice the dead idle container")
    second = await executor.run(again(inv))
    assert second.ok and second.ref != first.ref


async def test_a_warm_function_runs_as_its_user_and_is_still_cleaned_between_batches(executor):
    script = ('if grep -q leave "$EVENTSWARM_INPUT"; then echo x > /tmp/left; sleep 300 & echo left; '
              'else echo "uid=$(id -u) tmp=$(ls -A /tmp | wc -l) sleeping=$(ps -o comm | grep -c ^sleep)"; fi')
    inv = warm(script, user="65534:65534", read_only=True)
    one = await executor.run(dataclasses.replace(inv, input=b'{"leave": 1}'))
    assert one.ok and one.stdout == b"left\n", one.stderr
    two = await executor.run(dataclasses.replace(again(inv), input=b"{}"))
    assert two.ref == one.ref and two.stdout == b"uid=65534 tmp=0 sleeping=0\n", two.stderr
