// The stream readers on bodies cut at awkward places: lines split across
// chunks and inside a UTF-8 character, many lines in one chunk, SSE fields.
import assert from "node:assert/strict";
import { test } from "node:test";

import { lines, sse } from "../dist/streams.js";

function body(...parts) {
  return new ReadableStream({
    start(c) {
      for (const p of parts) c.enqueue(typeof p === "string" ? new TextEncoder().encode(p) : p);
      c.close();
    },
  });
}

async function all(gen) {
  const out = [];
  for await (const x of gen) out.push(x);
  return out;
}

test("lines: split across chunks and inside a character, last line without a newline", async () => {
  const euro = new TextEncoder().encode("€"); // 3 bytes
  const got = await all(lines(body("a\nb", "c\n", euro.slice(0, 1), euro.slice(1), "\n\nlast"), "t"));
  assert.deepEqual(got, ["a", "bc", "€", "", "last"]);
});

test("lines: many lines in one chunk", async () => {
  const n = 50_000;
  const t0 = Date.now();
  const got = await all(lines(body("x\n".repeat(n)), "t"));
  assert.equal(got.length, n);
  assert.ok(Date.now() - t0 < 5000);
});

test("sse: events, ids, multi-line data, comments and keep-alives", async () => {
  const got = await all(sse(body(": keep-alive\n\n", "id: 7\nevent: transition\ndata: {\"a\":\ndata: 1}\n\n", "data: plain\r\n\r\n"), "t"));
  assert.deepEqual(got, [
    { id: "7", event: "transition", data: '{"a":\n1}' },
    { id: "7", event: "message", data: "plain" },
  ]);
});

test("a body that breaks off is a ConnectionError", async () => {
  const broken = new ReadableStream({
    start(c) {
      c.enqueue(new TextEncoder().encode("one\n"));
      c.error(new Error("reset"));
    },
  });
  await assert.rejects(all(lines(broken, "the thing")), (e) => e.code === "CONNECTION_ERROR" && /the thing broke off: reset/.test(e.message));
});
