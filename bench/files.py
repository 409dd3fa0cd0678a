"""File-drop benchmark: files/s through the daemon against a plain script doing the same work, in the same run.

Prints its figures and writes them to bench/results/files.json. Needs the Docker engine and the
test images (`make services`). Run: `.venv/bin/python bench/files.py`.

- daemon: FILES files of 1 KiB already in a folder; a file trigger (mode "file") claims, reads and
  dispatches them in batches of BATCH through the docker executor (IN_FLIGHT at once) and moves each
  to done/; timed from the daemon's start until the last file is in done/.
- plain: a script that scans the same kind of folder, reads the files, runs each batch of BATCH
  with `containers.run` (the batch as a bind-mounted JSON file, IN_FLIGHT threads at once) and
  moves the files to done/: no claim, no durability, no records.

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
    daemon = Daemon(doc)
    done = drop / "done"
    async with anyio.create_task_group() as tg:
        started = time.perf_counter()
        tg.start_soon(lambda: daemon.run(handle_signals=False))
        while not done.exists() or sum(1 for _ in os.scandir(done)) < count:  # noqa: ASYNC110 (what is measured)
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - started
        daemon.stop()
    return count / elapsed


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    daemon_rates, plain_rates = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as work:
            plain_rates.append(plain_script(Path(work), args.files))
        with tempfile.TemporaryDirectory() as work:
            daemon_rates.append(anyio.run(through_daemon, Path(work), args.files))
    daemon_rate, plain_rate = statistics.median(daemon_rates), statistics.median(plain_rates)
    ratio = daemon_rate / plain_rate
    print(f"file mode, {args.files} files of 1 KiB, batches of {BATCH}, {IN_FLIGHT} in flight, docker executor:")
    print(f"    plain script (scan, read, containers.run, move): {plain_rate:.0f} files/s (median of {args.rounds})")
    print(f"    eventswarm file source: {daemon_rate:.0f} files/s (median of {args.rounds}) -> {ratio:.2f}x "
          f"(target >= 0.8x)")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    out = results / "files.json"
    out.write_text(json.dumps({"file_mode": {"files": args.files, "batch": BATCH, "in_flight": IN_FLIGHT,
                                             "daemon_files_per_s": round(daemon_rate, 1),
                                             "plain_files_per_s": round(plain_rate, 1), "ratio": round(ratio, 3),
                                             "daemon_rounds": [round(r, 1) for r in daemon_rates],
                                             "plain_rounds": [round(r, 1) for r in plain_rates]}}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
