/**
 * Reading the API's streamed answers: text lines (console logs, NDJSON exec
 * output) and Server-Sent Events (machine events), as async generators over
 * a response body. A body that breaks off becomes a {@link ConnectionError}.
 */
import { ConnectionError } from "./errors.js";
import { describe } from "./http.js";

async function* chunks(body: ReadableStream<Uint8Array>, what: string): AsyncGenerator<Uint8Array> {
  const reader = body.getReader();
  try {
    for (;;) {
      let r: Awaited<ReturnType<typeof reader.read>>;
      try {
        r = await reader.read();
      } catch (e) {
        throw new ConnectionError("CONNECTION_ERROR", `${what} broke off: ${describe(e)}`, undefined, { cause: e });
      }
      if (r.done) return;
      yield r.value;
    }
  } finally {
    // Stopping early (break, an error) closes the connection.
    await reader.cancel().catch(() => {});
  }
}

/** The body's lines, without their `\n` (a last line without one too). */
export async function* lines(body: ReadableStream<Uint8Array>, what: string): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of chunks(body, what)) {
    pending += decoder.decode(chunk, { stream: true });
    let start = 0;
    let nl: number;
    while ((nl = pending.indexOf("\n", start)) >= 0) {
      yield pending.slice(start, nl);
      start = nl + 1;
    }
    pending = pending.slice(start);
  }
  pending += decoder.decode();
  if (pending) yield pending;
}

/** One Server-Sent Event. */
export interface SseEvent {
  id?: string;
  event: string;
  data: string;
}

/** The events of a `text/event-stream` body (comments and keep-alives skipped). */
export async function* sse(body: ReadableStream<Uint8Array>, what: string): AsyncGenerator<SseEvent> {
  let id: string | undefined;
  let event = "";
  let data: string[] = [];
  for await (const raw of lines(body, what)) {
    const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
    if (line === "") {
      if (data.length) yield { id, event: event || "message", data: data.join("\n") };
      event = "";
      data = [];
      continue;
    }
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") event = value;
    else if (field === "id") id = value;
  }
}
