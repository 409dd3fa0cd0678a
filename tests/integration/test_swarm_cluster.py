"""The swarm executor on a Swarm of three nodes (scripts/swarm-cluster.sh: a manager and two workers, nested
dockerds), through the real daemon (``eventswarm run``) on the manager's TCP address with mutual TLS: batches
spread over the nodes, inputs on workers, a file read by path from a folder every node mounts, a spread over a node
label and a limit per node, and a worker killed under running jobs."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.cluster import MANAGER, WORKERS, Cluster
from tests.support import base_config, free_port, post, store_of, toml, wait_until

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
    doc = cluster_config(tmp_path, swarm_cluster, {"image": BUSYBOX, "command": timed(10),
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
