"""The file-drop source through a real daemon and real containers (the docker executor)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support import BUSYBOX, base_config, free_port, running_daemon, store_of, toml, wait_for, wait_until

pytestmark = pytest.mark.anyio

PRINT_NAMES = "grep -o '\"filename\":\"[^\"]*\"' | cut -d'\"' -f4"
"""A function that prints the file name of each event of its batch, one per line."""


@pytest.fixture(autouse=True)
def engine(docker_engine):
    return docker_engine


def config(tmp_path: Path, script: str = PRINT_NAMES, *, executor: str = "docker", source: dict[str, Any] | None = None,
           **trigger: Any) -> dict[str, Any]:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    doc = base_config(tmp_path, executor=executor)
    doc["functions"]["f"] = {"image": BUSYBOX, "command": ["sh", "-c", script], "timeout": "60s"}
    doc["triggers"]["t"] = {"function": "f", "ordering": "none", "max_in_flight": 4,
                            "source": {"kind": "file", "path": str(drop), "patterns": ["*.json", "*.txt", "*.bin"],
                                       "stable_for": "200ms", **(source or {})},
                            "batch": {"max_events": 100, "max_wait": "100ms"},
                            "retry": {"max_attempts": 2, "initial": "50ms", "jitter": False}, **trigger}
    return doc


def drop_files(folder: Path, count: int, start: int = 0) -> list[str]:
    """Write files as a producer should (a hidden temporary name, then a rename); their names."""
    names = []
    for n in range(start, start + count):
        name = f"{n:05d}.json"
        (folder / f".{name}").write_text(json.dumps({"n": n}))
        (folder / f".{name}").rename(folder / name)
        names.append(name)
    return names


def event_id(name: str, content: bytes) -> str:
    """The id of a dropped file's event: its path and content, so the same file keeps its id."""
    return hashlib.sha256(f"{name}\0{hashlib.sha256(content).hexdigest()}".encode()).hexdigest()[:32]


def names_in(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.json")} if folder.exists() else set()


def runs_by_name(doc) -> dict[str, int]:
    """How many invocations (of any outcome) each file name ran in, from what the functions printed."""
    store = store_of(doc)
    counts: dict[str, int] = {}
    for record in store.invocations(limit=100_000):
        for name in store.logs(record.id)[0].decode().split():
            counts[name] = counts.get(name, 0) + 1
    return counts


async def test_1000_files_dropped_at_once_are_all_processed_and_moved_to_done(tmp_path):
    doc = config(tmp_path)
    drop = tmp_path / "drop"
    names = drop_files(drop, 1000)
    async with running_daemon(doc):
        await wait_for(lambda: len(names_in(drop / "done")) == 1000, timeout=120, interval=0.2,
                       what="every file in done/")
    assert names_in(drop) == set() and not list((drop / ".processing").rglob("*.json"))
    counts = runs_by_name(doc)
    assert set(counts) == set(names) and set(counts.values()) == {1}


async def test_a_file_written_slowly_is_dispatched_once_complete_with_its_whole_content(tmp_path):
    doc = config(tmp_path, "cat", source={"stable_for": "1s"})
    drop = tmp_path / "drop"
    chunks = [f"line {i}\n" for i in range(7)]
    async with running_daemon(doc):
        with (drop / "slow.txt").open("w") as f:
            for chunk in chunks:  # 3 s of writing, a chunk every 0.5 s (the input's pace, not a synchronisation)
                f.write(chunk)
                f.flush()
                await anyio.sleep(0.5)
        await wait_for(lambda: (drop / "done" / "slow.txt").exists(), timeout=30,
                       what="the file in done/")
    records = store_of(doc).invocations(limit=100)
    assert len(records) == 1
    doc_in = json.loads(store_of(doc).logs(records[0].id)[0])
    assert [e["data"] for e in doc_in["events"]] == ["".join(chunks)]
    event = doc_in["events"][0]
    assert event["filename"] == "slow.txt" and event["filesize"] == len("".join(chunks))
    assert event["sha256"] == hashlib.sha256("".join(chunks).encode()).hexdigest()


async def test_files_dropped_while_the_daemon_was_stopped_are_processed_after_it_starts(tmp_path):
    doc = config(tmp_path)
    drop = tmp_path / "drop"
    async with running_daemon(doc):
        first = drop_files(drop, 10)
        await wait_for(lambda: names_in(drop / "done") == set(first), timeout=60, what="the first files done")
    later = drop_files(drop, 25, start=10)  # while no daemon runs
    async with running_daemon(doc):
        await wait_for(lambda: names_in(drop / "done") == set(first) | set(later), timeout=60,
                       what="the files dropped meanwhile done")
    assert set(runs_by_name(doc).values()) == {1}


async def test_a_failing_function_moves_its_file_to_failed_with_the_reason_after_its_retries(tmp_path):
    doc = config(tmp_path, "if grep -q poison; then echo 'cannot parse it' >&2; exit 3; fi; cat >/dev/null",
                 source={"stable_for": "100ms"})
    drop = tmp_path / "drop"
    good = drop_files(drop, 5)
    (drop / "bad.json").write_text('{"poison": true}')
    async with running_daemon(doc):
        await wait_for(lambda: (drop / "failed" / "bad.json").exists() and len(names_in(drop / "done")) == 5,
                       timeout=60, what="bad.json in failed/ and the others in done/")
    assert names_in(drop / "done") == set(good)
    reason = json.loads((drop / "failed" / "bad.json.error.json").read_text())
    assert reason["status"] == "dead-lettered" and reason["exit_code"] == 3 and reason["file"] == "bad.json"
    assert reason["sha256"] == hashlib.sha256(b'{"poison": true}').hexdigest()
    bad = event_id("bad.json", b'{"poison": true}')
    failed = [r for r in store_of(doc).invocations(status="failed", limit=100) if bad in r.event_ids]
    assert len(failed) >= 2, "moved to failed/ before its retries were used"
    assert reason["invocation_id"] in {r.id for r in failed}
    assert "cannot parse it" in store_of(doc).logs(reason["invocation_id"])[1].decode()


@pytest.mark.parametrize("executor", ["docker", "swarm"])
async def test_a_file_over_max_inline_reaches_the_function_through_a_mount(tmp_path, executor):
    drop = tmp_path / "drop"
    script = ("path=$(grep -o '\"path\":\"[^\"]*\"' \"$EVENTSWARM_INPUT\" | cut -d'\"' -f4); "
              "wc -c < \"$path\"; sha256sum \"$path\"")
    doc = config(tmp_path, script, executor=executor, source={"max_inline": "1KiB"})
    doc["functions"]["f"]["mounts"] = [f"{drop}:{drop}"]
    content = os.urandom(300 * 1024)
    async with running_daemon(doc):
        (drop / ".big.bin").write_bytes(content)
        (drop / ".big.bin").rename(drop / "big.bin")
        await wait_for(lambda: (drop / "done" / "big.bin").exists(), timeout=60, what="big.bin in done/")
    [record] = store_of(doc).invocations(limit=10)
    out = store_of(doc).logs(record.id)[0].decode().split()
    assert record.status == "succeeded"
    assert out[0] == str(len(content)) and out[1] == hashlib.sha256(content).hexdigest()


def test_validate_warns_when_no_mount_covers_the_watched_folder(tmp_path):
    doc = config(tmp_path)
    path = tmp_path / "eventswarm.toml"
    path.write_text(toml(doc))
    done = subprocess.run([sys.executable, "-m", "dispatcher", "validate", "-c", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"warning: functions.f.mounts: no mount covers {tmp_path / 'drop'}" in done.stderr
    doc["functions"]["f"]["mounts"] = [f"{tmp_path}:/data"]
    path.write_text(toml(doc))
    done = subprocess.run([sys.executable, "-m", "dispatcher", "validate", "-c", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "warning" not in done.stderr


async def test_a_missing_folder_leaves_the_daemon_up_and_the_source_starts_once_it_exists(tmp_path):
    doc = config(tmp_path)
    drop = tmp_path / "later"
    doc["triggers"]["t"]["source"]["path"] = str(drop)
    doc["triggers"]["hook"] = {"function": "f", "source": {"kind": "webhook", "path": "/hooks/h"}}
    async with running_daemon(doc, ready=False) as daemon:
        trigger = daemon.triggers["t"]
        await wait_for(lambda: trigger.source_error, timeout=30, what="the source's error")
        assert f"folder {drop} does not exist" in trigger.status()["last_error"]
        report = await daemon._ready()
        assert report["sources"]["t"] is False
        await wait_for(lambda: daemon.triggers["hook"].ready, timeout=30, what="the other trigger")
        drop.mkdir()
        names = drop_files(drop, 3)
        await wait_for(lambda: names_in(drop / "done") == set(names), timeout=60,
                       what="the files done once the folder exists")


def test_kill_9_while_500_files_are_processed_loses_none_and_reruns_only_batches_in_flight(tmp_path, daemon_process):
    doc = config(tmp_path, PRINT_NAMES + "; sleep 0.5", batch={"max_events": 20, "max_wait": "50ms"})
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    drop = tmp_path / "drop"
    names = drop_files(drop, 500)
    daemon = daemon_process(doc).start()
    wait_until(lambda: len(names_in(drop / "done")) >= 100, timeout=120, what="a fifth of the files done")
    daemon.kill()
    done_before = names_in(drop / "done")
    store = store_of(doc)
    # In flight at the kill: batches running, and batches that had finished whose files were not moved yet (the
    # move is the acknowledgement, after the record: a kill between the two runs them again, at least once).
    done_ids = {event_id(name, (drop / "done" / name).read_bytes()) for name in done_before}
    in_flight = {i for r in store.invocations(limit=1000) if r.status in ("running", "succeeded")
                 for i in r.event_ids} - done_ids
    assert len(done_before) < 500, "everything finished before the kill"
    daemon = daemon_process(doc).start()
    wait_until(lambda: len(names_in(drop / "done")) == 500, timeout=180, interval=0.2, what="all 500 files in done/")
    assert daemon.stop() == 0
    assert names_in(drop / "done") == set(names) and not list((drop / ".processing").rglob("*.json"))
    counts = runs_by_name(doc)
    assert set(counts) == set(names)
    twice = {name for name, n in counts.items() if n > 1}
    assert not twice & done_before, "a file that was in done/ before the kill ran again"
    ids = {name: event_id(name, (drop / "done" / name).read_bytes()) for name in twice}
    assert set(ids.values()) <= in_flight, "a file ran twice that was not in a batch in flight at the kill"


PRINT_DATA = "grep -o '\"data\":\"[^\"]*\"' | cut -d'\"' -f4"
"""A function that prints the data (the line) of each event of its batch, one per line."""


def delivered_lines(doc) -> list[str]:
    """The lines functions printed, in the order their invocations started (first delivery first)."""
    store = store_of(doc)
    lines: list[str] = []
    for record in sorted(store.invocations(status="succeeded", limit=100_000), key=lambda r: r.started_at or 0):
        lines += store.logs(record.id)[0].decode().split()
    return lines


def test_lines_across_a_rename_rotation_a_copytruncate_and_a_kill_9_are_all_delivered_in_order(
        tmp_path, daemon_process):
    logs = tmp_path / "logs"
    logs.mkdir()
    doc = config(tmp_path, PRINT_DATA, ordering="partition", batch={"max_events": 500, "max_wait": "50ms"},
                 source={"path": str(logs), "mode": "lines", "patterns": ["app.log"]})
    del doc["triggers"]["t"]["source"]["stable_for"]  # a key of file mode
    doc["daemon"]["listen"] = f"127.0.0.1:{free_port()}"
    log = logs / "app.log"
    daemon = daemon_process(doc).start()

    def write(f, numbers) -> None:
        f.write("".join(f"L{n:05d}\n" for n in numbers))
        f.flush()

    def seen() -> int:
        return len(set(delivered_lines(doc)))

    with log.open("a") as first:
        write(first, range(3000))
        wait_until(lambda: seen() >= 3000, timeout=60, interval=0.2, what="the first 3000 lines")
        log.rename(logs / "app.log.1")  # rename rotation; the writer keeps its handle a moment
        write(first, range(3000, 3100))
    with log.open("a") as second:
        write(second, range(3100, 7000))
        wait_until(lambda: seen() >= 7000, timeout=60, interval=0.2, what="7000 lines")
        subprocess.run(["cp", str(log), str(logs / "app.log.2")], check=True)  # copytruncate
        os.truncate(log, 0)
        write(second, range(7000, 10_000))
    daemon.kill()
    assert seen() < 10_000, "every line was delivered before the kill: it tests nothing"
    daemon = daemon_process(doc).start()
    wait_until(lambda: seen() == 10_000, timeout=120, interval=0.2, what="all 10000 lines after the restart")
    assert daemon.stop() == 0
    lines = delivered_lines(doc)
    assert set(lines) == {f"L{n:05d}" for n in range(10_000)}
    first_seen = list(dict.fromkeys(lines))
    for low, high in ((0, 3100), (3100, 7000), (7000, 10_000)):  # each file's lines, in order
        part = [line for line in first_seen if low <= int(line[1:]) < high]
        assert part == sorted(part), f"lines {low}-{high} out of order"
