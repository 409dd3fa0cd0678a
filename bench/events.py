"""Event model benchmark: the cost of building and encoding one CloudEvent (every event of every source pays it).

Prints its figures and writes them to bench/results/events.json. Run: `.venv/bin/python bench/events.py`.
"""

from __future__ import annotations

import json
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher.events import Event  # noqa: E402

N = 200_000


def build() -> Event:
    return Event(source="kafka://votes/0", type="eventswarm.kafka.record", subject="key-17",
                 data={"voter_id": 17, "vote": "yes"}, extensions={"partition": 0, "offset": 12345},
                 partition="votes/0")


def main() -> None:
    built = min(timeit.repeat(build, number=N, repeat=5)) / N * 1e6
    encoded = min(timeit.repeat(lambda: build().encode(), number=N, repeat=5)) / N * 1e6
    report = {"build_us": round(built, 3), "build_and_encode_us": round(encoded, 3), "events": N,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"Event(): {built:.2f} µs; Event() + encode(): {encoded:.2f} µs (aim: well under 10 µs)")
    out = ROOT / "bench" / "results" / "events.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
