// Reads GET /events with the `eventsource` package (a WHATWG EventSource for Node) and prints one
// JSON line per thing that happened: {"open":true}, {"event":"message","id":"…","data":"…"},
// {"event":"reset",…}, {"error":"…"}. Used by tests/tests/events.rs: the EventSource reconnects
// by itself when the server ends a stream, sending Last-Event-ID.
//
// Usage: node sse_reader.mjs URL TOKEN
import { EventSource } from "eventsource";

const [url, token] = process.argv.slice(2);
const print = (v) => process.stdout.write(JSON.stringify(v) + "\n");
const es = new EventSource(url, {
  fetch: (input, init) =>
    fetch(input, { ...init, headers: { ...init.headers, Authorization: `Bearer ${token}` } }),
});
es.onopen = () => print({ open: true });
es.onerror = (e) => print({ error: String(e.message ?? e.type), state: es.readyState });
for (const type of ["message", "reset"]) {
  es.addEventListener(type, (e) => print({ event: type, id: e.lastEventId, data: e.data }));
}
process.on("SIGTERM", () => {
  es.close();
  process.exit(0);
});
