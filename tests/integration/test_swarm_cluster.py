"""The swarm executor on a Swarm of three nodes (scripts/swarm-cluster.sh: a manager and two workers, nested
dockerds), through the real daemon (``eventswarm run``) on the manager's TCP address with mutual TLS: batches
spread over the nodes, inputs on workers, a file read by path from a folder every node mounts, a spread over a node
label and a limit per node, and a worker killed under running jobs."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tests.cluster import CERTS, GATEWAY, MANAGER, NODES, WORKERS, Cluster, Forwarder
from tests.support import ROOT, base_config, free_port, post, store_of, toml, wait_until

ECHO = "eventswarm/echo:test"
BUSYBOX = "eventswarm/busybox:test"


def cluster_config(tmp_path: Path, cluster: Cluster, function: dict[str, Any], **trigger: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, port=free_port())
    doc["executor"] = cluster.executor(max_in_flight=24, start_timeout="60s")
    doc["functions"]["f"] = {"timeout": "90s", **function}
    doc["triggers"]["t"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/t"}, "ordering": "none",
                            "batch": {"max_events": 1, "max_wait": "10ms"}, **trigger}
    return doc


def send(daemon: Any, events: list[dict[str, Any]]) -> list[str]:
    ids = []
    for event in events:
        status, _, body = post(f"http://127.0.0.1:{daemon.port}/hooks/t", json.dumps(event).encode())
        assert status == 202, body
        ids.append(json.loads(body)["id"])
    return ids


def settled(doc: dict[str, Any], ids: list[str], timeout: float) -> list[Any]:
    """The succeeded records once every event of ``ids`` has one (fails on a deadline)."""
    def check() -> list[Any] | None:
        done = [r for r in store_of(doc).invocations(limit=10_000) if r.status == "succeeded"]
        ran = {i for r in done for i in r.event_ids}
        return done if ran >= set(ids) else None
    return wait_until(check, timeout=timeout, interval=0.5, what=f"{len(ids)} events run")


def no_leftovers(cluster: Cluster, nodes: tuple[str, ...] = (MANAGER, *WORKERS), timeout: float = 60) -> None:
    wait_until(lambda: not any(cluster.leftovers(n) for n in nodes), timeout=timeout, interval=0.5,
               what="nothing of eventswarm's left on " + ", ".join(nodes))


def test_sixty_batches_run_over_the_three_nodes_each_event_once(tmp_path, swarm_cluster, daemon_process):
    doc = cluster_config(tmp_path, swarm_cluster, {"image": ECHO})
    daemon = daemon_process(doc).start()
    ids = send(daemon, [{"n": i} for i in range(60)])
    done = settled(doc, ids, timeout=180)
    daemon.stop()

    assert len(done) == 60
    assert sorted(i for r in done for i in r.event_ids) == sorted(ids)  # each event once
    by_node: dict[str, int] = {}
    for record in done:
        by_node[record.node] = by_node.get(record.node, 0) + 1
    assert set(by_node) == {MANAGER, *WORKERS}, by_node
    # The output of a task on a worker came back through the manager's service logs.
    on_worker = next(r for r in done if r.node in WORKERS)
    assert json.loads(store_of(doc).logs(on_worker.id)[0])["events"][0]["data"] == \
        {"n": ids.index(on_worker.event_ids[0])}
    # The node of each: `invocations -o wide` (the CLI a user runs) and its JSON.
    done_wide = subprocess.run([sys.executable, "-m", "dispatcher", "invocations", "-c", str(daemon.config_file),
                                "-o", "wide", "--limit", "100"], capture_output=True, text=True, timeout=60)
    assert done_wide.returncode == 0, done_wide.stderr
    header, *rows = done_wide.stdout.splitlines()
    assert "NODE" in header.split()
    assert {next(w for w in row.split() if w.startswith("eventswarm-node-")) for row in rows} == set(by_node)
    done_json = subprocess.run([sys.executable, "-m", "dispatcher", "invocations", "-c", str(daemon.config_file),
                                "-o", "json", "--limit", "100"], capture_output=True, text=True, timeout=60)
    assert {r["node"] for r in json.loads(done_json.stdout)} == set(by_node)
    no_leftovers(swarm_cluster)


def test_inputs_on_a_worker_under_the_config_limit_and_over_it(tmp_path, swarm_cluster, daemon_process):
    doc = cluster_config(tmp_path, swarm_cluster, {"image": ECHO, "placement": ["node.role == worker"]},
                         batch={"max_events": 1, "max_bytes": "2MiB", "max_wait": "10ms"},
                         retry={"max_attempts": 1})
    daemon = daemon_process(doc).start()
    under, over = send(daemon, [{"blob": "u" * 400_000}, {"blob": "o" * 600_000}])

    def finished() -> list[Any] | None:
        records = [r for r in store_of(doc).invocations(limit=100) if r.finished_at]
        return records if len(records) == 2 else None

    records = wait_until(finished, timeout=120, interval=0.5, what="both batches finished")
    daemon.stop()
    by_event = {r.event_ids[0]: r for r in records}
    assert by_event[under].status == "succeeded" and by_event[under].node in WORKERS
    stdout = store_of(doc).logs(by_event[under].id)[0]
    assert json.loads(stdout)["events"][0]["data"] == {"blob": "u" * 400_000}
    assert by_event[over].status == "failed"
    assert "over the Swarm config limit" in (by_event[over].error or "")
    assert [letter.event["id"] for letter in store_of(doc).dead_letters()] == [over]
    no_leftovers(swarm_cluster)


def test_a_worker_reads_a_large_file_by_path_from_the_shared_folder(tmp_path, swarm_cluster, daemon_process):
    """A file source passes a file past ``max_inline`` by path: the function, on a worker, reads it from the folder
    every node mounts at the same path (as NFS would be)."""
    drop = swarm_cluster.shared / f"drop-{uuid.uuid4().hex[:12]}"
    drop.mkdir(mode=0o777)
    try:
        shared_file_run(tmp_path, swarm_cluster, daemon_process, drop)
    finally:
        shutil.rmtree(drop, ignore_errors=True)


def shared_file_run(tmp_path: Path, swarm_cluster: Cluster, daemon_process: Any, drop: Path) -> None:
    doc = cluster_config(tmp_path, swarm_cluster,
                         {"image": BUSYBOX, "placement": ["node.role == worker"],
                          "mounts": [f"{drop}:{drop}"],
                          "command": ["sh", "-c", "sed -n 's/.*\"path\": *\"\\([^\"]*\\)\".*/\\1/p' \"$EVENTSWARM_INPUT\""
                                      " | head -1 | xargs md5sum"]})
    doc["triggers"]["t"]["source"] = {"kind": "file", "path": str(drop), "max_inline": "1KiB", "on_success": "delete"}
    daemon = daemon_process(doc).start()
    big = drop / "big.bin"
    big.write_bytes(bytes(range(256)) * 4096)
    digest = hashlib.md5(big.read_bytes()).hexdigest()
    done = wait_until(lambda: [r for r in store_of(doc).invocations(limit=10) if r.status == "succeeded"] or None,
                      timeout=120, interval=0.5, what="the file's batch")
    daemon.stop()
    assert done[0].node in WORKERS
    assert digest in store_of(doc).logs(done[0].id)[0].decode()
    no_leftovers(swarm_cluster)


TIMED = ["sh", "-c", "cut -d' ' -f1 /proc/uptime; sleep {seconds}; cut -d' ' -f1 /proc/uptime"]
"""A function that prints when it started and ended, on the clock every node shares (the host's kernel)."""


def timed(seconds: float) -> list[str]:
    return [part.format(seconds=seconds) for part in TIMED]


def spans(doc: dict[str, Any], records: list[Any]) -> list[tuple[str, float, float]]:
    """(node, start, end) of each record's run, from the function's own output."""
    found = []
    for record in records:
        start, end = (float(line) for line in store_of(doc).logs(record.id)[0].split())
        found.append((record.node, start, end))
    return found


def most_at_once(runs: list[tuple[str, float, float]]) -> int:
    edges = sorted([(start, 1) for _, start, _ in runs] + [(end, -1) for _, _, end in runs])
    at_once = best = 0
    for _, step in edges:
        at_once += step
        best = max(best, at_once)
    return best


def test_a_spread_over_a_node_label_evens_the_jobs_over_its_values(tmp_path, swarm_cluster, daemon_process):
    """Zone a has one node, zone b two: spread over the zone, 8 jobs at once run 4 in each zone (Swarm alone would
    put about a third of them on zone a's node)."""
    doc = cluster_config(tmp_path, swarm_cluster, {"image": BUSYBOX, "command": timed(6),
                                                   "placement": {"preferences": [{"spread": "node.labels.zone"}]}},
                         max_in_flight=8)
    zones = {MANAGER: {"zone": "a"}, WORKERS[0]: {"zone": "b"}, WORKERS[1]: {"zone": "b"}}
    with swarm_cluster.labelled(zones):
        daemon = daemon_process(doc).start()
        ids = send(daemon, [{"n": i} for i in range(8)])
        done = settled(doc, ids, timeout=120)
        daemon.stop()
    runs = spans(doc, done)
    assert most_at_once(runs) == 8, runs  # all at once: the spread was decided over running jobs
    in_zone = {zone: sum(1 for node, _, _ in runs if zones[node]["zone"] == zone) for zone in "ab"}
    assert in_zone == {"a": 4, "b": 4}, runs
    no_leftovers(swarm_cluster)


def test_a_limit_per_node_holds_jobs_until_a_node_has_room(tmp_path, swarm_cluster, daemon_process):
    doc = cluster_config(tmp_path, swarm_cluster, {"image": BUSYBOX, "command": timed(4),
                                                   "placement": {"max_replicas_per_node": 1}})
    daemon = daemon_process(doc).start()
    ids = send(daemon, [{"n": i} for i in range(7)])
    done = settled(doc, ids, timeout=120)
    daemon.stop()
    runs = spans(doc, done)
    assert len(runs) == 7 and sorted(i for r in done for i in r.event_ids) == sorted(ids)
    for node in {node for node, _, _ in runs}:
        on_node = sorted((start, end) for name, start, end in runs if name == node)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(on_node)), (node, on_node)  # one at once
    assert most_at_once(runs) == 3, runs  # every node busy: one job each
    no_leftovers(swarm_cluster)


def test_a_worker_killed_under_running_jobs_loses_nothing_and_keeps_nothing(tmp_path, swarm_cluster, daemon_process):
    victim = WORKERS[1]
    doc = cluster_config(tmp_path, swarm_cluster,
                         {"image": BUSYBOX, "command": ["sh", "-c", "cat \"$EVENTSWARM_INPUT\" >/dev/null; sleep 12"]},
                         max_in_flight=18, retry={"max_attempts": 3, "initial": "1s", "jitter": False})
    daemon = daemon_process(doc).start()
    ids = send(daemon, [{"n": i} for i in range(18)])
    manager = swarm_cluster.engine(MANAGER)

    def running_on_victim() -> int | None:
        tasks = manager.api.tasks(filters={"label": "io.eventswarm.managed=true", "desired-state": "running"})
        tasks += manager.api.tasks(filters={"label": "io.eventswarm.managed=true", "desired-state": "complete"})
        running = [t for t in tasks if t["Status"]["State"] == "running"]
        nodes = {n["ID"]: n["Description"]["Hostname"] for n in manager.api.nodes()}
        on_victim = sum(1 for t in running if nodes.get(t.get("NodeID")) == victim)
        return on_victim if len(running) == 18 else None

    on_victim = wait_until(running_on_victim, timeout=60, interval=0.2, what="18 jobs running")
    assert on_victim >= 3, on_victim
    killed = time.monotonic()
    swarm_cluster.kill(victim)
    try:
        done = settled(doc, ids, timeout=180)
        recovered = time.monotonic() - killed
        print(f"{on_victim} jobs on {victim} when it was killed; every event had run {recovered:.1f} s after")
        records = store_of(doc).invocations(limit=1000)
        lost = [r for r in records if r.status == "failed"]
        assert len(lost) == on_victim, [(r.node, r.error) for r in records if r.status != "succeeded"]
        assert all(f"node {victim} is down" in (r.error or "") or f"{victim} is down" in (r.error or "") for r in lost)
        assert {r.node for r in done} <= {MANAGER, WORKERS[0]} | {victim}
        assert sorted(i for r in done for i in r.event_ids) == sorted(ids)  # every event once in success
        # Within the bound: the manager marks the node down (≤ 20 s), the job is given up (1 s), the retry (1 s)
        # runs 12 s.
        assert recovered < 20 + 1 + 1 + 12 + 20, recovered
    finally:
        swarm_cluster.start(victim)
        daemon.stop()
    wait_until(lambda: swarm_cluster.node_states().get(victim) == "ready", timeout=90, interval=0.5,
               what=f"{victim} back")
    no_leftovers(swarm_cluster, timeout=90)


def test_validate_checks_the_manager_over_tls_and_says_what_needs_shared_storage(tmp_path, swarm_cluster):
    doc = cluster_config(tmp_path, swarm_cluster, {"image": ECHO, "mounts": ["/srv/in:/in", "cache:/cache"]})
    doc["functions"]["g"] = {"image": "eventswarm/not-on-any-node:1"}
    path = tmp_path / "eventswarm.toml"
    path.write_text(toml(doc))
    done = subprocess.run([sys.executable, "-m", "dispatcher", "validate", "-c", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.splitlines()
    assert ("warning: functions.f.mounts: /srv/in is mounted from the host that runs the task: on a Swarm of several "
            "nodes it must be at that path on every node that may run the function") in done.stderr, warnings
    # The engine was asked (over TLS, with the config's keys): it has the one image and not the other.
    assert not any("functions.f.image" in w for w in warnings), warnings
    assert any(w.startswith("warning: functions.g.image: eventswarm/not-on-any-node:1 is not on the engine")
               for w in warnings), warnings
    assert len(warnings) == 2, warnings


STACK_CONFIG = """\
# deploy/eventswarm.toml's shape, with a function slow enough to be caught running by a node's death.
[daemon]
shutdown_grace = "30s"
log_format = "json"
replica_timeout = "6s"
# The replicas listen on the cluster's private network, which only this test reaches.
allow_unauthenticated = true

[executor]
kind = "swarm"
max_in_flight = 4
network = "none"
start_timeout = "60s"

[functions.slow]
image = "eventswarm/busybox:test"
command = ["sh", "-c", "cat \\"$EVENTSWARM_INPUT\\"; sleep 4"]
timeout = "60s"

[triggers.slow]
function = "slow"
source = { kind = "webhook", path = "/hooks/slow", mode = "async" }
batch = { max_events = 1, max_wait = "10ms" }
ordering = "none"
retry = { max_attempts = 6, initial = "1s", jitter = false }
"""
STACK_PORT = 18480


def stack_get(node: str, path: str) -> Any:
    """The JSON at ``path`` of the stack's replica on ``node``; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{NODES[node]}:{STACK_PORT}{path}", timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def live_replicas(node: str) -> set[str]:
    """The replicas the one on ``node`` sees live."""
    return {r["id"] for r in (stack_get(node, "/v1/status") or {}).get("replicas", []) if r["state"] == "live"}


def test_the_replicated_stack_one_replica_per_node_loses_nothing_when_a_node_dies(
        tmp_path, swarm_cluster, daemon_image, postgres_database):
    """deploy/stack-replicated.yml with stack-replicated-tls.yml on the three nodes: one replica per node, each
    reaching the manager over TLS, on one PostgreSQL database (reached from the nodes through a forwarder this test
    owns). A worker is killed with its replica while every replica has jobs running and webhooks waiting: the other
    two take its work over and every accepted event runs; the node comes back and a replica starts on it again."""
    swarm_cluster.load(daemon_image, tmp_path)
    database = urllib.parse.urlsplit(postgres_database)
    forwarder = Forwarder((GATEWAY, 0), (database.hostname or "127.0.0.1", database.port or 5432))
    state = database._replace(netloc=f"postgres@{GATEWAY}:{forwarder.address[1]}").geturl()
    config = tmp_path / "eventswarm.toml"
    config.write_text(STACK_CONFIG)
    stack = f"eventswarm-cluster-{os.getpid()}"
    victim = WORKERS[1]
    env = {"EVENTSWARM_IMAGE": daemon_image, "EVENTSWARM_PORT": str(STACK_PORT), "EVENTSWARM_LISTEN": "0.0.0.0",
           "EVENTSWARM_CONFIG_FILE": str(config), "EVENTSWARM_STATE": state,
           "EVENTSWARM_ENGINE": swarm_cluster.manager_url, "EVENTSWARM_TLS_DIR": str(CERTS),
           "EVENTSWARM_NODES": "node.platform.os == linux"}
    names = {f"{stack}_daemon.{slot}" for slot in (1, 2, 3)}
    try:
        swarm_cluster.cli("stack", "deploy", "--resolve-image", "never",
                          "-c", str(ROOT / "deploy" / "stack-replicated.yml"),
                          "-c", str(ROOT / "deploy" / "stack-replicated-tls.yml"), stack, env=env)
        try:
            for node in NODES:
                wait_until(lambda node=node: live_replicas(node) == names, timeout=180, interval=0.5,
                           what=f"the replica on {node}, seeing all three live")
            accepted: dict[str, str] = {}
            for n in range(36):
                node = list(NODES)[n % 3]
                status, _, body = post(f"http://{NODES[node]}:{STACK_PORT}/hooks/slow",
                                       json.dumps({"n": n}).encode())
                assert status == 202, body
                accepted[json.loads(body)["id"]] = node

            def jobs_on_victim() -> int | None:
                manager = swarm_cluster.engine(MANAGER)
                try:
                    tasks = manager.api.tasks(filters={"label": "io.eventswarm.managed=true",
                                                       "desired-state": "running"})
                    victim_id = next(n["ID"] for n in manager.api.nodes()
                                     if n["Description"]["Hostname"] == victim)
                finally:
                    manager.close()
                running = [t for t in tasks if t["Status"]["State"] == "running"]
                return sum(1 for t in running if t.get("NodeID") == victim_id) if len(running) >= 9 else None

            on_victim = wait_until(jobs_on_victim, timeout=60, interval=0.2, what="every replica's jobs running")
            victim_replica = stack_get(victim, "/v1/status")["replica"]
            swarm_cluster.kill(victim)
            killed = time.monotonic()

            def ran() -> list[dict[str, Any]] | None:
                records = stack_get(MANAGER, "/v1/invocations?trigger=slow&status=succeeded&limit=1000") or []
                done = {event for r in records for event in r["event_ids"]}
                return records if done >= set(accepted) else None

            records = wait_until(ran, timeout=240, interval=1, what="every accepted event run")
            taken_over = [r for r in records if accepted.get(r["event_ids"][0]) == victim
                          and r["replica"] != victim_replica]
            adopted = [r for r in records if "adopted by replica" in (r["error"] or "")]
            print(f"{on_victim} jobs on {victim} when it was killed; every event had run "
                  f"{time.monotonic() - killed:.1f} s after; of the 12 webhooks its replica had taken, the others "
                  f"ran {len(taken_over)}, {len(adopted)} of them jobs it had started (adopted)")
            assert taken_over, "none of the killed replica's webhooks was run by another replica"
            assert {r["node"] for r in records} >= {MANAGER, WORKERS[0]}

            swarm_cluster.start(victim)
            wait_until(lambda: live_replicas(victim) == names, timeout=180, interval=0.5,
                       what=f"a replica on {victim} again, seeing all three live")
            assert stack_get(victim, "/v1/status")["replica"] == victim_replica  # its slot, its name: its work
        finally:
            swarm_cluster.start(victim)
            wait_until(lambda: swarm_cluster.node_states().get(victim) == "ready", timeout=120, interval=0.5,
                       what=f"{victim} ready")
            swarm_cluster.cli("stack", "rm", stack, check=False)

            def stack_gone(node: str) -> bool:
                found = swarm_cluster.cli("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={stack}",
                                          node=node, check=False)
                return found.returncode == 0 and not found.stdout.strip()

            for node in NODES:
                wait_until(lambda node=node: stack_gone(node), timeout=120, interval=0.5,
                           what=f"the stack gone from {node}")
    finally:
        forwarder.close()
    no_leftovers(swarm_cluster, timeout=90)
