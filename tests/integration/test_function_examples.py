"""The examples of docs/functions.md run as the page says, through a real daemon (process executor, `eventswarm
run`): Python, Node.js and shell under the cold contract, partial failure, and args mode."""

from __future__ import annotations

import json
from typing import Any

from tests.support import ROOT, DaemonProcess, free_port, post, store_of, toml, wait_until


def test_the_documented_functions_run_as_the_page_says(tmp_path):
    port = free_port()
    functions = {
        "python": ["python3", "docs/examples/handler.py"],
        "node": ["node", "docs/examples/handler.js"],
        "shell": ["sh", "docs/examples/handler.sh"],
        "partial": ["python3", "docs/examples/partial.py"],
        "vote": ["sh", "docs/examples/vote.sh"],
    }
    doc: dict[str, Any] = {
        "daemon": {"state": "sqlite:///state.db", "listen": f"127.0.0.1:{port}", "shutdown_grace": "10s"},
        "executor": {"kind": "process"},
        "functions": {name: {"command": command, "workdir": str(ROOT), "timeout": "30s"}
                      for name, command in functions.items()},
        "triggers": {name: {"function": name, "source": {"kind": "webhook", "path": f"/hooks/{name}", "mode": "sync"}}
                     for name in ("python", "node", "shell")},
    }
    doc["functions"]["vote"]["args"] = ["{data.voter}", "{data.choice}"]
    doc["triggers"]["vote"] = {"function": "vote", "source": {"kind": "webhook", "path": "/hooks/vote", "mode": "sync"}}
    doc["triggers"]["partial"] = {"function": "partial", "source": {"kind": "webhook", "path": "/hooks/partial"},
                                  "batch": {"max_events": 3, "max_wait": "5s"}, "ordering": "none",
                                  "retry": {"max_attempts": 1}}
    (tmp_path / "eventswarm.toml").write_text(toml(doc))
    daemon = DaemonProcess(tmp_path / "eventswarm.toml", port, tmp_path / "daemon.log").start()
    try:
        for name in ("python", "node"):
            status, _, body = post(f"http://127.0.0.1:{port}/hooks/{name}", b'{"order": 7}')
            assert status == 200, (name, body)
            (line,) = body.decode().splitlines()
            assert json.loads(line)["data"] == {"order": 7} and json.loads(line)["type"], (name, line)
        status, _, body = post(f"http://127.0.0.1:{port}/hooks/shell", b'{"order": 7}')
        assert status == 200, body
        first, second = body.decode().splitlines()
        assert first.startswith("batch ") and first.endswith("of trigger shell: 1 events (attempt 1)"), first
        assert second.split() == ["1", '"type":"eventswarm.webhook.request"'], second
        status, _, body = post(f"http://127.0.0.1:{port}/hooks/vote", b'{"voter": "ada", "choice": "b"}')
        assert (status, body) == (200, b"voter ada chose b\n")

        for amount in (5, -1, 7):
            assert post(f"http://127.0.0.1:{port}/hooks/partial", json.dumps({"amount": amount}).encode())[0] == 202
        store = store_of({"daemon": {"state": f"sqlite:///{tmp_path / 'state.db'}"}})
        (letter,) = wait_until(lambda: store.dead_letters(trigger="partial"), timeout=30, what="the one dead letter")
        assert letter.event["data"] == {"amount": -1}
        records = store.invocations(trigger="partial", limit=10)
        batches = [r for r in records if r.batch_size == 3]
        assert len(batches) == 1, [(r.batch_size, r.status, r.error) for r in records]
        ran = batches[0]
        out, err = store.logs(ran.id)
        assert out.decode().count("charged") == 2 and b"a negative amount" in err
        assert wait_until(lambda: store.inbox_size("partial") == 0, timeout=30, what="the good events settled")
    finally:
        assert daemon.stop() == 0
