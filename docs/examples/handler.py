#!/usr/bin/env python3
"""An eventswarm function in Python: the batch document on stdin, one line per event on stdout.

Exit 0 means the whole batch succeeded; any other exit (or an exception) fails it, and eventswarm retries it.
"""

import json
import sys

batch = json.load(sys.stdin)  # {"trigger", "function", "batch_id", "attempt", "events": [CloudEvents...]}
for event in batch["events"]:
    # Idempotent by event id: doing the same event twice must leave the same result (docs/delivery.md).
    print(json.dumps({"id": event["id"], "type": event["type"], "data": event.get("data")}))
print(f"{len(batch['events'])} events of trigger {batch['trigger']}, attempt {batch['attempt']}", file=sys.stderr)
