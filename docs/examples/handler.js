#!/usr/bin/env node
// An eventswarm function in Node.js: the batch document on stdin; exit 0 means the whole batch succeeded.
const chunks = [];
process.stdin.on("data", (chunk) => chunks.push(chunk));
process.stdin.on("end", () => {
  const batch = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  for (const event of batch.events) {
    // Idempotent by event id (docs/delivery.md).
    console.log(JSON.stringify({ id: event.id, type: event.type, data: event.data }));
  }
  console.error(`${batch.events.length} events of trigger ${batch.trigger}, attempt ${batch.attempt}`);
});
