"""One contract, every executor: the same tests prove process, docker (cold and warm) and swarm keep the function
contract alike."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import docker
import pytest

from dispatcher.config import ExecutorConfig, FunctionConfig, WarmConfig
from dispatcher.dispatch import input_document, render_args
from dispatcher.errors import ExecutorError
from dispatcher.events import Event, Run
from dispatcher.executors import Invocation, process
from dispatcher.executors.base import LABEL_INVOCATION, LABEL_MANAGED, LABEL_OWNER, LABEL_TRIGGER
from dispatcher.executors.docker import DockerExecutor
from dispatcher.executors.process import ProcessExecutor
from dispatcher.executors.swarm import SwarmExecutor
from tests.support import BUSYBOX, wait_for

pytestmark = pytest.mark.anyio

KINDS = ["process", "docker", "warm", "swarm"]
"""``warm``: the docker executor with the function's ``warm`` pool (a runner in a running container)."""


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    if request.param != "process":
        request.getfixturevalue("docker_engine")
    return request.param


@pytest.fixture(params=["process", "docker", "warm"])
def stdin_kind(request) -> str:
    """The executors that also give the input on stdin (a Swarm task has no stdin)."""
    if request.param != "process":
        request.getfixturevalue("docker_engine")
    return request.param


def make_executor(kind: str, tmp_path: Path, **settings: Any):
    config = ExecutorConfig(kind="docker" if kind == "warm" else kind, max_in_flight=4, **settings)
    if kind == "process":
        return ProcessExecutor(config)
    if kind == "swarm":
        return SwarmExecutor(config)
    return DockerExecutor(config, str(tmp_path / "inputs"))


def invocation(script: str, events: list[Event] | None = None, *, args: list[str] | None = None,
               owner: str = "contract-tests", **function: Any) -> Invocation:
    events = events or [Event(source="test", type="t", data={"n": 1})]
    fn = FunctionConfig(image=BUSYBOX, command=["sh", "-c", script], env={"MODE": "test"}, **function)
    inv_id = Event(source="x", type="x").id
    return Invocation(
        id=inv_id, trigger="contract", function_name="fn", function=fn,
        input=input_document("contract", "fn", inv_id, 1, [Run.of(events)]),
        env={"EVENTSWARM_TRIGGER": "contract", "EVENTSWARM_FUNCTION": "fn", "EVENTSWARM_BATCH_ID": inv_id,
             "EVENTSWARM_ATTEMPT": "1", "EVENTSWARM_EVENT_COUNT": str(len(events))},
        args=render_args(args, events[0]) if args else [], owner=owner,
    )


def warmed(inv: Invocation, **warm: Any) -> Invocation:
    """``inv`` with its function warm."""
    return dataclasses.replace(inv, function=inv.function.model_copy(update={"warm": WarmConfig(**warm)}))


async def run(kind: str, tmp_path: Path, inv: Invocation, **settings: Any):
    if kind == "warm":
        inv = warmed(inv)
    executor = make_executor(kind, tmp_path, **settings)
    await executor.start()
    try:
        return await executor.run(inv)
    finally:
        await executor.close()


CONTRACT = ('stdin=$(cat); file=$(cat "$EVENTSWARM_INPUT"); [ "$stdin" = "$file" ] && echo same-input; '
            'echo "T=$EVENTSWARM_TRIGGER F=$EVENTSWARM_FUNCTION A=$EVENTSWARM_ATTEMPT N=$EVENTSWARM_EVENT_COUNT M=$MODE"; '
            'echo "$stdin"')
FILE_CONTRACT = ('echo "T=$EVENTSWARM_TRIGGER F=$EVENTSWARM_FUNCTION A=$EVENTSWARM_ATTEMPT N=$EVENTSWARM_EVENT_COUNT M=$MODE"; '
                 'cat "$EVENTSWARM_INPUT"; echo')


async def test_the_input_document_and_environment_arrive(kind, tmp_path):
    events = [Event(source="test", type="t", data={"n": i}) for i in range(3)]
    inv = invocation(FILE_CONTRACT, events)
    result = await run(kind, tmp_path, inv)
    lines = result.stdout.decode().splitlines()
    assert result.exit_code == 0, result.stderr
    assert lines[0] == "T=contract F=fn A=1 N=3 M=test"
    doc = json.loads(lines[1])
    assert doc["batch_id"] == inv.id and [e["data"]["n"] for e in doc["events"]] == [0, 1, 2]


async def test_stdin_carries_the_same_document_as_the_input_file(stdin_kind, tmp_path):
    result = await run(stdin_kind, tmp_path, invocation(CONTRACT))
    assert result.stdout.decode().splitlines()[0] == "same-input"


async def test_a_large_input_is_delivered_whole(kind, tmp_path):
    events = [Event(source="test", type="t", data={"n": i, "pad": "x" * 1000}) for i in range(400)]
    inv = invocation("sha256sum < \"$EVENTSWARM_INPUT\" | cut -d' ' -f1", events)
    result = await run(kind, tmp_path, inv)
    import hashlib

    assert result.stdout.decode().strip() == hashlib.sha256(inv.input).hexdigest()


async def test_exit_code_and_stderr_come_back(kind, tmp_path):
    result = await run(kind, tmp_path, invocation("echo to-out; echo oops >&2; exit 7"))
    assert (result.exit_code, result.ok) == (7, False)
    assert result.stdout == b"to-out\n" and result.stderr == b"oops\n"


async def test_a_function_past_its_timeout_gets_sigterm_then_fails(kind, tmp_path):
    script = "trap 'echo got-term; exit 143' TERM; sleep 30 & wait"
    result = await run(kind, tmp_path, invocation(script, timeout="1s"))
    assert result.timed_out and not result.ok
    if kind != "swarm":  # a removed Swarm service has no logs left to read
        assert b"got-term" in result.stdout
    assert result.duration < 15


async def test_a_function_ignoring_sigterm_is_killed(kind, tmp_path):
    script = "trap '' TERM; while true; do sleep 1; done"
    result = await run(kind, tmp_path, invocation(script, timeout="500ms"))
    assert result.timed_out and not result.ok
    assert result.duration < 20


async def test_output_is_captured_up_to_the_limit_keeping_head_and_tail(kind, tmp_path):
    script = "i=0; while [ $i -lt 5000 ]; do echo line-$i; i=$((i+1)); done"
    result = await run(kind, tmp_path, invocation(script), output_limit="2KiB")
    assert result.stdout.startswith(b"line-0\n") and result.stdout.endswith(b"line-4999\n")
    assert b"bytes cut by eventswarm" in result.stdout and len(result.stdout) < 2048 + 100


async def test_args_mode_passes_templated_event_fields(kind, tmp_path):
    event = Event(source="test", type="t", data={"voter_id": 17, "vote": "yes"})
    inv = invocation('echo "voter=$0 vote=$1"', [event], args=["{data.voter_id}", "{data.vote}"])
    result = await run(kind, tmp_path, inv)
    assert result.stdout == b"voter=17 vote=yes\n"


# -- PID 1's stdout: the warm runner's control channel is out of the function's reach ------------------------------
# The Docker idiom "write to /proc/1/fd/1 so that it is logged" (cron images, entrypoint scripts), and a function that
# writes a forged report or garbage there and to every other process's stdout it can open (the warm runner's core
# holds the frame channel: it must stay closed to the function). Not the process executor: its PID 1 is the host's.

@pytest.fixture(params=["docker", "warm", "swarm"])
def container_kind(request) -> str:
    request.getfixturevalue("docker_engine")
    return request.param


async def run_in_turn(kind: str, tmp_path: Path, *invocations: Invocation, **settings: Any) -> list[Any]:
    """``invocations`` one after the other on one executor (a warm one: the same pool, one container at most)."""
    executor = make_executor(kind, tmp_path, **settings)
    await executor.start()
    try:
        return [await executor.run(warmed(inv, max=1) if kind == "warm" else inv) for inv in invocations]
    finally:
        await executor.close()


FORGED_REPORT = r"X\000\000\000\0050 0 0"
"""What the issue's function wrote: an 'X' frame saying "exit 0", in the runner's framing of before the fix."""
EVERY_STDOUT = ("for fd in /proc/1/fd/1 /proc/[0-9]*/fd/1; do {payload} > $fd 2>/dev/null; done; "
                r"for fd in /proc/[0-9]*/fd/0; do printf 'G\000\000\000\000' > $fd 2>/dev/null; done")
"""``payload`` into PID 1's stdout and every other stdout the function can open, and a 'G' frame into every stdin
(the warm runner's core reads its batches from its stdin: were it open to the function, that would run a batch)."""


def batch(script: str, mode: str) -> Invocation:
    """A batch of one event ``{"mode": mode}``: every batch of one test runs the same function (one warm pool). (The
    script looks for ``"mode":"failing"``, whole: a bare word such as "bad" is hex, and ids are hex.)"""
    return invocation(script, [Event(source="test", type="t", data={"mode": mode})])


async def assert_own_results_then_normal(kind: str, tmp_path: Path, script: str, marker: str) -> None:
    """A failing batch that runs ``script`` is recorded as failed with its own output; the next batches of the same
    function (in the same warm container) run normally and get nothing of the first."""
    branch = (f'cat >/dev/null; if grep -q \'"mode":"failing"\' "$EVENTSWARM_INPUT"; then {script}; echo {marker}; '
              'sleep 1; exit 1; fi; echo normal')
    first, second, third = await run_in_turn(kind, tmp_path, batch(branch, "failing"),
                                             batch(branch, "normal"), batch(branch, "normal"))
    assert first.exit_code == 1 and not first.ok, (first.exit_code, first.stderr)
    assert marker.encode() in first.stdout, first.stdout[-300:]
    for result in (second, third):
        assert result.ok and result.stdout == b"normal\n", (result.exit_code, result.stdout[-300:], result.stderr)
    if kind == "warm":  # the channel was never reached: the container served all three, none was replaced
        assert first.ref == second.ref == third.ref


async def test_a_forged_report_written_to_pid1_and_every_stdout_does_not_end_the_batch(container_kind, tmp_path):
    forge = EVERY_STDOUT.format(payload=f"printf '{FORGED_REPORT}'")
    await assert_own_results_then_normal(container_kind, tmp_path, forge, "forged-then-failing")


async def test_garbage_written_to_pid1_and_every_stdout_does_not_end_the_batch(container_kind, tmp_path):
    garbage = EVERY_STDOUT.format(payload="head -c 70000 /dev/urandom")
    await assert_own_results_then_normal(container_kind, tmp_path, garbage, "garbage-then-failing")


async def test_writing_to_pid1s_stdout_and_stderr_is_logging(container_kind, tmp_path):
    """``exec >/proc/1/fd/1 2>/proc/1/fd/2``: the bytes are the batch's stdout and stderr, its exit code its own."""
    script = ('exec >/proc/1/fd/1 2>/proc/1/fd/2; cat >/dev/null; echo logged-out; echo logged-err >&2; '
              'grep -q \'"mode":"failing"\' "$EVENTSWARM_INPUT" && exit 3; exit 0')
    results = await run_in_turn(container_kind, tmp_path, batch(script, "normal"), batch(script, "failing"),
                                batch(script, "normal"))
    assert [r.exit_code for r in results] == [0, 3, 0], [r.stderr for r in results]
    for result in results:
        assert result.stdout == b"logged-out\n", result.stdout
        assert b"logged-err\n" in result.stderr, result.stderr


# -- docker only ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bind", "copy"])
async def test_docker_input_modes_both_provide_the_file(docker_engine, tmp_path, mode):
    result = await run("docker", tmp_path, invocation(CONTRACT), input=mode)
    assert result.stdout.decode().splitlines()[0] == "same-input"


async def test_docker_read_only_functions_get_the_input_by_bind_mount_and_stdin(docker_engine, tmp_path):
    result = await run("docker", tmp_path, invocation(CONTRACT + "; touch /x 2>/dev/null || echo read-only", read_only=True))
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "same-input" and lines[-1] == "read-only"


async def test_docker_stdin_mode_leaves_eventswarm_input_unset(docker_engine, tmp_path):
    result = await run("docker", tmp_path, invocation('echo "input=${EVENTSWARM_INPUT:-unset}"; cat'), input="stdin")
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "input=unset" and json.loads(lines[1])["trigger"] == "contract"


async def test_docker_containers_are_labelled_unprivileged_and_removed(docker_engine, tmp_path):
    client = docker.from_env()
    inv = invocation("grep CapEff /proc/self/status; cat /proc/self/status | grep NoNewPrivs")
    result = await run("docker", tmp_path, inv, cleanup="never")
    try:
        container = client.containers.get(result.ref)
        labels = container.labels
        assert labels[LABEL_MANAGED] == "true" and labels[LABEL_TRIGGER] == "contract"
        assert labels[LABEL_INVOCATION] == inv.id and labels[LABEL_OWNER] == "contract-tests"
        assert container.attrs["HostConfig"]["NetworkMode"] == "none"
        assert b"CapEff:\t0000000000000000" in result.stdout and b"NoNewPrivs:\t1" in result.stdout
    finally:
        client.containers.get(result.ref).remove(force=True)
    result = await run("docker", tmp_path, invocation("true"), cleanup="always")
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(result.ref)
    client.close()


async def test_docker_missing_image_is_a_permanent_error(docker_engine, tmp_path):

    inv = invocation("true")
    inv = Invocation(**{**{f: getattr(inv, f) for f in inv.__slots__}, "function": inv.function.model_copy(update={"image": "eventswarm/nope:none"})})
    with pytest.raises(ExecutorError) as caught:
        await run("docker", tmp_path, inv)
    assert not caught.value.temporary


# -- swarm only -----------------------------------------------------------------------------

async def test_swarm_jobs_and_their_configs_are_labelled_and_removed(docker_engine, tmp_path):
    client = docker.from_env()
    inv = invocation("cat $EVENTSWARM_INPUT >/dev/null")
    result = await run("swarm", tmp_path, inv, cleanup="never")
    try:
        service = client.services.get(result.ref)
        assert service.attrs["Spec"]["Labels"][LABEL_INVOCATION] == inv.id
        assert service.name == f"eventswarm-{inv.id}"
        # A replicated service of one task that is never restarted, not a replicated-job: Swarm before Moby 24 never
        # reaps a removed job's tasks (moby/moby#44312), neither from the raft store nor their containers on workers.
        assert service.attrs["Spec"]["Mode"] == {"Replicated": {"Replicas": 1}}
        assert service.attrs["Spec"]["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"
        config = client.configs.get(f"eventswarm-{inv.id}")
        assert config.attrs["Spec"]["Labels"][LABEL_MANAGED] == "true"
    finally:
        client.services.get(result.ref).remove()
        client.configs.get(f"eventswarm-{inv.id}").remove()
        for container in client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL_INVOCATION}={inv.id}"}):
            container.remove(force=True)
    last = invocation("true")
    result = await run("swarm", tmp_path, last)
    assert result.ok
    with pytest.raises(docker.errors.NotFound):
        client.services.get(result.ref)
    assert client.configs.list(filters={"label": f"{LABEL_INVOCATION}={inv.id}"}) == []
    # Its task goes from the Swarm's store too (the task reaper removes a removed service's tasks).
    # (the service is gone: its tasks are found by its name)
    await wait_for(lambda: not client.api.tasks(filters={"name": f"eventswarm-{last.id}"}), timeout=30,
                   what="the removed job's task reaped")
    client.close()


async def test_swarm_refuses_an_input_over_the_config_limit_with_advice(docker_engine, tmp_path):

    events = [Event(source="test", type="t", data={"pad": "x" * 10_000}) for _ in range(60)]
    with pytest.raises(ExecutorError, match=r"lower batch\.max_bytes") as caught:
        await run("swarm", tmp_path, invocation("true", events))
    assert not caught.value.temporary


async def test_a_swarm_job_that_cannot_be_placed_fails_after_start_timeout(docker_engine, tmp_path):
    inv = invocation("true", placement=["node.labels.eventswarm-test-nowhere == yes"])
    result = await run("swarm", tmp_path, inv, start_timeout="2s")
    assert result.exit_code is None and not result.ok
    assert b"did not start within 2s" in result.stderr
    client = docker.from_env()
    with pytest.raises(docker.errors.NotFound):
        client.services.get(result.ref)
    client.close()


@pytest.fixture(params=["pidfd", "polled"])
def exit_watch(request, monkeypatch) -> str:
    """The process executor watches a child's exit through a pidfd, or polls where the kernel has none."""
    if request.param == "polled":
        monkeypatch.setattr(process, "_pidfd", lambda pid: None)
    return request.param


async def test_the_process_executor_sees_exits_and_timeouts_with_and_without_pidfds(exit_watch, tmp_path):
    result = await run("process", tmp_path, invocation("sleep 0.2; echo bye; exit 5"))
    assert (result.exit_code, result.stdout, result.timed_out) == (5, b"bye\n", False)
    result = await run("process", tmp_path, invocation("trap 'exit 143' TERM; sleep 30 & wait", timeout="300ms"))
    assert result.timed_out and result.exit_code == 143


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_what_a_process_function_leaves_running_ends_with_it(tmp_path):
    # The background sleep keeps stdout open: the invocation still ends, and takes the sleep with it.
    result = await run("process", tmp_path, invocation("sleep 60 & echo $!"))
    assert result.ok and result.duration < 10
    left = int(result.stdout.split()[0])
    await wait_for(lambda: not _alive(left), timeout=10, what=f"the function's leftover process {left} to end")


async def test_a_process_function_whose_program_is_missing_fails_for_good(tmp_path):
    inv = invocation("true")
    inv = dataclasses.replace(inv, function=inv.function.model_copy(update={"command": ["/nonexistent/eventswarm-function"]}))
    with pytest.raises(ExecutorError, match="cannot start '/nonexistent/eventswarm-function'") as caught:
        await run("process", tmp_path, inv)
    assert not caught.value.temporary
