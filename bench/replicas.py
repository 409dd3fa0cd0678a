"""Replicas benchmark: webhook async accepts/s of 1 and of 3 daemons (replicas) on one PostgreSQL database, beside
the single daemon on SQLite, measured in the same run.

Load: wrk, 32 connections in all (3 replicas: a wrk each, with 10 connections and 1 thread, at once), a 100-byte
JSON body, DURATION seconds per run, the median of ROUNDS runs of each, alternating; after each run every accepted event must have run (the inbox is empty, and as many events
ran as wrk counted 2xx answers). The daemon is `eventswarm run` with the process executor and a function that
discards its input, as in bench/webhook.py. PostgreSQL: scripts/postgres.sh's server, a new database per run.

Prints its figures and writes them to bench/results/replicas.json. Needs wrk and `make services`.
Run: `.venv/bin/python bench/replicas.py`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from webhook import WRK_SCRIPT, daemon, save

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
POSTGRES = "postgresql://postgres@127.0.0.1:15432/postgres"


def psql(sql: str, database: str = POSTGRES) -> str:
    return subprocess.run(["psql", database, "-tAqc", sql], capture_output=True, text=True, check=True).stdout.strip()


def on_sqlite(script: Path, workdir: Path) -> tuple[float, int]:
    return daemon(script, workdir)


def on_postgres(script: Path, workdir: Path, replicas: int = 1) -> tuple[float, int]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    psql(f'CREATE DATABASE "{name}"')
    url = POSTGRES.rsplit("/", 1)[0] + f"/{name}"

    def counts() -> tuple[int, int]:
        ran = psql("SELECT COALESCE(SUM(batch_size), 0) FROM invocations WHERE status = 'succeeded'", url)
        return int(ran), int(psql("SELECT COUNT(*) FROM inbox", url))

    try:
        return daemon(script, workdir, url, counts, replicas)
    finally:
        psql(f'DROP DATABASE "{name}" WITH (FORCE)')


def main() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("bench/replicas.py needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT)
        sqlite_rates, one_rates, three_rates = [], [], []
        for round_ in range(ROUNDS):
            sqlite_rates.append(on_sqlite(script, workdir)[0])
            one_rates.append(on_postgres(script, workdir)[0])
            three_rates.append(on_postgres(script, workdir, 3)[0])
            print(f"round {round_ + 1}: SQLite {sqlite_rates[-1]:,.0f} accepts/s, PostgreSQL 1 replica "
                  f"{one_rates[-1]:,.0f}, 3 replicas {three_rates[-1]:,.0f} (every accepted event run)")
    result = {"sqlite_accepts_per_s": statistics.median(sqlite_rates),
              "postgres_1_replica_accepts_per_s": statistics.median(one_rates),
              "postgres_3_replicas_accepts_per_s": statistics.median(three_rates),
              "rounds": ROUNDS, "cpus": os.cpu_count()}
    result["postgres_vs_sqlite"] = result["postgres_1_replica_accepts_per_s"] / result["sqlite_accepts_per_s"]
    result["3_replicas_vs_1"] = result["postgres_3_replicas_accepts_per_s"] / result["postgres_1_replica_accepts_per_s"]
    print(f"webhook accepts/s (median of {ROUNDS}, {os.cpu_count()} CPUs for everything): SQLite "
          f"{result['sqlite_accepts_per_s']:,.0f}; PostgreSQL 1 replica {result['postgres_1_replica_accepts_per_s']:,.0f} "
          f"({result['postgres_vs_sqlite']:.2f}x SQLite), 3 replicas {result['postgres_3_replicas_accepts_per_s']:,.0f} "
          f"({result['3_replicas_vs_1']:.2f}x 1 replica)")
    save("replicas", result)


if __name__ == "__main__":
    main()
