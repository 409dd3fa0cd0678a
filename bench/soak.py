"""Soak: a mixed load through one `eventswarm run` for a chosen time, watching what must stay flat.

The load (the defaults are those of the first soak, issue #27): webhooks at 300/s (async), Kafka records at
1,000/s into a 4-partition topic, and 5 files/s dropped into a folder; the process executor runs a function that
discards its input. The file source remembers files done for 5 minutes (`remember_done`; 7 days by default), so
that its memory reaches its bound within the run. Every 30 s it prints the daemon's RSS, open files and threads, the webhooks' p99 answer time
and the state store's size (the SQLite file and its WAL, and what the records are counted for against
`max_records_size`). At the end, once every accepted event has run (the daemon's `eventswarm_events_acked_total`:
the records may be pruned by then), it prints the records' bytes per event for each source (the invocation rows'
columns: the event ids, the logs, the rest) and writes everything to bench/results/soak.json.

Needs the broker (`make services`). Run: `.venv/bin/python bench/soak.py --minutes 10 [--budget 64MiB]`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.webhook import discarding, free_port, save, wait_ready  # noqa: E402
from tests.kafka import new_topic  # noqa: E402

BROKER = "127.0.0.1:19092"
TRIGGERS = ("hooks", "kafka", "files")
HOOK_CONNECTIONS = 4
"""Webhook senders, each on a kept-alive connection of its own (one could not keep up with a durable commit each)."""


def config(work: Path, port: int, topic: str, budget: str | None) -> Path:
    (work / "drop").mkdir()
    path = work / "eventswarm.toml"
    head = discarding("sqlite:///state.db", port, 8, **({"max_records_size": budget} if budget else {}))
    path.write_text(head + f"""
[triggers.hooks]
function = "discard"
source = {{ kind = "webhook", path = "/hooks/in" }}
ordering = "none"
batch = {{ max_events = 100, max_wait = "1s" }}

[triggers.kafka]
function = "discard"
source = {{ kind = "kafka", bootstrap_servers = ["{BROKER}"], topics = ["{topic}"], group_id = "soak-{topic}" }}
batch = {{ max_events = 500, max_wait = "1s" }}

[triggers.files]
function = "discard"
source = {{ kind = "file", path = "drop", patterns = ["*.json"], stable_for = "200ms", on_success = "delete", remember_done = "5m" }}
batch = {{ max_events = 20, max_wait = "1s" }}
""")
    return path


def paced(rate: float, stop: threading.Event, send: Callable[[int], int]) -> Callable[[], None]:
    """A loop that calls ``send(n)`` to send ``n`` more, keeping to ``rate`` per second on average."""
    def loop() -> None:
        began, sent = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - began) * rate) - sent
            if due > 0:
                sent += send(due)
            else:
                time.sleep(0.01)
    return loop


class Load:
    """The three generators, counting what each source accepted."""

    def __init__(self, port: int, topic: str, drop: Path, rates: dict[str, float]) -> None:
        from confluent_kafka import Producer

        self.stop = threading.Event()
        self.drop, self.topic = drop, topic
        self.producer = Producer({"bootstrap.servers": BROKER, "linger.ms": 5})
        self._body = json.dumps({"event": "vote.cast", "voter_id": 1234567, "padding": "x" * 40}).encode()
        self._hooks_accepted = [0] * HOOK_CONNECTIONS
        self.latencies: list[float] = []
        """Seconds from a webhook sent to its answer, since ``p99`` took them last."""
        self._counts = {"kafka": 0, "files": 0}
        senders = [(rates["hooks"] / HOOK_CONNECTIONS, self._hooks(port, i)) for i in range(HOOK_CONNECTIONS)]
        senders += [(rates["kafka"], self._kafka), (rates["files"], self._files)]
        self.threads = [threading.Thread(target=paced(rate, self.stop, send), daemon=True) for rate, send in senders]

    @property
    def accepted(self) -> dict[str, int]:
        return {"hooks": sum(self._hooks_accepted), **self._counts}

    def _hooks(self, port: int, i: int) -> Callable[[int], int]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def send(n: int) -> int:
            for _ in range(n):
                sent = time.monotonic()
                connection.request("POST", "/hooks/in", self._body, {"Content-Type": "application/json"})
                answer = connection.getresponse()
                answer.read()
                self.latencies.append(time.monotonic() - sent)
                if answer.status == 202:
                    self._hooks_accepted[i] += 1
            return n
        return send

    def _kafka(self, n: int) -> int:
        for i in range(n):
            self.producer.produce(self.topic, key=f"k{i % 100}".encode(), value=self._body)
        self.producer.poll(0)
        self._counts["kafka"] += n
        return n

    def _files(self, n: int) -> int:
        for _ in range(n):
            name = f"{time.monotonic_ns()}.json"
            (self.drop / f"{name}.tmp").write_bytes(self._body)
            os.rename(self.drop / f"{name}.tmp", self.drop / name)
            self._counts["files"] += 1
        return n

    def p99(self) -> float:
        """The webhooks' p99 answer time in ms since the last call (and forget them)."""
        taken, self.latencies = self.latencies, []
        return round(1000 * statistics.quantiles(taken, n=100)[98], 1) if len(taken) > 100 else 0.0

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        assert self.producer.flush(60) == 0


def sample(pid: int, work: Path) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    field = {line.split(":")[0]: line.split(":")[1].split() for line in status.splitlines() if ":" in line}
    state = sum(f.stat().st_size for f in work.glob("state.db*") if f.is_file())
    with sqlite3.connect(f"file:{work / 'state.db'}?mode=ro", uri=True, timeout=30) as conn:
        counted = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM record_bytes").fetchone()[0]
        oldest = conn.execute("SELECT MIN(queued_at) FROM invocations").fetchone()[0]
    return {"rss_mb": int(field["VmRSS"][0]) / 1024, "open_files": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(field["Threads"][0]), "state_mb": state / 1024 ** 2, "records_mb": counted / 1024 ** 2,
            "records_span_s": round(time.time() - oldest) if oldest else 0}


def ran(port: int) -> dict[str, int]:
    """Events acknowledged per trigger (the function discards: every event acknowledged ran and succeeded)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    acked = {name: 0 for name in TRIGGERS}
    for line in text.splitlines():
        if line.startswith("eventswarm_events_acked_total{"):
            labels, value = line.rsplit(" ", 1)
            acked[labels.split('trigger="')[1].split('"')[0]] = int(float(value))
    return acked


def record_bytes(work: Path) -> dict[str, dict[str, float]]:
    """Per source: the invocation rows' bytes per event, for the event ids, the logs and the rest of the row."""
    with sqlite3.connect(work / "state.db") as conn:
        rows = conn.execute(
            "SELECT trigger, SUM(batch_size), COUNT(*), SUM(LENGTH(event_ids) + COALESCE(LENGTH(ids), 0)), "
            "SUM(COALESCE(LENGTH(stdout), 0) + COALESCE(LENGTH(stderr), 0)), "
            "SUM(LENGTH(id) + LENGTH(trigger) + LENGTH(function) + LENGTH(status) + COALESCE(LENGTH(error), 0) "
            "+ COALESCE(LENGTH(executor_ref), 0) + LENGTH(replica) + 48) FROM invocations GROUP BY trigger").fetchall()
    return {name: {"events": events, "invocations": count, "event_ids_per_event": round(ids / events, 1),
                   "logs_per_event": round(logs / events, 1), "rest_per_event": round(rest / events, 1)}
            for name, events, count, ids, logs, rest in rows if events}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between two samples")
    parser.add_argument("--webhooks", type=float, default=300.0, help="webhooks per second")
    parser.add_argument("--records", type=float, default=1000.0, help="Kafka records per second")
    parser.add_argument("--files", type=float, default=5.0, help="files per second")
    parser.add_argument("--budget", help="max_records_size (default: the daemon's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eventswarm-soak-") as tmp:
        work = Path(tmp)
        port, topic = free_port(), new_topic(BROKER, 4, prefix="soak")
        path = config(work, port, topic, args.budget)
        daemon = subprocess.Popen([str(ROOT / ".venv" / "bin" / "eventswarm"), "run", "-c", str(path)])
        samples: list[dict[str, float]] = []
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", daemon, timeout=60)
            load = Load(port, topic, work / "drop",
                        {"hooks": args.webhooks, "kafka": args.records, "files": args.files})
            began = time.monotonic()
            load.start()
            while (elapsed := time.monotonic() - began) < args.minutes * 60:
                time.sleep(min(args.every, args.minutes * 60 - elapsed))
                samples.append({"at_s": round(time.monotonic() - began), **sample(daemon.pid, work),
                                "webhook_p99_ms": load.p99()})
                print("{at_s:>5}s  RSS {rss_mb:6.1f} MB  open files {open_files:4.0f}  threads {threads:3.0f}  "
                      "state {state_mb:7.2f} MB  records {records_mb:7.2f} MB over {records_span_s:5.0f} s  "
                      "webhook p99 {webhook_p99_ms:5.1f} ms"
                      .format(**samples[-1]), flush=True)
            load.finish()
            deadline = time.monotonic() + 300
            while any((done := ran(port))[n] < load.accepted[n] for n in TRIGGERS):
                if time.monotonic() > deadline:
                    raise SystemExit(f"accepted {load.accepted}, but only {done} ran")
                time.sleep(1)
            daemon.terminate()
            code = daemon.wait(timeout=120)
            sizes = record_bytes(work)
            state = sum(f.stat().st_size for f in work.glob("state.db*") if f.is_file())
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    total = sum(load.accepted.values())
    print(f"accepted and ran: {load.accepted} ({total:,} events); SIGTERM exit {code}")
    print(f"state store: {state / 1024 ** 2:.2f} MB, {state / total:.1f} bytes per event")
    for name, figures in sizes.items():
        print(f"  {name:6} {figures['events']:>9,} events in {figures['invocations']:>6,} invocations: "
              f"event ids {figures['event_ids_per_event']} B/event, logs {figures['logs_per_event']} B/event, "
              f"the rest {figures['rest_per_event']} B/event")
    save("soak", {"minutes": args.minutes, "budget": args.budget, "rates": {"webhooks": args.webhooks, "records": args.records,
                                                     "files": args.files},
                  "accepted": load.accepted, "exit": code, "samples": samples, "state_bytes": state,
                  "state_bytes_per_event": state / total, "records": sizes})


if __name__ == "__main__":
    main()
