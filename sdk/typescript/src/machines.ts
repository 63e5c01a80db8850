/**
 * Machines: the collection (`hf.machines`: create, get, list) and the
 * {@link Machine} handle with its lifecycle actions, waiting, commands,
 * files, console logs and events.
 *
 * `Machine.snapshot` and `Machine.fork` make memory images of a machine
 * (snapshots themselves are `hf.snapshots`, src/snapshots.ts), built the same
 * way as the actions below, on `Transport.json`.
 */
import { createReadStream, createWriteStream } from "node:fs";
import { stat as fsStat } from "node:fs/promises";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";

import { ConnectionError, InvalidStateError, NotFoundError, TimeoutError, errorFor } from "./errors.js";
import type {
  CreateMachineRequest,
  CreateSnapshotRequest,
  DirEntry,
  ExecRequest,
  ExecResult,
  ExecStreamEvent,
  FileStat,
  ForkRequest,
  ForkResult,
  FileWritten,
  Machine as MachineData,
  MachineEvent,
  MachineList,
  MachineStatus,
  EventList,
  Snapshot,
  UpdateMachineRequest,
} from "./generated/openapi.js";
import type { Body, Transport } from "./http.js";
import { lines, sse } from "./streams.js";
import { fromWire } from "./wire.js";

/** Options of the lifecycle actions (`start`, `stop`, …). */
export interface ActionOptions {
  /** Wait until the machine has converged on the request (default true). */
  wait?: boolean;
  /** Seconds to wait (the server's default is 60). */
  timeout?: number;
  signal?: AbortSignal;
}

/** What {@link Machine.fork} made: the copies, and how they were made. */
export interface Fork extends Omit<ForkResult, "machines"> {
  /** The copies, running (unless `wait: false`), in the order of `names`. */
  machines: Machine[];
}

export interface DeleteOptions extends ActionOptions {
  /** Stop a machine that runs first (otherwise deleting it is `409`). */
  force?: boolean;
}

export interface WaitOptions {
  /** Seconds to wait (default 60); a `TimeoutError` after. */
  timeout?: number;
  signal?: AbortSignal;
}

/** A command: an argv array, or a string run by `sh -c`. */
export type Command = string | readonly string[];

export interface ExecOptions {
  /** Added to the machine's `env` for this command. */
  env?: Record<string, string>;
  /** Working directory in the guest. */
  cwd?: string;
  /** The command's standard input. */
  stdin?: string | Uint8Array;
  /** Seconds before the command's process group is killed (default 60). */
  timeout?: number;
  /** Keep at most this many bytes of each of stdout and stderr (buffered form only). */
  maxOutputBytes?: number;
  signal?: AbortSignal;
}

/** A chunk of a streamed command's output. */
export interface ExecChunk {
  type: "stdout" | "stderr";
  data: Uint8Array;
}

/** How a streamed command ended. */
export type ExecExit = Omit<Extract<ExecStreamEvent, { type: "exit" }>, "type">;

export interface LogsOptions {
  /** Keep the answer open and yield new console output until the machine is deleted. */
  follow?: boolean;
  /** Start with the last this many lines (server default 200). */
  tail?: number;
  signal?: AbortSignal;
}

export interface EventsOptions {
  /** Stream events live (SSE) after the history, until the machine is deleted. */
  follow?: boolean;
  /** Only events with a larger id. */
  after?: number;
  signal?: AbortSignal;
}

export interface ReadOptions {
  /** First byte to read. */
  offset?: number;
  /** How many bytes to read from `offset` (to the end when absent). */
  length?: number;
  signal?: AbortSignal;
}

export interface WriteOptions {
  /** Permission bits, e.g. 0o644. */
  mode?: number;
  /** Create missing parent directories. */
  createDirs?: boolean;
  signal?: AbortSignal;
}

/** Data for `files.write`: bytes, text (UTF-8), or a stream of bytes. */
export type FileData = string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

const encoder = new TextEncoder();

function toBase64(data: string | Uint8Array): string {
  const bytes = typeof data === "string" ? encoder.encode(data) : data;
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
}

function fromBase64(data: string): Uint8Array {
  const b = Buffer.from(data, "base64");
  return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
}

/** Whether `e` is `fetch` (undici) giving up on a body that stayed silent. */
function idleTimeout(e: unknown): boolean {
  for (let c: unknown = e, depth = 0; c && depth < 5; c = (c as { cause?: unknown }).cause, depth++) {
    if ((c as { code?: unknown }).code === "UND_ERR_BODY_TIMEOUT") return true;
  }
  return false;
}

function argv(command: Command): string[] {
  return typeof command === "string" ? ["sh", "-c", command] : [...command];
}

function execRequest(command: Command, o: ExecOptions): ExecRequest {
  return {
    command: argv(command),
    cwd: o.cwd,
    env: o.env,
    stdin: o.stdin === undefined ? undefined : toBase64(o.stdin),
    timeout: o.timeout,
    maxOutputBytes: o.maxOutputBytes,
  };
}

/** What each action converges on, to finish a wait longer than one round. */
const TARGET: Record<"start" | "stop" | "pause" | "resume" | "suspend" | "kill", MachineStatus> = {
  start: "running",
  stop: "stopped",
  pause: "paused",
  resume: "running",
  suspend: "suspended",
  kill: "stopped",
};

// Declaration merging: a Machine carries every field of the API's machine
// (camelCase: `status`, `desiredStatus`, `memSizeMib`, …), kept current by
// every answer about it.
export interface Machine extends MachineData {}

/**
 * A machine. Its fields are the API's as of the last answer about it
 * (`refresh()` asks again); its methods act on it by id.
 *
 * `await using m = await hf.machines.create(...)` deletes it (forcefully)
 * when the scope ends; `m.dispose()` does the same by hand.
 */
export class Machine {
  readonly #t: Transport;
  #fields: string[] = [];
  /** Files inside the running machine (scope `exec`). */
  readonly files: MachineFiles;

  /** @internal Machines come from `hf.machines`. */
  constructor(transport: Transport, data: MachineData) {
    this.#t = transport;
    this.files = new MachineFiles(transport, this);
    this.#set(data);
  }

  #set(data: MachineData): this {
    for (const k of this.#fields) delete (this as Record<string, unknown>)[k];
    // A field a newer daemon adds never hides a method (or `files`); the
    // fields the spec has are checked against them when this compiles.
    const fields = Object.keys(data).filter((k) => !(k in Machine.prototype) && k !== "files");
    for (const k of fields) (this as Record<string, unknown>)[k] = (data as unknown as Record<string, unknown>)[k];
    this.#fields = fields;
    return this;
  }

  /** The machine's fields as a plain object (also what `JSON.stringify` shows). */
  toJSON(): MachineData {
    const out: Record<string, unknown> = {};
    for (const k of this.#fields) out[k] = (this as Record<string, unknown>)[k];
    return out as unknown as MachineData;
  }

  #path() {
    return { id: this.id };
  }

  /** Reads the machine again. */
  async refresh(o: { signal?: AbortSignal } = {}): Promise<this> {
    return this.#set(await this.#t.json("GET /machines/{id}", "Machine", { path: this.#path(), signal: o.signal }));
  }

  /**
   * Changes the machine's idle timeout, persistence or metadata
   * (`PATCH /machines/{id}`); fields left out stay as they are,
   * `idleTimeoutSeconds: null` is the server's default, `metadata` replaces
   * the whole map. The idle deadline starts over.
   */
  async update(changes: UpdateMachineRequest, o: { signal?: AbortSignal } = {}): Promise<this> {
    return this.#set(
      await this.#t.json("PATCH /machines/{id}", "Machine", {
        path: this.#path(),
        json: { schema: "UpdateMachineRequest", value: changes },
        signal: o.signal,
      }),
    );
  }

  async #action(op: keyof typeof TARGET | "restart", o: ActionOptions = {}): Promise<this> {
    const started = Date.now();
    const wait = o.wait ?? true;
    const timeout = o.timeout === undefined ? undefined : Math.min(o.timeout, this.#t.waitRound);
    try {
      const resp = await this.#t.send(`POST /machines/{id}/${op}`, {
        path: this.#path(),
        query: { wait, timeout },
        signal: o.signal,
      });
      // A stop or kill of an ephemeral machine deleted it: nothing to read.
      if (resp.status === 204) return this;
      return this.#set(fromWire<MachineData>("Machine", await resp.json()));
    } catch (e) {
      // A wait longer than one round: the request was recorded and goes on;
      // wait for its outcome in further rounds. (A restart cannot be told
      // apart from the state before it, so it is not continued.)
      const left = o.timeout === undefined ? 0 : o.timeout - (Date.now() - started) / 1000;
      if (e instanceof TimeoutError && wait && op !== "restart" && left > 0) {
        return this.wait(TARGET[op], { timeout: left, signal: o.signal });
      }
      throw e;
    }
  }

  /** Boots the machine (restores a suspended one); waits for `running`. */
  start(o?: ActionOptions): Promise<this> {
    return this.#action("start", o);
  }
  /** Stops the guest gracefully (a kill after the server's stop timeout). */
  stop(o?: ActionOptions): Promise<this> {
    return this.#action("stop", o);
  }
  /** Stops and boots again (boots a stopped or failed machine). */
  restart(o?: ActionOptions): Promise<this> {
    return this.#action("restart", o);
  }
  /** Freezes the guest's vCPUs; `resume` continues it. */
  pause(o?: ActionOptions): Promise<this> {
    return this.#action("pause", o);
  }
  /** Continues a paused guest, or restores a suspended one. */
  resume(o?: ActionOptions): Promise<this> {
    return this.#action("resume", o);
  }
  /** Saves the guest's memory to disk and stops its VMM. */
  suspend(o?: ActionOptions): Promise<this> {
    return this.#action("suspend", o);
  }
  /** Stops the machine at once (a hard stop). */
  kill(o?: ActionOptions): Promise<this> {
    return this.#action("kill", o);
  }

  /** Deletes the machine (`force` stops it first); final once accepted. */
  async delete(o: DeleteOptions = {}): Promise<void> {
    await this.#t.empty("DELETE /machines/{id}", {
      path: this.#path(),
      query: { force: o.force, wait: o.wait, timeout: o.timeout === undefined ? undefined : Math.min(o.timeout, this.#t.waitRound) },
      signal: o.signal,
    });
  }

  /**
   * Deletes the machine, stopping it first, and ignores that it is already
   * gone or being deleted: what `await using` calls at the end of its scope.
   */
  async dispose(): Promise<void> {
    try {
      await this.delete({ force: true });
    } catch (e) {
      if (e instanceof NotFoundError || e instanceof InvalidStateError) return;
      throw e;
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }

  /**
   * Waits until the machine is in `status`. Throws `InvalidStateError` when
   * it cannot get there without another request (failed, or nobody asked),
   * `TimeoutError` after `timeout` seconds (default 60).
   */
  async wait(status: MachineStatus, o: WaitOptions = {}): Promise<this> {
    const deadline = Date.now() + (o.timeout ?? 60) * 1000;
    for (;;) {
      const left = Math.max(0, (deadline - Date.now()) / 1000);
      const round = Math.min(left, this.#t.waitRound);
      try {
        const data = await this.#t.json("GET /machines/{id}/wait", "Machine", {
          path: this.#path(),
          query: { status, timeout: Math.ceil(round) },
          signal: o.signal,
        });
        return this.#set(data);
      } catch (e) {
        if (e instanceof TimeoutError && Date.now() < deadline - 500) continue;
        throw e;
      }
    }
  }

  /**
   * Runs a command in the guest and returns its output once it has ended:
   * `{stdout, stderr, exitCode, signal, timedOut, truncated, durationMs}`.
   * A string runs with `sh -c`. For large or binary output use `execStream`.
   */
  async exec(command: Command, o: ExecOptions = {}): Promise<ExecResult> {
    return this.#t.json("POST /machines/{id}/exec", "ExecResult", {
      path: this.#path(),
      json: { schema: "ExecRequest", value: execRequest(command, o) },
      signal: o.signal,
    });
  }

  /**
   * Runs a command and streams its output as it comes:
   * `for await (const chunk of stream)` yields `{type: "stdout"|"stderr", data}`;
   * `await stream.wait()` then gives how it ended. Leaving the loop early
   * (or `stream.cancel()`) closes the connection, which kills the command.
   */
  async execStream(command: Command, o: Omit<ExecOptions, "maxOutputBytes"> = {}): Promise<ExecStream> {
    const abort = new AbortController();
    const signal = o.signal ? AbortSignal.any([o.signal, abort.signal]) : abort.signal;
    const resp = await this.#t.send("POST /machines/{id}/exec", {
      path: this.#path(),
      query: { stream: true },
      json: { schema: "ExecRequest", value: execRequest(command, o) },
      signal,
    });
    return new ExecStream(resp, abort);
  }

  /**
   * The console (serial) log, line by line; `follow` keeps yielding new
   * lines until the machine is deleted (or the caller stops). A followed log
   * that stays silent past `fetch`'s body timeout (300 s) is picked up
   * again from its end; a line written in that instant can be missed.
   */
  async *logs(o: LogsOptions = {}): AsyncGenerator<string> {
    let tail = o.tail;
    for (;;) {
      const resp = await this.#t.send("GET /machines/{id}/logs", {
        path: this.#path(),
        query: { follow: o.follow, tail },
        signal: o.signal,
      });
      if (!resp.body) return;
      try {
        yield* lines(resp.body, "the console log");
        return;
      } catch (e) {
        if (!o.follow || !idleTimeout(e)) throw e;
        tail = 0;
      }
    }
  }

  /**
   * The machine's events (`created`, `requested`, `transition` with step
   * timings, `steps`, `deleted`). With `follow`, they stream live over SSE
   * after the history and the iteration ends after `deleted`; a stream that
   * fell behind is resumed from the last event seen.
   */
  async *events(o: EventsOptions = {}): AsyncGenerator<MachineEvent> {
    let after = o.after ?? 0;
    if (!o.follow) {
      for (;;) {
        const page = await this.#t.json<"GET /machines/{id}/events", EventList>("GET /machines/{id}/events", "EventList", {
          path: this.#path(),
          query: { after, limit: 1000 },
          signal: o.signal,
        });
        yield* page.events;
        if (page.events.length < 1000) return;
        after = page.events[page.events.length - 1]!.id;
      }
    }
    for (;;) {
      const resp = await this.#t.send("GET /machines/{id}/events", {
        path: this.#path(),
        query: { after },
        headers: { accept: "text/event-stream", ...(after ? { "last-event-id": String(after) } : {}) },
        signal: o.signal,
      });
      if (!resp.body) return;
      let lagged = false;
      for await (const ev of sse(resp.body, "the event stream")) {
        if (ev.event === "lagged") {
          lagged = true;
          break;
        }
        const event = fromWire<MachineEvent>("MachineEvent", JSON.parse(ev.data));
        after = event.id;
        yield event;
        if (event.kind === "deleted") return;
      }
      if (!lagged) return;
    }
  }

  /**
   * Takes a snapshot of the machine (running, paused, suspended or stopped;
   * a running machine keeps running, its pause is in `pauseMs`). Machines
   * are made from it with `hf.machines.create({ snapshotId })`. With
   * `wait: false` (or past the `timeout`) it comes back still `creating`.
   */
  async snapshot(req: CreateSnapshotRequest = {}, o: ActionOptions = {}): Promise<Snapshot> {
    return this.#t.json("POST /machines/{id}/snapshots", "Snapshot", {
      path: this.#path(),
      query: { wait: o.wait, timeout: o.timeout === undefined ? undefined : Math.min(o.timeout, this.#t.waitRound) },
      json: { schema: "CreateSnapshotRequest", value: req },
      signal: o.signal,
    });
  }

  /**
   * Makes running copies of this running machine (`count` 1–16, or one per
   * name in `names`); the machine keeps running. Each copy takes its own
   * address, hostname, machine id, boot id and RNG seed before it counts as
   * running.
   */
  async fork(req: ForkRequest = {}, o: ActionOptions = {}): Promise<Fork> {
    const r = await this.#t.json<"POST /machines/{id}/fork", ForkResult>("POST /machines/{id}/fork", "ForkResult", {
      path: this.#path(),
      query: { wait: o.wait, timeout: o.timeout === undefined ? undefined : Math.min(o.timeout, this.#t.waitRound) },
      json: { schema: "ForkRequest", value: req },
      signal: o.signal,
    });
    return { ...r, machines: r.machines.map((m) => new Machine(this.#t, m)) };
  }

  /**
   * The proxy URL of an exposed port. `withToken` adds the machine's access
   * token (`?hf_token=`) for a machine that is not public; the token is
   * shown only to keys with the `exec` scope.
   */
  url(port: number, o: { withToken?: boolean } = {}): string {
    const url = this.urls?.[String(port)];
    if (!url) {
      throw new NotFoundError("NOT_FOUND", `port ${port} is not exposed by machine '${this.name}' (or the server runs without its proxy)`);
    }
    if (!o.withToken || this.public) return url;
    if (!this.accessToken) {
      throw new TypeError(`machine '${this.name}' shows no access token: the key lacks the exec scope`);
    }
    const u = new URL(url);
    u.searchParams.set("hf_token", this.accessToken);
    return u.toString();
  }
}

/** A running command's output stream; see {@link Machine.execStream}. */
export class ExecStream implements AsyncIterable<ExecChunk> {
  readonly #resp: Response;
  readonly #abort: AbortController;
  #iterating = false;
  #exit: ExecExit | undefined;
  #done = false;

  /** @internal */
  constructor(resp: Response, abort: AbortController) {
    this.#resp = resp;
    this.#abort = abort;
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<ExecChunk> {
    if (this.#iterating) throw new TypeError("an ExecStream can be read once");
    this.#iterating = true;
    try {
      if (!this.#resp.body) throw new ConnectionError("CONNECTION_ERROR", "the exec stream has no body");
      for await (const line of lines(this.#resp.body, "the exec stream")) {
        if (!line.trim()) continue;
        const ev = fromWire<ExecStreamEvent>("ExecStreamEvent", JSON.parse(line));
        switch (ev.type) {
          case "stdout":
          case "stderr":
            yield { type: ev.type, data: fromBase64(ev.data) };
            break;
          case "exit": {
            const { type: _, ...exit } = ev;
            this.#exit = exit;
            return;
          }
          case "error":
            throw errorFor(ev.code, ev.message);
        }
      }
      throw new ConnectionError("CONNECTION_ERROR", "the exec stream ended before the command's exit");
    } finally {
      this.#done = true;
      this.#abort.abort();
    }
  }

  /** Reads (and drops) what is left of the output; how the command ended. */
  async wait(): Promise<ExecExit> {
    if (!this.#iterating) {
      for await (const _ of this) {
        // draining
      }
    }
    if (!this.#exit) {
      throw new ConnectionError("CONNECTION_ERROR", this.#done ? "the command's stream ended without its exit (cancelled?)" : "wait() while the stream is still being read");
    }
    return this.#exit;
  }

  /** Reads the whole output: stdout and stderr as bytes, and the exit. */
  async collect(): Promise<ExecExit & { stdout: Uint8Array; stderr: Uint8Array }> {
    const out: Uint8Array[] = [];
    const err: Uint8Array[] = [];
    for await (const c of this) (c.type === "stdout" ? out : err).push(c.data);
    return { ...(await this.wait()), stdout: Buffer.concat(out), stderr: Buffer.concat(err) };
  }

  /** Closes the connection, which kills the command. */
  cancel(): void {
    this.#abort.abort();
  }
}

/** Files inside a running machine (`machine.files`; scope `exec`). */
export class MachineFiles {
  readonly #t: Transport;
  readonly #m: { readonly id: string };

  /** @internal */
  constructor(transport: Transport, machine: { readonly id: string }) {
    this.#t = transport;
    this.#m = machine;
  }

  async #get(path: string, o: ReadOptions): Promise<Response> {
    const headers: Record<string, string> = {};
    if (o.offset !== undefined || o.length !== undefined) {
      const start = o.offset ?? 0;
      headers["range"] = o.length === undefined ? `bytes=${start}-` : `bytes=${start}-${start + o.length - 1}`;
    }
    return this.#t.send("GET /machines/{id}/files", {
      path: { id: this.#m.id },
      query: { path, raw: true },
      headers,
      signal: o.signal,
    });
  }

  /** A file's bytes (streamed from the guest: any size, as memory allows). */
  async read(path: string, o: ReadOptions = {}): Promise<Uint8Array> {
    if (o.length === 0) return new Uint8Array();
    const resp = await this.#get(path, o);
    return new Uint8Array(await resp.arrayBuffer());
  }

  /** A file's content as UTF-8 text. */
  async readText(path: string, o: ReadOptions = {}): Promise<string> {
    return new TextDecoder().decode(await this.read(path, o));
  }

  /** A file's bytes as a stream, for data too large to hold. */
  async stream(path: string, o: ReadOptions = {}): Promise<ReadableStream<Uint8Array>> {
    const resp = await this.#get(path, o);
    return resp.body ?? new ReadableStream({ start: (c) => c.close() });
  }

  /** Writes a file (replacing it) from bytes, text or a stream; streamed to the guest. */
  async write(path: string, data: FileData, o: WriteOptions = {}): Promise<FileWritten> {
    let body: Body;
    if (typeof data === "string") body = data;
    else if (data instanceof Uint8Array || data instanceof ArrayBuffer || data instanceof Blob) body = data;
    else if (data instanceof ReadableStream) body = data;
    else body = Readable.toWeb(Readable.from(data)) as ReadableStream<Uint8Array>;
    return this.#t.json("PUT /machines/{id}/files", "FileWritten", {
      path: { id: this.#m.id },
      query: { path, mode: o.mode, create_dirs: o.createDirs },
      body,
      headers: { "content-type": "application/octet-stream" },
      signal: o.signal,
    });
  }

  /** Copies a local file into the guest, streaming it. */
  async upload(localPath: string, remotePath: string, o: WriteOptions = {}): Promise<FileWritten> {
    await fsStat(localPath); // a missing local file fails here, before any request
    const body = Readable.toWeb(createReadStream(localPath)) as ReadableStream<Uint8Array>;
    return this.write(remotePath, body, o);
  }

  /** Copies a guest file to a local path, streaming it; the bytes written. */
  async download(remotePath: string, localPath: string, o: { signal?: AbortSignal } = {}): Promise<number> {
    const resp = await this.#get(remotePath, o);
    const out = createWriteStream(localPath);
    if (!resp.body) {
      out.end();
      return 0;
    }
    const input = Readable.fromWeb(resp.body as import("node:stream/web").ReadableStream<Uint8Array>);
    try {
      await pipeline(input, out);
    } catch (e) {
      throw new ConnectionError("CONNECTION_ERROR", `downloading ${remotePath}: ${(e as Error).message}`, undefined, { cause: e });
    }
    return out.bytesWritten;
  }

  /** The entries of a directory. */
  async list(path: string, o: { signal?: AbortSignal } = {}): Promise<DirEntry[]> {
    const listing = await this.#t.json("GET /machines/{id}/files/list", "DirListing", {
      path: { id: this.#m.id },
      query: { path },
      signal: o.signal,
    });
    return listing.entries;
  }

  /** A path's kind, size, mode, owner and modification time. */
  async stat(path: string, o: { signal?: AbortSignal } = {}): Promise<FileStat> {
    return this.#t.json("GET /machines/{id}/files/stat", "FileStat", {
      path: { id: this.#m.id },
      query: { path },
      signal: o.signal,
    });
  }

  /** Whether a path exists in the guest. */
  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** Creates a directory (`createDirs`: with its missing parents). */
  async mkdir(path: string, o: { mode?: number; createDirs?: boolean; signal?: AbortSignal } = {}): Promise<void> {
    await this.#t.empty("POST /machines/{id}/files/mkdir", {
      path: { id: this.#m.id },
      query: { path, mode: o.mode, create_dirs: o.createDirs },
      signal: o.signal,
    });
  }

  /** Removes a file, or a directory (`recursive` for one that is not empty). */
  async remove(path: string, o: { recursive?: boolean; signal?: AbortSignal } = {}): Promise<void> {
    await this.#t.empty("DELETE /machines/{id}/files", {
      path: { id: this.#m.id },
      query: { path, recursive: o.recursive },
      signal: o.signal,
    });
  }
}

export interface ListOptions {
  /** Only machines in this status. */
  status?: MachineStatus;
  /** Machines per request (1–1000, default 100). */
  pageSize?: number;
  signal?: AbortSignal;
}

export interface PageOptions {
  status?: MachineStatus;
  /** 1–1000 (default 100). */
  limit?: number;
  offset?: number;
  signal?: AbortSignal;
}

/** One page of machines, and how many match the filter in all. */
export interface MachinePage {
  machines: Machine[];
  total: number;
}

export interface CreateOptions {
  /** Start the machine after creating it (and wait for `running`). */
  start?: boolean;
  /** Seconds to wait for the start. */
  timeout?: number;
  signal?: AbortSignal;
}

/** `hf.machines`. */
export class Machines {
  readonly #t: Transport;

  /** @internal */
  constructor(transport: Transport) {
    this.#t = transport;
  }

  /** Creates a machine (status `pending`; `start: true` boots it too). */
  async create(spec: CreateMachineRequest = {}, o: CreateOptions = {}): Promise<Machine> {
    const data = await this.#t.json("POST /machines", "Machine", {
      json: { schema: "CreateMachineRequest", value: spec },
      signal: o.signal,
    });
    const m = new Machine(this.#t, data);
    if (o.start) {
      try {
        await m.start({ timeout: o.timeout, signal: o.signal });
      } catch (e) {
        await m.dispose().catch(() => {});
        throw e;
      }
    }
    return m;
  }

  /** A machine by id or name. */
  async get(idOrName: string, o: { signal?: AbortSignal } = {}): Promise<Machine> {
    return new Machine(this.#t, await this.#t.json("GET /machines/{id}", "Machine", { path: { id: idOrName }, signal: o.signal }));
  }

  /** Changes a machine's idle timeout, persistence or metadata (see `Machine.update`). */
  async update(idOrName: string, changes: UpdateMachineRequest, o: { signal?: AbortSignal } = {}): Promise<Machine> {
    const data = await this.#t.json("PATCH /machines/{id}", "Machine", {
      path: { id: idOrName },
      json: { schema: "UpdateMachineRequest", value: changes },
      signal: o.signal,
    });
    return new Machine(this.#t, data);
  }

  /** One page of machines in creation order. */
  async page(o: PageOptions = {}): Promise<MachinePage> {
    const list = await this.#t.json<"GET /machines", MachineList>("GET /machines", "MachineList", {
      query: { status: o.status, limit: o.limit, offset: o.offset },
      signal: o.signal,
    });
    return { machines: list.machines.map((m) => new Machine(this.#t, m)), total: list.total };
  }

  /**
   * Every machine (of a status), fetched a page at a time as the iteration
   * goes: `for await (const m of hf.machines.list())`.
   */
  async *list(o: ListOptions = {}): AsyncGenerator<Machine> {
    for await (const page of this.pages(o)) yield* page.machines;
  }

  /** The pages of `list`, one request each. */
  async *pages(o: ListOptions = {}): AsyncGenerator<MachinePage> {
    const limit = o.pageSize ?? 100;
    let offset = 0;
    for (;;) {
      const page = await this.page({ status: o.status, limit, offset, signal: o.signal });
      yield page;
      offset += page.machines.length;
      if (page.machines.length < limit || offset >= page.total) return;
    }
  }

  /**
   * Creates a machine, hands it to `fn`, and deletes it afterwards whatever
   * `fn` did: the explicit form of `await using`.
   */
  async with<T>(spec: CreateMachineRequest, fn: (m: Machine) => Promise<T>, o: CreateOptions = {}): Promise<T> {
    const m = await this.create(spec, o);
    try {
      return await fn(m);
    } finally {
      await m.dispose();
    }
  }
}
