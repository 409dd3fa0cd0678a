"""Records past a small size budget under steady webhook load: the state store stays within the budget (by a
stated margin), pruning does not stall intake (the accept latency is measured and printed, not asserted: a test
does not time things), and every accepted event runs."""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dispatcher.retention import LOW_WATER
from tests.faults.conftest import ran_counts
from tests.support import DaemonProcess, base_config, free_port, post, toml, wait_until

BUDGET = 5 * 1024 * 1024
EVENTS = 4000
LOG_BYTES = 4000
"""Each invocation prints this much: about 4.4 KB a record, so the budget holds about 1,200 of the 4,000."""
MARGIN = 0.1
"""How far past the budget the records may go: what the daemon writes between two checks (2 s), at the rate this
test sends (measured: well under it)."""


def counted(state: Path) -> tuple[int, int]:
    """(bytes the records are counted for, records), read as the CLI reads."""
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=30) as db:
        size = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM record_bytes").fetchone()[0]
        return int(size), int(db.execute("SELECT COUNT(*) FROM invocations").fetchone()[0])


def test_records_past_a_small_budget_stay_within_it_and_nothing_accepted_is_lost(tmp_path):
    ran = tmp_path / "ran"
    ran.mkdir()
    port = free_port()
    doc = base_config(tmp_path, executor="process", port=port, max_records_size="5MiB")
    state = tmp_path / "state.db"
    script = f'cat > "$RAN/$EVENTSWARM_BATCH_ID.json"; printf "%{LOG_BYTES}s"'
    doc["functions"]["record"] = {"command": ["sh", "-c", script], "env": {"RAN": str(ran)}, "timeout": "60s"}
    doc["triggers"]["hooks"] = {"function": "record", "source": {"kind": "webhook", "path": "/hooks/in"},
                                "ordering": "none", "max_in_flight": 8, "batch": {"max_events": 1}}
    config = tmp_path / "eventswarm.toml"
    config.write_text(toml(doc))
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log").start()

    samples: list[tuple[float, int, int, int]] = []  # (time, counted bytes, records, file bytes)
    sending = threading.Event()
    sending.set()

    def sample() -> None:
        while sending.is_set():
            size, records = counted(state)
            samples.append((time.monotonic(), size, records, state.stat().st_size))
            time.sleep(0.1)

    accepted: dict[str, tuple[float, float]] = {}  # id -> (sent at, seconds to the 202)
    url = f"http://127.0.0.1:{port}/hooks/in"

    def send(n: int) -> None:
        at = time.monotonic()
        status, _, body = post(url, json.dumps({"n": n}).encode())
        assert status == 202, (status, body)
        accepted[json.loads(body)["id"]] = (at, time.monotonic() - at)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, range(EVENTS)))
        wait_until(lambda: set(accepted) <= set(ran_counts(ran)), timeout=120, what="every accepted event to run")
        wait_until(lambda: counted(state)[0] <= BUDGET, timeout=30, what="the records to be pruned to the budget")
    finally:
        sending.clear()
        watcher.join()
    assert daemon.stop() == 0

    lost = set(accepted) - set(ran_counts(ran))
    highest = max(size for _, size, _, _ in samples)
    pruned_from = next((t for t, size, _, _ in samples if size > BUDGET * LOW_WATER), None)
    during = sorted(latency for at, latency in accepted.values() if pruned_from is not None and at >= pruned_from)
    before = sorted(latency for at, latency in accepted.values() if pruned_from is None or at < pruned_from)
    final_size, final_records = counted(state)
    log = daemon.log.read_text()
    figures = {
        "accepted": len(accepted), "lost": len(lost), "budget": BUDGET, "highest_counted": highest,
        "final_counted": final_size, "final_records": final_records, "file_bytes": state.stat().st_size,
        "p99_accept_ms_before_pruning": round(1000 * statistics.quantiles(before, n=100)[98], 2) if len(before) > 100 else None,
        "p99_accept_ms_while_pruning": round(1000 * statistics.quantiles(during, n=100)[98], 2) if len(during) > 100 else None,
    }
    print("records past a 5 MiB budget:", json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert not lost, f"{len(lost)} accepted events never ran"
    assert pruned_from is not None and len(during) > 100, "the records never reached the budget under load"
    assert highest <= BUDGET * (1 + MARGIN), figures
    assert final_records < EVENTS / 2, figures  # pruned by size (keep_invocations is 7 days)
    assert state.stat().st_size <= BUDGET * (1 + MARGIN) + 1024 * 1024, figures  # the file, and what else it holds
    assert "younger than keep_invocations" in log and log.count("younger than keep_invocations") == 1, log[-2000:]
