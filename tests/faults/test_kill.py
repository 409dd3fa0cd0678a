"""kill -9 of the daemon at random points of a webhook flood, 10 rounds: every event answered 202 runs."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

from tests.faults.conftest import ran_counts, recording_daemon
from tests.support import post, wait_until

ROUNDS = 10
POSTS_PER_ROUND = 60


def test_kill_9_at_random_points_loses_no_accepted_event(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    daemon, ran = recording_daemon(tmp_path, state)
    daemon.start()
    rng = random.Random(9)
    accepted: set[str] = set()

    def send(n: int) -> str | None:
        try:
            status, _, body = post(f"http://127.0.0.1:{daemon.port}/hooks/in", json.dumps({"n": n}).encode(), timeout=10)
        except OSError:
            return None  # the daemon is gone: not accepted, the sender would try again
        return json.loads(body)["id"] if status == 202 else None

    try:
        for _ in range(ROUNDS):
            with ThreadPoolExecutor(4) as pool:
                answers = [pool.submit(send, n) for n in range(POSTS_PER_ROUND)]
                time.sleep(rng.uniform(0.02, 0.6))  # where in the flood the kill lands (the fault's timing)
                daemon.kill()
                accepted.update(i for i in (a.result() for a in answers) if i)
            daemon.start()
        wait_until(lambda: accepted <= set(ran_counts(ran)), timeout=60, what="every accepted event to run")
        counts = ran_counts(ran)
        lost = accepted - set(counts)
        duplicated = [i for i in accepted if counts[i] > 1]
        print(f"kill -9, {ROUNDS} rounds: accepted {len(accepted)}, ran {len(accepted & set(counts))}, "
              f"lost {len(lost)}, duplicated {len(duplicated)}")
        assert accepted and not lost
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
