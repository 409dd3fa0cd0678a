"""The schedule source through the real daemon (``eventswarm run``, the process executor): every tick once, in order;
a kill -9 and a restart with each ``catch_up``; ``overlap = "skip"`` with a function slower than the interval; and
``eventswarm schedule next``."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import base_config, free_port, store_of, wait_until


def schedule_config(tmp_path: Path, command: list[str] | None = None, **source: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, executor="process", port=free_port())
    doc["functions"]["f"] = {"command": command or ["cat"], "timeout": "30s"}
    doc["triggers"]["beat"] = {"function": "f", "source": {"kind": "schedule", "every": "1s", **source},
                               "batch": {"max_events": 1, "max_wait": "10ms"}, "ordering": "none"}
    return doc


def tick_events(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The tick events that ran in success, as the function got them, in the order they started."""
    store = store_of(doc)
    records = sorted((r for r in store.invocations(limit=10_000) if r.status == "succeeded"),
                     key=lambda r: r.started_at or 0)
    return [json.loads(store.logs(r.id)[0])["events"][0] for r in records]


def at(text: str) -> float:
    return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone


def test_every_second_for_twenty_seconds_runs_each_tick_once_in_order(tmp_path, daemon_process):
    doc = schedule_config(tmp_path)
    daemon = daemon_process(doc).start()
    began = time.monotonic()

    def status() -> dict[str, Any] | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/v1/status", timeout=10) as response:
            schedule = json.loads(response.read())["triggers"][0]["schedule"]
        return schedule if schedule and schedule["last_tick"] else None

    schedule = wait_until(status, timeout=10, interval=0.2, what="a last tick in the status")
    assert schedule["next_tick"] > schedule["last_tick"]
    shown = subprocess.run([sys.executable, "-m", "dispatcher", "status", "-c", str(daemon.config_file)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and re.search(r"^beat: next tick \S+ \(in .*\), last tick \S+$", shown.stdout,
                                               re.MULTILINE), shown.stdout
    time.sleep(max(0.0, 20 - (time.monotonic() - began)))  # (the run's length is what is tested: 20 s of ticks)
    daemon.stop()
    events = tick_events(doc)
    ticks = [at(e["time"]) for e in events]
    assert 19 <= len(ticks) <= 21, ticks
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)  # in order, each once
    assert all(b - a == 1 for a, b in itertools.pairwise(ticks))  # none skipped
    for event in events:
        assert event["type"] == "eventswarm.schedule.tick" and event["data"]["scheduled"] == event["time"]
        assert event["id"] == "beat/" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at(event["time"])))
        assert event["data"]["late_seconds"] < 1 and not event["data"]["again"]


def test_a_kill_9_for_ten_seconds_then_the_missed_ticks_run_as_catch_up_says(tmp_path, daemon_process):
    """Three daemons at once, one per ``catch_up`` (each its own state), all killed and restarted together."""
    modes = ("all", "last", "none")
    docs = {}
    for mode in modes:
        (tmp_path / mode).mkdir()
        docs[mode] = schedule_config(tmp_path / mode, catch_up=mode)
    daemons = {mode: daemon_process(docs[mode], name=mode) for mode in modes}
    for daemon in daemons.values():
        daemon.start()
    for mode in modes:
        wait_until(lambda mode=mode: len(tick_events(docs[mode])) >= 3, timeout=30, interval=0.2,
                   what=f"3 ticks before the kill ({mode})")
    for daemon in daemons.values():
        daemon.kill()
    killed = time.time()
    time.sleep(10)  # (the downtime is what is tested)
    for daemon in daemons.values():
        daemon.start()
    restarted = time.time()
    for mode in modes:
        wait_until(lambda mode=mode: any(at(e["time"]) > restarted + 2 for e in tick_events(docs[mode])), timeout=30,
                   interval=0.2, what=f"3 ticks after the restart ({mode})")
    for mode in modes:
        daemons[mode].stop()
        check_catch_up(docs[mode], daemons[mode].log.read_text(), mode, killed)


def check_catch_up(doc: dict[str, Any], log: str, mode: str, killed: float) -> None:
    events = tick_events(doc)
    ticks = [at(e["time"]) for e in events]
    assert len(set(ticks)) == len(ticks), f"{mode}: a tick ran twice"
    before = [at(e["time"]) for e in events if at(e["data"]["fired"]) < killed or e["data"]["again"]]
    # The restarted daemon says which ticks it found missed: after the newest fired before the kill, up to this one.
    found = re.search(r"ticks missed up to (\S+) \(", log)
    assert found, log[-2000:]
    back = at(found.group(1))
    missed = list(range(int(max(before)) + 1, int(back) + 1))
    assert len(missed) >= 10, (mode, max(before), back)
    ran = sorted(at(e["time"]) for e in events if max(before) < at(e["time"]) <= back and not e["data"]["again"])
    expected = {"all": missed, "last": missed[-1:], "none": []}[mode]
    assert ran == expected, (mode, ran, missed)
    assert f"catch_up = {mode!r} fires {len(expected)} of them" in log
    after = sorted(t for t in ticks if t > back)
    assert after and all(b - a == 1 for a, b in itertools.pairwise(after)), mode  # on time again, none skipped


def test_overlap_skip_never_runs_two_ticks_at_once_and_counts_the_skipped(tmp_path, daemon_process):
    doc = schedule_config(tmp_path, ["sh", "-c", "cat >/dev/null; sleep 2.5"], overlap="skip")
    daemon = daemon_process(doc).start()
    wait_until(lambda: len([r for r in store_of(doc).invocations(limit=100) if r.status == "succeeded"]) >= 3,
               timeout=60, interval=0.2, what="3 slow ticks run")
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    daemon.stop()
    records = sorted((r for r in store_of(doc).invocations(limit=100) if r.started_at), key=lambda r: r.started_at)
    for first, second in itertools.pairwise(records):
        assert first.finished_at is not None and first.finished_at <= second.started_at, "two ticks ran at once"
    skipped = re.search(r'eventswarm_events_dropped_total\{reason="overlap",trigger="beat"\} (\S+)', metrics)
    assert skipped and float(skipped.group(1)) >= 4, metrics[:2000]
    assert "skipped: the invocation of tick" in daemon.log.read_text()


def test_schedule_next_prints_the_ticks_on_the_zones_wall_clock(tmp_path):
    doc = schedule_config(tmp_path)
    doc["triggers"]["beat"]["source"] = {"kind": "schedule", "cron": "30 2 * * *", "timezone": "Europe/Berlin"}
    from tests.support import toml

    path = tmp_path / "eventswarm.toml"
    path.write_text(toml(doc))
    done = subprocess.run([sys.executable, "-m", "dispatcher", "schedule", "next", "beat", "-c", str(path), "-n", "3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(re.match(r"\d{4}-\d\d-\d\dT0[23]:[03]0:00\+0[12]:00  CES?T  \(", line)
                                   for line in lines), lines
    bad = subprocess.run([sys.executable, "-m", "dispatcher", "schedule", "next", "nope", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no trigger 'nope'" in bad.stderr
