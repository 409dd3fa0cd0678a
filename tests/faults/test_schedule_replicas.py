"""The schedule source on two replicas (``eventswarm run``, one PostgreSQL database): the holder of the schedule's
lease killed with kill -9, and paused with SIGSTOP past its lease; every tick fires once over the whole run."""

from __future__ import annotations

import itertools
import signal
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from dispatcher.store import event_ids_of
from tests.faults.test_replicas import replica_config, rows
from tests.support import wait_until


def schedule_replica(tmp_path: Any, database: str, name: str) -> dict[str, Any]:
    doc = replica_config(tmp_path, database, name)
    doc["functions"]["f"] = {"command": ["cat"]}
    doc["triggers"]["beat"] = {"function": "f", "source": {"kind": "schedule", "every": "1s", "catch_up": "all"},
                               "batch": {"max_events": 1, "max_wait": "10ms"}, "ordering": "none"}
    return doc


def ticks_run(database: str) -> list[tuple[float, str]]:
    """(tick, replica) of every invocation that succeeded, in tick order."""
    found = []
    for ids, packed, replica in rows(database, "SELECT event_ids, ids, replica FROM invocations "
                                               "WHERE status = 'succeeded'"):
        for event_id in event_ids_of(ids, packed):
            moment = datetime.strptime(event_id.split("/", 1)[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            found.append((moment.timestamp(), replica))
    return sorted(found)


def holder(database: str) -> str | None:
    held = rows(database, "SELECT holder FROM leases WHERE expires_at > 0")
    return held[0][0] if held else None


def check_every_tick_once(database: str) -> list[tuple[float, str]]:
    run = ticks_run(database)
    counts = Counter(tick for tick, _ in run)
    assert [t for t, n in counts.items() if n > 1] == [], "ticks fired twice"
    ticks = sorted(counts)
    assert all(b - a == 1 for a, b in itertools.pairwise(ticks)), "a tick was lost"  # (catch_up = "all")
    return run


def test_the_holder_killed_with_9_the_other_replica_fires_the_schedule_on_and_no_tick_twice(
        tmp_path, daemon_process, postgres_database):
    first = daemon_process(schedule_replica(tmp_path, postgres_database, "a"), name="a").start()
    wait_until(lambda: holder(postgres_database) == "a", timeout=30, what="a to hold the schedule's lease")
    second = daemon_process(schedule_replica(tmp_path, postgres_database, "b"), name="b").start()
    wait_until(lambda: len(ticks_run(postgres_database)) >= 4, timeout=30, interval=0.2, what="4 ticks on a")
    first.kill()
    killed = time.time()
    wait_until(lambda: sum(1 for tick, r in ticks_run(postgres_database) if r == "b" and tick > killed + 2) >= 3,
               timeout=30, interval=0.2, what="b to fire the schedule")
    assert second.stop() == 0
    run = check_every_tick_once(postgres_database)
    assert {r for _, r in run} == {"a", "b"}
    print(f"{len(run)} ticks, each once: {sum(1 for _, r in run if r == 'a')} on a, then b from "
          f"{min(t for t, r in run if r == 'b') - killed:+.1f} s after the kill")


def test_a_paused_holder_resumes_and_its_late_fire_is_refused(tmp_path, daemon_process, postgres_database):
    first = daemon_process(schedule_replica(tmp_path, postgres_database, "a"), name="a").start()
    wait_until(lambda: holder(postgres_database) == "a", timeout=30, what="a to hold the schedule's lease")
    second = daemon_process(schedule_replica(tmp_path, postgres_database, "b"), name="b").start()
    wait_until(lambda: len(ticks_run(postgres_database)) >= 3, timeout=30, interval=0.2, what="3 ticks on a")
    assert first.proc is not None
    first.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: holder(postgres_database) == "b", timeout=30, what="b to take the lease")
        wait_until(lambda: sum(1 for _, r in ticks_run(postgres_database) if r == "b") >= 3, timeout=30,
                   interval=0.2, what="b to fire the schedule")
    finally:
        first.proc.send_signal(signal.SIGCONT)
    assert first.proc.wait(timeout=60) == 1  # it learns that it was taken over, and stops
    assert second.stop() == 0
    check_every_tick_once(postgres_database)
    terms = rows(postgres_database, "SELECT token, holder, refused FROM lease_terms WHERE name = 'trigger/beat' "
                                    "ORDER BY token")
    assert [t[1] for t in terms] == ["a", "b"], terms
    log = first.log.read_text()
    assert terms[0][2] >= 1 and "checkpoint write refused" in log, (terms, log[-3000:])
    assert "Traceback" not in log + second.log.read_text()
