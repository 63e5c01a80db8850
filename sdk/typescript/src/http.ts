/**
 * The SDK's one way to the API: builds `<url>/api/v1<path>` for a route the
 * spec has (`Routes`, generated from docs/openapi.json, so a route or query
 * parameter the daemon does not have fails to compile), sends it with the
 * bearer key through `fetch`, and turns every non-2xx answer into a
 * {@link HyperfleetError} of its code.
 */
import { ConnectionError, HyperfleetError, errorFromResponse } from "./errors.js";
import type { Routes } from "./generated/openapi.js";
import { fromWire, toWire } from "./wire.js";

export type RouteKey = keyof Routes;

/** A request body, as `fetch` takes it. */
export type Body = NonNullable<RequestInit["body"]>;

/** A request to one route: its path and query parameters, and a body. */
export interface CallOptions<K extends RouteKey> {
  path?: Routes[K]["path"];
  query?: Partial<Routes[K]["query"]>;
  /** A JSON body: the SDK's camelCase object for `schema`, converted to the wire's names. */
  json?: { schema: string; value: unknown };
  /** A raw body (streamed when it is a stream). */
  body?: Body;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

export class Transport {
  readonly url: string;
  readonly apiKey: string | undefined;
  readonly #fetch: typeof fetch;
  readonly #headers: Record<string, string>;

  /** The longest (seconds) one request waits on the server; longer waits are made in rounds. */
  readonly waitRound: number;

  constructor(url: string, apiKey: string | undefined, fetchImpl: typeof fetch, headers: Record<string, string>, waitRound: number) {
    this.url = url.replace(/\/+$/, "");
    this.apiKey = apiKey;
    this.#fetch = fetchImpl;
    this.#headers = headers;
    this.waitRound = waitRound;
  }

  /** The full URL of a route with its parameters filled in. */
  urlFor<K extends RouteKey>(route: K, path?: Routes[K]["path"], query?: Partial<Routes[K]["query"]>): string {
    const template = route.slice(route.indexOf(" ") + 1);
    const filled = template.replace(/\{(\w+)\}/g, (_, name: string) => {
      const v = (path as Record<string, string> | undefined)?.[name];
      if (v === undefined || v === "") throw new TypeError(`${route}: missing path parameter ${name}`);
      return encodeURIComponent(v);
    });
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries((query ?? {}) as Record<string, unknown>)) {
      if (v !== undefined && v !== null) qs.set(k, String(v));
    }
    const q = qs.toString();
    return `${this.url}/api/v1${filled}${q ? `?${q}` : ""}`;
  }

  /** Sends a request; the answer when it is 2xx, else throws its error. */
  async send<K extends RouteKey>(route: K, opts: CallOptions<K> = {}): Promise<Response> {
    const method = route.slice(0, route.indexOf(" "));
    const headers: Record<string, string> = { ...this.#headers, ...opts.headers };
    if (this.apiKey) headers["authorization"] = `Bearer ${this.apiKey}`;
    let body: Body | undefined = opts.body;
    if (opts.json) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(toWire(opts.json.schema, opts.json.value));
    }
    const init: RequestInit & { duplex?: "half" } = { method, headers, body, signal: opts.signal };
    if (body && typeof body === "object" && (body instanceof ReadableStream || Symbol.asyncIterator in body)) {
      init.duplex = "half"; // a streamed request body (fetch requires saying so)
    }
    const url = this.urlFor(route, opts.path, opts.query);
    let resp: Response;
    try {
      resp = await this.#fetch(url, init);
    } catch (e) {
      if (opts.signal?.aborted) throw e;
      throw new ConnectionError("CONNECTION_ERROR", `${method} ${url}: ${describe(e)}`, undefined, { cause: e });
    }
    if (!resp.ok) throw await errorFromResponse(resp);
    return resp;
  }

  /** Sends a request and reads its JSON answer as the SDK's object for `schema`. */
  async json<K extends RouteKey, T = Routes[K]["response"]>(route: K, schema: string, opts: CallOptions<K> = {}): Promise<T> {
    const resp = await this.send(route, opts);
    let text: string;
    try {
      text = await resp.text();
    } catch (e) {
      throw new ConnectionError("CONNECTION_ERROR", `reading the answer to ${route}: ${describe(e)}`, undefined, { cause: e });
    }
    try {
      return fromWire<T>(schema, JSON.parse(text));
    } catch (e) {
      throw new HyperfleetError("INTERNAL_ERROR", `the answer to ${route} is not JSON: ${text.slice(0, 200)}`, resp.status, { cause: e });
    }
  }

  /** Sends a request whose answer has no body (204). */
  async empty<K extends RouteKey>(route: K, opts: CallOptions<K> = {}): Promise<number> {
    const resp = await this.send(route, opts);
    await resp.body?.cancel();
    return resp.status;
  }
}

export function describe(e: unknown): string {
  if (e instanceof Error) {
    const cause = (e as { cause?: unknown }).cause;
    return cause instanceof Error ? `${e.message} (${cause.message})` : e.message;
  }
  return String(e);
}
