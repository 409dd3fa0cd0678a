#!/usr/bin/env python3
"""Partial failure: the events that failed are named in the last line of stdout, and only they are retried.

Exit 0 with a last line ``{"failed": [ids]}`` means "all but these succeeded".
"""

import json
import sys

batch = json.load(sys.stdin)
failed = []
for event in batch["events"]:
    data = event.get("data") or {}
    if data.get("amount", 0) < 0:
        print(f"event {event['id']}: a negative amount", file=sys.stderr)
        failed.append(event["id"])
        continue
    print(f"charged {data['amount']} for {event['id']}")
print(json.dumps({"failed": failed}))
