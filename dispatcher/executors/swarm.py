"""The swarm executor: one service of one task per batch on a Docker Swarm (never restarted), through the Docker SDK.

The input document travels as a Swarm config mounted at ``$EVENTSWARM_INPUT`` (Swarm tasks
have no stdin). The exit code comes from the task status, stdout and stderr from the service
logs. Service and config names derive from the invocation id, so an invocation is never
launched twice. Blocking SDK calls run in worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import docker
import docker.errors
from docker.types import ServiceMode

from dispatcher.config import ExecutorConfig
from dispatcher.errors import ExecutorError
from dispatcher.executors.base import (
    INPUT_PATH,
    LABEL_FUNCTION,
    LABEL_INVOCATION,
    LABEL_OWNER,
    STOP_GRACE,
    Capture,
    Invocation,
    Phases,
    Result,
    environment,
)
from dispatcher.executors.engine import ENGINE_ERRORS, EngineExecutor, connect, engine_error, labels, remove_containers
from dispatcher.placement import choose, running_by_node

CONFIG_LIMIT = 500 * 1024
"""The largest Swarm config the engine accepts: a batch's input document must fit in it."""

CONFIG_REMOVE_TRIES = 15
NODE_CHECK = 1.0
"""How often a running job's node is looked at (seconds): a node the manager marks down fails the job's attempt."""
_NODE_LOST = {"down", "unknown", "disconnected"}
ROOM_WAIT = 0.25
"""How often a job whose function's nodes are all at ``max_replicas_per_node`` looks again for room (seconds)."""
_POLL = 0.05
_DONE = {"complete", "failed", "rejected", "shutdown", "orphaned", "remove"}
_STARTED = {"running", "complete", "failed", "shutdown"}


class SwarmExecutor(EngineExecutor):
    kind = "swarm"

    def __init__(self, config: ExecutorConfig) -> None:
        super().__init__(config)
        self._secret_ids: dict[str, str] = {}
        self._node_names: dict[str, str] = {}
        self._placing: dict[str, threading.Lock] = {}
        """Per function that spreads or limits its jobs per node: held from choosing a job's nodes until Swarm has
        given it one, so that the next choice counts it."""

    async def start(self) -> None:
        client = await connect(self.config)
        state = await anyio.to_thread.run_sync(lambda: client.api.info().get("Swarm", {}))
        if state.get("LocalNodeState") != "active" or not state.get("ControlAvailable"):
            client.close()
            raise ExecutorError("the Docker engine is not an active Swarm manager (docker swarm init)", temporary=False)
        self._client = client

    async def gc(self, owner: str | None) -> int:
        filters = labels(owner)

        def sweep() -> int:
            api = self.client.api
            removed = sum(_quietly(api.remove_service, s["ID"]) for s in api.services(filters=filters))
            removed += sum(_quietly(api.remove_config, c["ID"]) for c in api.configs(filters=filters))
            return removed + remove_containers(api, filters)

        return await anyio.to_thread.run_sync(sweep, limiter=self._limiter)

    async def run(self, invocation: Invocation) -> Result:
        if len(invocation.input) > CONFIG_LIMIT:
            raise ExecutorError(
                f"the batch's input document is {len(invocation.input)} bytes, over the Swarm config limit of "
                f"{CONFIG_LIMIT} bytes: lower batch.max_bytes (to about {CONFIG_LIMIT * 9 // 10} or less)",
                temporary=False)
        return await super().run(invocation)

    async def adopt(self, invocation: Invocation) -> Result | None:
        """The job ``eventswarm-<id>`` of a replica that is gone (``invocation`` names it; its input is not needed):
        followed to its end if it still runs, its result and logs taken if it finished, then removed. None when
        there is no such job (it never started, or went with its replica): the invocation is to run again."""
        return await self._in_thread(self._adopt, invocation)

    # -- in a worker thread -----------------------------------------------------------------

    def _adopt(self, invocation: Invocation, cancelled: threading.Event) -> Result | None:
        api = self.client.api
        name = f"eventswarm-{invocation.id}"
        try:
            service_id = str(api.inspect_service(name)["ID"])
        except ENGINE_ERRORS:
            return None
        try:
            config_id: str | None = str(api.inspect_config(name)["ID"])
        except ENGINE_ERRORS:
            config_id = None
        return self._follow(api, invocation, service_id, config_id, time.monotonic(), cancelled, _Held(None),
                            Phases(None))

    def _run(self, invocation: Invocation, cancelled: threading.Event) -> Result:
        api = self.client.api
        function = invocation.function
        name = f"eventswarm-{invocation.id}"
        started = time.monotonic()
        config_id: str | None = None
        held = _Held(None)
        added: list[str] = []
        phases = Phases("place the job" if function.placement.chosen_by_daemon else "prepare input")
        if function.placement.chosen_by_daemon:
            placed = self._place(api, invocation, started, cancelled)
            if isinstance(placed, str):  # no room before start_timeout, or the daemon stops
                return Result(exit_code=None, stderr=f"\n[eventswarm] {placed}\n".encode(), notes=[placed],
                              duration=time.monotonic() - started)
            held, added = placed
            phases.step("prepare input")
        try:
            config_id = _create_config(api, name, invocation)
            phases.step("start the job")
            service_id = _create_service(api, name, self._task_template(invocation, name, config_id, added),
                                         invocation)
        except ENGINE_ERRORS as exc:
            held.release()
            if config_id:
                _quietly(api.remove_config, config_id)
            raise engine_error(exc, f"cannot create a Swarm job for {function.image!r}") from exc
        return self._follow(api, invocation, service_id, config_id, started, cancelled, held, phases)

    def _place(self, api: Any, invocation: Invocation, started: float, cancelled: threading.Event,
               ) -> tuple[_Held, list[str]] | str:
        """The constraints that spread the function's jobs or keep them under its limit per node, with the
        function's placing lock held (until Swarm gives the job a node); or why the job is not to be made.

        While every node that may run the function has ``max_replicas_per_node`` of its jobs, the job waits for
        room, looking again every ``ROOM_WAIT`` s, until ``start_timeout`` (a job that waits counts against
        ``max_in_flight``, as a pending one does)."""
        function = invocation.function
        placement = function.placement
        lock = self._placing.setdefault(invocation.function_name, threading.Lock())
        mine = [f"{LABEL_FUNCTION}={invocation.function_name}"] + ([f"{LABEL_OWNER}={invocation.owner}"]
                                                                   if invocation.owner else [])
        why = "behind a job of the function's that no node had taken"
        while True:
            if cancelled.is_set():
                return "stopped: the daemon shut down"
            if time.monotonic() - started > self.config.start_timeout:
                return f"the job did not start within {self.config.start_timeout:g}s ({why})"
            if not lock.acquire(timeout=ROOM_WAIT):
                continue
            try:
                tasks = api.tasks(filters={"label": mine, "desired-state": "running"})
                nodes = api.nodes()
            except ENGINE_ERRORS as exc:
                lock.release()
                raise engine_error(exc, "cannot list the Swarm's nodes and the function's running jobs") from exc
            added = choose(nodes, running_by_node(tasks, _DONE), placement.constraints,
                           [preference.spread for preference in placement.preferences],
                           placement.max_replicas_per_node)
            if added is not None:
                return _Held(lock), added
            lock.release()
            why = (f"every node that may run it had max_replicas_per_node = {placement.max_replicas_per_node} of "
                   "the function's jobs")
            cancelled.wait(ROOM_WAIT)

    def _follow(self, api: Any, invocation: Invocation, service_id: str, config_id: str | None, started: float,
                cancelled: threading.Event, held: _Held, phases: Phases) -> Result:
        """Wait for the job to end; its result and logs; then it is removed (as ``cleanup`` says). ``held``: the
        function's placing lock, released once Swarm has given the job a node (or the job ended)."""
        function = invocation.function
        ok = lost = False
        try:
            task, timed_out, note, lost = self._wait(api, service_id, function.timeout, cancelled, held.release,
                                                     lambda: phases.step("run"))
            phases.step("collect output")
            status = task.get("Status", {}) if task else {}
            exit_code = status.get("ContainerStatus", {}).get("ExitCode")
            if task is None or lost or status.get("State") in ("rejected", "pending", "new", "assigned", "accepted"):
                exit_code = None
            # (the logs of a task on a lost node cannot be read: the manager would wait for that node)
            stdout, stderr = (b"", b"") if lost else self._logs(api, service_id)
            if note:
                stderr += f"\n[eventswarm] {note}\n".encode()
            result = Result(exit_code=exit_code, stdout=stdout, stderr=stderr, timed_out=timed_out,
                            oom_killed=exit_code == 137 and "OOM" in str(status.get("Err", "")),
                            ref=service_id, duration=time.monotonic() - started, node=self._node_name(api, task),
                            phases=phases.step(None))
            if note and not timed_out:
                result.notes.append(note)
            ok = result.ok
            return result
        finally:
            held.release()
            # A job lost with its node is removed whatever ``cleanup`` says: kept, its task would run again (or
            # fail) on that node when it returns, after the batch was retried elsewhere.
            if lost or self.config.cleanup == "always" or (self.config.cleanup == "on-success" and ok):
                _quietly(api.remove_service, service_id)
                # (The agent of the node that ran the task removes its container as the service goes; one on this
                # engine is removed now, not left for the agent: the batch's leftovers are gone when it returns.)
                _quietly(lambda _: remove_containers(api, {"label": [f"{LABEL_INVOCATION}={invocation.id}"]}), "")
                if config_id:
                    # Refused while the engine still counts the config in use by the job being removed.
                    for _ in range(CONFIG_REMOVE_TRIES):
                        if _quietly(api.remove_config, config_id) or _gone(api.inspect_config, config_id):
                            break
                        time.sleep(0.2)

    def _task_template(self, invocation: Invocation, name: str, config_id: str, added: list[str],
                       ) -> dict[str, Any]:
        """The job's task: ``added``, constraints the daemon chose (a spread, a limit per node) beside the
        function's own."""
        function = invocation.function
        env = environment(invocation, INPUT_PATH)
        container: dict[str, Any] = {
            "Image": function.image,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": invocation.labels,
            "ReadOnly": function.read_only,
            "CapabilityDrop": ["ALL"],
            "StopGracePeriod": int(STOP_GRACE * 1e9),
            "Configs": [{"File": {"Name": INPUT_PATH, "UID": "0", "GID": "0", "Mode": 0o444},
                         "ConfigID": config_id, "ConfigName": name}],
        }
        if function.command:
            container["Command"] = list(function.command)
        if invocation.args:
            container["Args"] = list(invocation.args)
        if function.user:
            container["User"] = function.user
        if function.secrets:
            container["Secrets"] = [{"File": {"Name": f"/run/secrets/{s}", "UID": "0", "GID": "0", "Mode": 0o444},
                                     "SecretID": self._secret_id(s), "SecretName": s} for s in function.secrets]
        if function.mounts:
            container["Mounts"] = [{"Type": "bind" if m.bind else "volume", "Source": m.source, "Target": m.target,
                                    "ReadOnly": m.read_only} for m in function.volumes]
        limits: dict[str, Any] = {}
        if function.memory:
            limits["MemoryBytes"] = function.memory
        if function.cpus:
            limits["NanoCPUs"] = int(function.cpus * 1e9)
        if function.pids_limit:
            limits["Pids"] = function.pids_limit
        template: dict[str, Any] = {
            "ContainerSpec": container,
            "Resources": {"Limits": limits},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
        }
        if function.placement.constraints or added:
            template["Placement"] = {"Constraints": [*function.placement.constraints, *added]}
        if self.config.network != "none":
            template["Networks"] = [{"Target": self.config.network}]
        return template

    def _secret_id(self, name: str) -> str:
        if name not in self._secret_ids:
            found = [s for s in self.client.api.secrets(filters={"name": name}) if s["Spec"]["Name"] == name]
            if not found:
                raise ExecutorError(f"no Swarm secret named {name!r} (docker secret create {name} FILE)", temporary=False)
            self._secret_ids[name] = found[0]["ID"]
        return self._secret_ids[name]

    def _wait(self, api: Any, service_id: str, timeout: float, cancelled: threading.Event,
              placed: Callable[[], None], started: Callable[[], object] = lambda: None,
              ) -> tuple[dict[str, Any] | None, bool, str | None, bool]:
        """Poll the job's task until it ends; returns (task, timed out?, why it did not run, lost with its node?).
        ``placed`` is called once the task has a node, ``started`` once it runs.

        A task whose node the manager marks down (or that left the Swarm) is given up at once: Swarm would keep it
        ``running`` for as long as the node is away, and a job never restarts elsewhere (restart condition
        ``none``: the daemon's retries own the batch, on a live node)."""
        queued = time.monotonic()
        running_since: float | None = None
        node_checked = 0.0
        task: dict[str, Any] | None = None
        while True:
            if cancelled.is_set():
                _quietly(api.remove_service, service_id)
                return task, False, "stopped: the daemon shut down", False
            try:
                tasks = api.tasks(filters={"service": service_id})
            except ENGINE_ERRORS:
                tasks = []
            if not tasks and _gone(api.inspect_service, service_id):
                return task, False, "the job was removed before it ended", False
            now = time.monotonic()
            if tasks:
                task = max(tasks, key=lambda t: t.get("CreatedAt", ""))
                state = task.get("Status", {}).get("State", "")
                if task.get("NodeID"):
                    placed()
                if state in _DONE:
                    return task, False, None, False
                if state in _STARTED and running_since is None:
                    running_since = now
                    started()
                if task.get("NodeID") and now - node_checked >= NODE_CHECK:
                    node_checked = now
                    lost = self._node_lost(api, task["NodeID"])
                    if lost:
                        _quietly(api.remove_service, service_id)
                        return task, False, f"the job's node {lost}: the attempt failed", True
            if running_since is not None and now - running_since > timeout:
                _quietly(api.remove_service, service_id)  # SIGTERM, then SIGKILL after the stop grace period
                return task, True, None, False
            if running_since is None and now - queued > self.config.start_timeout:
                message = (task or {}).get("Status", {}).get("Err") or (task or {}).get("Status", {}).get("Message", "")
                _quietly(api.remove_service, service_id)
                return task, False, (f"the job did not start within {self.config.start_timeout:g}s"
                                     f" ({message or 'no node could run it'})"), False
            time.sleep(_POLL)

    def _node_lost(self, api: Any, node_id: str) -> str:
        """How the node ``node_id`` is lost (``"eventswarm-node-2 is down"``), or ``""`` while it is up (or cannot
        be asked: the manager's own trouble is not the node's)."""
        try:
            node = api.inspect_node(node_id)
        except docker.errors.NotFound:
            return f"{self._node_names.get(node_id, node_id)} left the Swarm"
        except ENGINE_ERRORS:
            return ""
        name = self._remember(node_id, node)
        state = node.get("Status", {}).get("State", "")
        return f"{name} is {state}" if state in _NODE_LOST else ""

    def _remember(self, node_id: str, node: dict[str, Any]) -> str:
        """The node's host name (its id if it has none), kept for the records and for when it has left the Swarm."""
        self._node_names[node_id] = node.get("Description", {}).get("Hostname") or node_id
        return self._node_names[node_id]

    def _node_name(self, api: Any, task: dict[str, Any] | None) -> str | None:
        """The host name of the node that ran ``task`` (its id if the manager cannot say)."""
        node_id = (task or {}).get("NodeID")
        if not node_id:
            return None
        if node_id in self._node_names:
            return self._node_names[node_id]
        try:
            return self._remember(node_id, api.inspect_node(node_id))
        except ENGINE_ERRORS:
            return str(node_id)

    def _logs(self, api: Any, service_id: str) -> tuple[bytes, bytes]:
        captures = []
        for stdout, stderr in ((True, False), (False, True)):
            capture = Capture(self.config.output_limit)
            try:
                for chunk in api.service_logs(service_id, stdout=stdout, stderr=stderr, follow=False):
                    capture.write(chunk)
            except ENGINE_ERRORS:
                pass
            captures.append(capture.getvalue())
        return captures[0], captures[1]


class _Held:
    """A lock held until ``release``, which may be called any number of times (no lock: nothing to release)."""

    def __init__(self, lock: threading.Lock | None) -> None:
        self._lock = lock

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


def _create_config(api: Any, name: str, invocation: Invocation) -> str:
    try:
        return str(api.create_config(name, invocation.input, labels=invocation.labels)["ID"])
    except docker.errors.APIError as exc:
        if exc.status_code != 409:
            raise
        return str(api.inspect_config(name)["ID"])  # the same invocation, created before: reuse it


def _create_service(api: Any, name: str, template: dict[str, Any], invocation: Invocation) -> str:
    try:
        created = api.create_service(template, name=name, labels=invocation.labels,
                                     mode=ServiceMode("replicated", replicas=1))
        return str(created["ID"])
    except docker.errors.APIError as exc:
        if exc.status_code != 409:
            raise
        return str(api.inspect_service(name)["ID"])  # never launch the same invocation twice


def _gone(inspect: Any, ident: str) -> bool:
    """Whether the engine says the service or config ``ident`` is no more (``inspect``: how to look it up)."""
    try:
        inspect(ident)
        return False
    except docker.errors.NotFound:
        return True
    except ENGINE_ERRORS:
        return False


def _quietly(remove: Any, ident: str) -> int:
    try:
        remove(ident)
        return 1
    except ENGINE_ERRORS:
        return 0
