"""A full disk under the state store and the functions' scratch files: no 202 for an event not stored, no crash,
and everything accepted runs once space returns, without a restart (even rounds) or after a kill -9 (odd rounds)."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.faults.conftest import ran_counts, recording_daemon
from tests.support import post, wait_until

ROUNDS = 6
REFUSALS = 20
MAX_POSTS_PER_ROUND = 3000


def readiness(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_full_disk_loses_no_accepted_event_and_the_daemon_recovers_by_itself(tmp_path, small_disk):
    daemon, ran = recording_daemon(tmp_path, small_disk.path, env={"TMPDIR": str(small_disk.path)})
    daemon.start()
    gate = tmp_path / "gate"
    url = f"http://127.0.0.1:{daemon.port}/hooks/in"
    accepted: set[str] = set()
    store_errors = 0
    padding = "x" * 4000

    def send(n: int) -> tuple[int, dict, bytes]:
        return post(url, json.dumps({"n": n, "padding": padding}).encode(), timeout=30)

    try:
        for round_ in range(ROUNDS):
            gate.touch()  # what is accepted now waits in the daemon, unrun
            small_disk.fill(leave=[0, 64 * 1024, 256 * 1024][round_ % 3])
            refused = sent = 0
            with ThreadPoolExecutor(8) as pool:
                # Until the disk has refused a few events: the log's space already allocated is written first.
                while refused < REFUSALS and sent < MAX_POSTS_PER_ROUND:
                    for status, headers, body in pool.map(send, range(sent, sent + 16)):
                        assert status in (202, 503), (status, body)
                        if status == 202:
                            accepted.add(json.loads(body)["id"])
                        else:
                            refused += 1
                            assert headers.get("Retry-After"), "a 503 without Retry-After"
                            # Not ready while the store fails (a probe write may succeed again in between, near full).
                            status, report = readiness(daemon.port)
                            store_errors += status == 503 and report["store"] != "ok"
                    sent += 16
            assert refused, f"round {round_}: the disk never filled up"
            assert store_errors, "/readyz never said that the state store failed"
            assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died on a full disk"

            small_disk.free()
            if round_ % 2:
                # A crash now loses every event answered 202 that is not really stored.
                daemon.kill()
                daemon.start()
            gate.unlink()
            # Space is back: new events are accepted again (the first, retried as its Retry-After asks, while
            # the store's own files may still hold the space), and every accepted one runs; no restart.
            for n in range(20):
                status, _, body = wait_until(lambda n=n: (answer := send(n))[0] != 503 and answer, timeout=30,
                                             what="an event to be accepted once space is back")
                assert status == 202, (status, body)
                accepted.add(json.loads(body)["id"])
            wait_until(lambda: accepted <= set(ran_counts(ran)), timeout=60,
                       what=f"round {round_}: every accepted event to run")
            wait_until(lambda: readiness(daemon.port)[0] == 200, timeout=30,
                       what=f"/readyz to recover: {readiness(daemon.port)}\n{daemon.log.read_text()[-3000:]}")
        counts = ran_counts(ran)
        lost = accepted - set(counts)
        duplicated = [i for i in accepted if counts[i] > 1]
        print(f"disk full, {ROUNDS} rounds: accepted {len(accepted)}, ran {len(accepted & set(counts))}, "
              f"lost {len(lost)}, duplicated {len(duplicated)}")
        assert not lost
        assert daemon.stop() == 0
    finally:
        small_disk.free()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
