"""File-drop benchmark: files/s through the daemon against a plain script doing the same work, in the same run.

Prints its figures and writes them to bench/results/files.json. Needs the Docker engine and the
test images (`make services`). Run: `.venv/bin/python bench/files.py`.

- daemon: FILES files of 1 KiB already in a folder; a file trigger (mode "file") claims, reads and
  dispatches them in batches of BATCH through the docker executor (IN_FLIGHT at once) and moves each
  to done/; timed from the daemon's start (store open, executor reached) until the last file is in done/.
- plain: a script that scans the same kind of folder, reads the files, runs each batch of BATCH
  with `containers.run` (the batch as a bind-mounted JSON file, IN_FLIGHT threads at once) and
  moves the files to done/: no claim, no durability, no records.

- lines: LINES lines of about 100 bytes in one file; a file trigger in mode "lines" hands them to the
  process executor (`cat >/dev/null`) in batches of LINE_BATCH, IN_FLIGHT at once, offsets saved as
  batches settle; timed from the daemon's start until every line is acknowledged. Against a plain
  script that reads the same lines, wraps each in a JSON object and pipes batches of the same size
  to the same command (IN_FLIGHT threads at once), with no durability.

Each is the median of ROUNDS runs, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher.config import parse  # noqa: E402
from dispatcher.daemon import Daemon  # noqa: E402

IMAGE = "eventswarm/busybox:test"
FILES = 2000
BATCH = 100
IN_FLIGHT = 4
ROUNDS = 3
LINES = 1_000_000
LINE_BATCH = 10_000
COMMAND = ["sh", "-c", "cat >/dev/null"]


def make_files(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    body = json.dumps({"payload": "x" * 1000})[:1024]
    for n in range(count):
        (folder / f"{n:06d}.json").write_text(body)


def settle(folder: Path) -> None:
    """Make the files old enough to count as complete at once (as files dropped a while ago)."""
    past = time.time() - 60
    for path in folder.iterdir():
        os.utime(path, (past, past))


async def through_daemon(work: Path, count: int) -> float:
    drop = work / "drop"
    make_files(drop, count)
    settle(drop)
    doc = parse({
        "daemon": {"state": f"sqlite:///{work}/state.db", "listen": "127.0.0.1:0"},
        "executor": {"kind": "docker", "max_in_flight": IN_FLIGHT},
        "functions": {"f": {"image": IMAGE, "command": ["sh", "-c", "cat >/dev/null"], "timeout": "60s"}},
        "triggers": {"t": {"function": "f", "ordering": "none", "max_in_flight": IN_FLIGHT, "buffer": 4 * BATCH,
                           "source": {"kind": "file", "path": str(drop), "patterns": ["*.json"], "stable_for": "10ms"},
                           "batch": {"max_events": BATCH, "max_bytes": "16MiB", "max_wait": "50ms"}}},
    })
    done = drop / "done"
    return count / await timed(Daemon(doc), lambda: done.exists() and sum(1 for _ in os.scandir(done)) >= count)


async def timed(daemon: Daemon, finished: Callable[[], bool]) -> float:
    """Seconds from the daemon's start (its store open, its executor reached, its sources about to start)
    until ``finished()``; the plain script's clock, likewise, starts with its Docker client made."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        await daemon.started.wait()
        started = time.perf_counter()
        while not finished():  # noqa: ASYNC110 (what is measured)
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - started
        daemon.stop()
    return elapsed


def plain_script(work: Path, count: int) -> float:
    drop = work / "drop"
    make_files(drop, count)
    done = drop / "done"
    client = docker.from_env(max_pool_size=IN_FLIGHT + 4)

    def run_batch(names: list[str]) -> None:
        events = [{"file": name, "data": json.loads((drop / name).read_text())} for name in names]
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as f:
            json.dump({"events": events}, f)
        client.containers.run(IMAGE, ["sh", "-c", "cat /input.json >/dev/null"], network_mode="none", remove=True,
                              volumes={f.name: {"bind": "/input.json", "mode": "ro"}})
        os.unlink(f.name)
        for name in names:
            os.rename(drop / name, done / name)

    started = time.perf_counter()
    done.mkdir()
    names = sorted(e.name for e in os.scandir(drop) if e.is_file() and e.name.endswith(".json"))
    batches = [names[i:i + BATCH] for i in range(0, len(names), BATCH)]
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(run_batch, batches))
    return count / (time.perf_counter() - started)


def make_log(path: Path, count: int) -> None:
    with path.open("w") as f:
        for n in range(0, count, 10_000):
            f.write("".join(f"{i:010d} GET /api/v1/items?page={i % 97} 200 {i % 9973}ms agent=bench/1.0 "
                            f"{'x' * 30}\n" for i in range(n, min(count, n + 10_000))))


async def lines_through_daemon(work: Path, count: int) -> float:
    logs = work / "logs"
    logs.mkdir()
    make_log(logs / "app.log", count)
    doc = parse({
        "daemon": {"state": f"sqlite:///{work}/state.db", "listen": "127.0.0.1:0"},
        "executor": {"kind": "process", "max_in_flight": IN_FLIGHT},
        "functions": {"f": {"command": COMMAND, "timeout": "60s"}},
        "triggers": {"t": {"function": "f", "ordering": "none", "max_in_flight": IN_FLIGHT, "buffer": 4 * LINE_BATCH,
                           "source": {"kind": "file", "path": str(logs), "patterns": ["*.log"], "mode": "lines"},
                           "batch": {"max_events": LINE_BATCH, "max_bytes": "64MiB", "max_wait": "50ms"}}},
    })
    daemon = Daemon(doc)
    acked = daemon.metrics.events_acked.labels("t")
    return count / await timed(daemon, lambda: acked._value.get() >= count)


def lines_plain_script(work: Path, count: int) -> float:
    import subprocess

    path = work / "app.log"
    make_log(path, count)

    def run_batch(lines: list[str]) -> None:
        subprocess.run(COMMAND, input="\n".join(json.dumps({"data": line}) for line in lines).encode(), check=True)

    def batches():  # type: ignore[no-untyped-def]
        with path.open() as f:
            batch: list[str] = []
            for line in f:
                batch.append(line.rstrip("\n"))
                if len(batch) == LINE_BATCH:
                    yield batch
                    batch = []
            if batch:
                yield batch

    started = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(run_batch, batches()))
    return count / (time.perf_counter() - started)


def rounds(count: int, plain: Callable[[Path, int], float], daemon: Callable[[Path, int], Awaitable[float]],
           size: int) -> tuple[list[float], list[float]]:
    """``count`` rounds of the plain script and the daemon, alternating, each in a fresh folder: their rates."""
    daemon_rates, plain_rates = [], []
    for _ in range(count):
        with tempfile.TemporaryDirectory() as work:
            plain_rates.append(plain(Path(work), size))
        with tempfile.TemporaryDirectory() as work:
            daemon_rates.append(anyio.run(daemon, Path(work), size))
    return daemon_rates, plain_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--lines", type=int, default=LINES)
    parser.add_argument("--only", choices=["file", "lines"], default=None)
    args = parser.parse_args()
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    out = results / "files.json"
    figures = json.loads(out.read_text()) if out.exists() else {}
    if args.only != "lines":
        figures["file_mode"] = file_mode(args)
    if args.only != "file":
        figures["lines_mode"] = lines_mode(args)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {out}")


def lines_mode(args: argparse.Namespace) -> dict[str, object]:
    daemon_rates, plain_rates = rounds(args.rounds, lines_plain_script, lines_through_daemon, args.lines)
    daemon_rate, plain_rate = statistics.median(daemon_rates), statistics.median(plain_rates)
    ratio = daemon_rate / plain_rate
    print(f"lines mode, {args.lines} lines of about 100 bytes, batches of {LINE_BATCH}, {IN_FLIGHT} in flight, "
          "process executor:")
    print(f"    plain script (read, wrap in JSON, pipe to the command): {plain_rate:.0f} lines/s "
          f"(median of {args.rounds})")
    print(f"    eventswarm file source: {daemon_rate:.0f} lines/s (median of {args.rounds}) -> {ratio:.2f}x "
          f"(target >= 0.5x)")
    return {"lines": args.lines, "batch": LINE_BATCH, "in_flight": IN_FLIGHT,
            "daemon_lines_per_s": round(daemon_rate, 1), "plain_lines_per_s": round(plain_rate, 1),
            "ratio": round(ratio, 3), "daemon_rounds": [round(r, 1) for r in daemon_rates],
            "plain_rounds": [round(r, 1) for r in plain_rates]}


def file_mode(args: argparse.Namespace) -> dict[str, object]:
    daemon_rates, plain_rates = rounds(args.rounds, plain_script, through_daemon, args.files)
    daemon_rate, plain_rate = statistics.median(daemon_rates), statistics.median(plain_rates)
    ratio = daemon_rate / plain_rate
    print(f"file mode, {args.files} files of 1 KiB, batches of {BATCH}, {IN_FLIGHT} in flight, docker executor:")
    print(f"    plain script (scan, read, containers.run, move): {plain_rate:.0f} files/s (median of {args.rounds})")
    print(f"    eventswarm file source: {daemon_rate:.0f} files/s (median of {args.rounds}) -> {ratio:.2f}x "
          f"(target >= 0.8x)")
    return {"files": args.files, "batch": BATCH, "in_flight": IN_FLIGHT, "daemon_files_per_s": round(daemon_rate, 1),
            "plain_files_per_s": round(plain_rate, 1), "ratio": round(ratio, 3),
            "daemon_rounds": [round(r, 1) for r in daemon_rates], "plain_rounds": [round(r, 1) for r in plain_rates]}


if __name__ == "__main__":
    main()
