#!/bin/sh
# An eventswarm function in shell: the batch document is in the file $EVENTSWARM_INPUT (and on stdin).
# Exit 0 means the whole batch succeeded; `set -e` makes any failing command fail the batch.
set -eu
echo "batch $EVENTSWARM_BATCH_ID of trigger $EVENTSWARM_TRIGGER: $EVENTSWARM_EVENT_COUNT events (attempt $EVENTSWARM_ATTEMPT)"
# (with jq in the image: jq -c '.events[] | {id, data}' "$EVENTSWARM_INPUT")
grep -o '"type":"[^"]*"' "$EVENTSWARM_INPUT" | sort | uniq -c
