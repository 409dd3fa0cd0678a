"""Webhook benchmark: async accepts/s through the daemon (each stored durably, with a FULL commit, before its 202),
against a bare aiohttp handler answering 202 on the same machine, in the same run.

Load: wrk, 32 connections, 2 threads, a 100-byte JSON body, DURATION seconds per run; the median of ROUNDS
runs of each, alternating. The daemon runs as `eventswarm run` (a process of its own, as users run it) with
the process executor and a function that discards its input; after each run the bench waits until every
accepted event has run: the inbox is empty, and at least as many events ran as wrk counted 2xx answers.

Prints its figures and writes them to bench/results/webhook.json. Needs wrk (`apt-get install wrk`).
Run: `.venv/bin/python bench/webhook.py`.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5
DURATION = 8
CONNECTIONS = 32
BODY = json.dumps({"event": "vote.cast", "voter_id": 1234567, "choice": "b", "padding": "x" * 40})

BARE = """
import sys
from aiohttp import web
async def accept(request):
    await request.read()
    return web.json_response({"id": "x"}, status=202)
app = web.Application()
app.router.add_post("/hooks/in", accept)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = [[{BODY}]]
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers: ready
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} never answered")


def wrk(port: int, script: Path, connections: int = CONNECTIONS, threads: int = 2) -> tuple[float, int]:
    """(requests/s, 2xx answers) of one run."""
    done = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{DURATION}s", "-s", str(script),
                           f"http://127.0.0.1:{port}/hooks/in"], capture_output=True, text=True, check=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", done.stdout).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    errors = re.search(r"Socket errors: .*", done.stdout)
    if errors:
        print(f"  wrk: {errors.group(0)}")
    return rate, total - (int(bad.group(1)) if bad else 0)


def bare(script: Path) -> tuple[float, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", BARE, str(port)])
    try:
        wait_ready(f"http://127.0.0.1:{port}/hooks/in", process)
        return wrk(port, script)
    finally:
        process.terminate()
        process.wait()


def save(name: str, result: dict[str, object]) -> None:
    """Write a benchmark's figures to bench/results/<name>.json."""
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def sqlite_counts(state: Path) -> Callable[[], tuple[int, int]]:
    """(events that ran, events still in the inbox) of the daemon on SQLite file ``state``."""
    def count() -> tuple[int, int]:
        with sqlite3.connect(state) as conn:
            ran = conn.execute("SELECT COALESCE(SUM(batch_size), 0) FROM invocations WHERE status = 'succeeded'"
                               ).fetchone()[0]
            return int(ran), int(conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])
    return count


def discarding(state: str, port: int, max_in_flight: int, replica: str = "", **daemon: str) -> str:
    """A config's head for the benches: the state, the address, the process executor and a function, ``discard``,
    that reads its input and throws it away; ``daemon``: more keys of ``[daemon]`` (strings)."""
    more = "".join(f'{key} = "{value}"\n' for key, value in daemon.items())
    return f"""
[daemon]
state = "{state}"
listen = "127.0.0.1:{port}"
{f'replica = "{replica}"' if replica else ""}
log_level = "warning"
{more}
[executor]
kind = "process"
max_in_flight = {max_in_flight}

[functions.discard]
command = ["sh", "-c", "cat > /dev/null"]
"""


def daemon(script: Path, workdir: Path, state: str | None = None,
           counts: Callable[[], tuple[int, int]] | None = None, replicas: int = 1,
           command: list[str] | None = None, env: dict[str, str] | None = None) -> tuple[float, int]:
    """One wrk run against `eventswarm run` on ``state`` (default: a new SQLite file); ``counts`` reads (events that
    ran, events still in the inbox) from it. Every accepted event must run. With ``replicas`` (on PostgreSQL), as
    many daemons on the one state, each loaded by a wrk of its own with its share of the connections, at once.
    ``command``: how to start the daemon (default this tree's `eventswarm`; `run -c CONFIG` follows); ``env``: its
    environment."""
    if state is None:
        path = workdir / f"state-{time.monotonic_ns()}.db"
        state, counts = f"sqlite:///{path}", sqlite_counts(path)
    assert counts is not None
    ports = [free_port() for _ in range(replicas)]
    processes = []
    try:
        for n, port in enumerate(ports):
            config = workdir / f"eventswarm-{n}.toml"
            config.write_text(discarding(state, port, 4, replica=f"bench-{n}") + """
[triggers.hooks]
function = "discard"
source = { kind = "webhook", path = "/hooks/in" }
ordering = "none"
max_in_flight = 4
buffer = 20000
batch = { max_events = 1000, max_wait = "50ms" }
""")
            processes.append(subprocess.Popen([*(command or [str(ROOT / ".venv" / "bin" / "eventswarm")]), "run", "-c",
                                               str(config)], env=env))
        for port, process in zip(ports, processes, strict=True):
            wait_ready(f"http://127.0.0.1:{port}/readyz", process)
        with ThreadPoolExecutor(replicas) as pool:
            runs = list(pool.map(lambda port: wrk(port, script, CONNECTIONS // replicas, 1 if replicas > 1 else 2), ports))
        rate, accepted = sum(r for r, _ in runs), sum(a for _, a in runs)
        deadline = time.monotonic() + 120
        ran = 0
        while time.monotonic() < deadline:
            ran, waiting = counts()
            if ran >= accepted and not waiting:
                break
            time.sleep(0.2)
        # wrk does not count the answers still on their way when it stops: the daemon may have accepted a few more.
        if ran < accepted or waiting:
            raise SystemExit(f"accepted {accepted} events but {ran} ran ({waiting} still waiting)")
        return rate, accepted
    finally:
        for process in processes:
            process.terminate()
            process.wait()


def main() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("bench/webhook.py needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT)
        bare_rates, daemon_rates, accepted = [], [], 0
        for round_ in range(ROUNDS):
            rate, _ = bare(script)
            bare_rates.append(rate)
            rate, count = daemon(script, workdir)
            daemon_rates.append(rate)
            accepted += count
            print(f"round {round_ + 1}: bare aiohttp {bare_rates[-1]:,.0f} req/s, eventswarm {rate:,.0f} accepts/s "
                  f"({count:,} accepted, every one run)")
    result = {
        "bare_aiohttp_requests_per_s": statistics.median(bare_rates),
        "eventswarm_accepts_per_s": statistics.median(daemon_rates),
        "ratio": statistics.median(daemon_rates) / statistics.median(bare_rates),
        "accepted_and_run": accepted,
        "connections": CONNECTIONS, "seconds_per_run": DURATION, "rounds": ROUNDS, "synchronous": "FULL",
    }
    print(f"webhook (async, FULL commits): {result['eventswarm_accepts_per_s']:,.0f} accepts/s vs "
          f"{result['bare_aiohttp_requests_per_s']:,.0f} req/s bare = {result['ratio']:.2f}x (median of {ROUNDS})")
    save("webhook", result)


if __name__ == "__main__":
    main()
