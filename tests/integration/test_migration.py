"""A state store made by the previous schema (``tests/data/state-v2``: records whose event ids are JSON, by the
daemon at 59563fc) is migrated when opened: its records, logs and dead letters read as before through the CLI,
their bytes are counted for the budget, and the daemon runs on it, writing packed records beside the old ones."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from dispatcher.schema import MIGRATIONS, RECORD_OVERHEAD
from tests.integration.test_cli import cli
from tests.support import DaemonProcess, free_port, post, wait_until

MADE_BY_V2 = Path(__file__).parent.parent / "data" / "state-v2"

RECORDS = {  # id -> (trigger, status, event ids), as the daemon at 59563fc wrote them
    "dd9b7de5a4457fe386c5e5fa5c8adfcc": ("broken", "failed", ["b34b2c03a289e6093f38b5cde4d6f101"]),
    "e6f526bfcdf474eeb9bf58763ca681fc": ("orders", "succeeded", ["2ee4f615147c4edbd97698c14079dc2c",
                                                                 "9edebb2dc94221ce793c6dda88365989"]),
    "bdaa59100d5dd038905da4550cab9f4a": ("orders", "succeeded", ["810a29a38e066eb384cb7fc1878dc7c1"]),
    "2cd5613e20e390e20eac5c91760a7b44": ("orders", "succeeded", ["1d95b7b36a2fa113213757e8412bf6db"]),
    "1dc4793ddacf7d89630d9c0357450524": ("orders", "succeeded", ["541a5f07cb73f630aa3f76beaf0cfe17"]),
}


def test_a_store_made_by_the_previous_schema_reads_as_before_and_the_daemon_runs_on_it(tmp_path):
    for name in ("state.db", "eventswarm.toml"):
        shutil.copy(MADE_BY_V2 / name, tmp_path / name)
    with sqlite3.connect(tmp_path / "state.db") as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 2
        before = raw.execute(f"SELECT SUM({RECORD_OVERHEAD} + length(event_ids) + COALESCE(length(stdout), 0) "
                             "+ COALESCE(length(stderr), 0)) FROM invocations").fetchone()[0]

    listed = json.loads(cli(tmp_path, "invocations", "-o", "json").stdout)
    assert {r["id"]: (r["trigger"], r["status"], r["event_ids"]) for r in listed} == RECORDS
    shown = json.loads(cli(tmp_path, "invocations", "show", "e6f526bf", "-o", "json").stdout)
    assert shown["event_ids"] == RECORDS["e6f526bfcdf474eeb9bf58763ca681fc"][2] and shown["batch_size"] == 2
    assert json.loads(cli(tmp_path, "logs", "e6f526bf").stdout)["trigger"] == "orders"  # its logs: the input it read
    (letter,) = json.loads(cli(tmp_path, "dlq", "list", "-o", "json").stdout)
    assert letter["event"]["id"] == "b34b2c03a289e6093f38b5cde4d6f101"
    with sqlite3.connect(tmp_path / "state.db") as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert raw.execute("SELECT SUM(bytes) FROM record_bytes").fetchone()[0] == before  # the old records, counted

    port = free_port()
    config = tmp_path / "eventswarm.toml"
    config.write_text(config.read_text().replace("127.0.0.1:18931", f"127.0.0.1:{port}"))
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log").start()
    try:
        sent = [json.loads(post(f"http://127.0.0.1:{port}/hooks/orders", b'{"n": 6}')[2])["id"] for _ in range(3)]
        wait_until(lambda: set(sent) <= {e for r in json.loads(cli(tmp_path, "invocations", "--status", "succeeded",
                                                                     "-o", "json").stdout) for e in r["event_ids"]},
                   timeout=30, what="the new events to run")
    finally:
        assert daemon.stop() == 0
    listed = json.loads(cli(tmp_path, "invocations", "-o", "json").stdout)
    assert {r["id"]: (r["trigger"], r["status"], r["event_ids"]) for r in listed if r["id"] in RECORDS} == RECORDS
    with sqlite3.connect(tmp_path / "state.db") as raw:
        new = raw.execute("SELECT event_ids, ids FROM invocations WHERE ids IS NOT NULL").fetchall()
        assert new and all(text == "" and len(packed) < 60 for text, packed in new)  # packed: 16 bytes an id, not 35
        counted = raw.execute("SELECT SUM(bytes) FROM record_bytes").fetchone()[0]
        assert counted == raw.execute("SELECT SUM(400 + length(event_ids) + COALESCE(length(ids), 0) + "
                                      "COALESCE(length(stdout), 0) + COALESCE(length(stderr), 0)) FROM invocations").fetchone()[0]
