"""Replicas benchmark, first part: webhook async accepts/s of one daemon on PostgreSQL beside the single daemon on
SQLite, measured in the same run (several replicas on one database come with issue #14's next steps; this file
will measure 3 of them beside these two).

Load: wrk, 32 connections, 2 threads, a 100-byte JSON body, DURATION seconds per run, the median of ROUNDS runs
of each, alternating; after each run every accepted event must have run (the inbox is empty, and as many events
ran as wrk counted 2xx answers). The daemon is `eventswarm run` with the process executor and a function that
discards its input, as in bench/webhook.py. PostgreSQL: scripts/postgres.sh's server, a new database per run.

Prints its figures and writes them to bench/results/replicas.json. Needs wrk and `make services`.
Run: `.venv/bin/python bench/replicas.py`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from webhook import WRK_SCRIPT, free_port, wait_ready, wrk

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
POSTGRES = "postgresql://postgres@127.0.0.1:15432/postgres"


def psql(sql: str, database: str = POSTGRES) -> str:
    return subprocess.run(["psql", database, "-tAqc", sql], capture_output=True, text=True, check=True).stdout.strip()


def run_daemon(script: Path, workdir: Path, state: str, count: str) -> tuple[float, int]:
    """One wrk run against a daemon on ``state``; ``count`` is a command printing (ran, waiting)."""
    port = free_port()
    config = workdir / "eventswarm.toml"
    config.write_text(f"""
[daemon]
state = "{state}"
listen = "127.0.0.1:{port}"
log_level = "warning"

[executor]
kind = "process"
max_in_flight = 4

[functions.discard]
command = ["sh", "-c", "cat > /dev/null"]

[triggers.hooks]
function = "discard"
source = {{ kind = "webhook", path = "/hooks/in" }}
ordering = "none"
max_in_flight = 4
buffer = 20000
batch = {{ max_events = 1000, max_wait = "50ms" }}
""")
    process = subprocess.Popen([str(ROOT / ".venv" / "bin" / "eventswarm"), "run", "-c", str(config)])
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", process)
        rate, accepted = wrk(port, script)
        deadline = time.monotonic() + 120
        ran = waiting = 0
        while time.monotonic() < deadline:
            ran, waiting = count()  # type: ignore[operator]
            if ran >= accepted and not waiting:
                break
            time.sleep(0.2)
        if ran < accepted or waiting:
            raise SystemExit(f"{state}: accepted {accepted} events but {ran} ran ({waiting} still waiting)")
        return rate, accepted
    finally:
        process.terminate()
        process.wait()


def on_sqlite(script: Path, workdir: Path) -> tuple[float, int]:
    import sqlite3

    state = workdir / f"state-{time.monotonic_ns()}.db"

    def count() -> tuple[int, int]:
        with sqlite3.connect(state) as conn:
            ran = conn.execute("SELECT COALESCE(SUM(batch_size), 0) FROM invocations WHERE status = 'succeeded'"
                               ).fetchone()[0]
            return ran, conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]

    return run_daemon(script, workdir, f"sqlite:///{state}", count)  # type: ignore[arg-type]


def on_postgres(script: Path, workdir: Path) -> tuple[float, int]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    psql(f'CREATE DATABASE "{name}"')
    url = POSTGRES.rsplit("/", 1)[0] + f"/{name}"

    def count() -> tuple[int, int]:
        ran = psql("SELECT COALESCE(SUM(batch_size), 0) FROM invocations WHERE status = 'succeeded'", url)
        return int(ran), int(psql("SELECT COUNT(*) FROM inbox", url))

    try:
        return run_daemon(script, workdir, url, count)  # type: ignore[arg-type]
    finally:
        psql(f'DROP DATABASE "{name}" WITH (FORCE)')


def main() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("bench/replicas.py needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT)
        sqlite_rates, postgres_rates = [], []
        for round_ in range(ROUNDS):
            sqlite_rates.append(on_sqlite(script, workdir)[0])
            postgres_rates.append(on_postgres(script, workdir)[0])
            print(f"round {round_ + 1}: SQLite {sqlite_rates[-1]:,.0f} accepts/s, PostgreSQL (1 daemon) "
                  f"{postgres_rates[-1]:,.0f} accepts/s (every accepted event run)")
    result = {"sqlite_accepts_per_s": statistics.median(sqlite_rates),
              "postgres_1_replica_accepts_per_s": statistics.median(postgres_rates),
              "rounds": ROUNDS}
    result["postgres_vs_sqlite"] = result["postgres_1_replica_accepts_per_s"] / result["sqlite_accepts_per_s"]
    print(f"webhook accepts/s (median of {ROUNDS}): SQLite {result['sqlite_accepts_per_s']:,.0f}, PostgreSQL with "
          f"1 daemon {result['postgres_1_replica_accepts_per_s']:,.0f} ({result['postgres_vs_sqlite']:.2f}x)")
    out = ROOT / "bench" / "results" / "replicas.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
