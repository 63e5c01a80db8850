/** The client: `new Hyperfleet({url?, apiKey?})`. */
import type { Health, Quota, QuotaLimits, Storage } from "./generated/openapi.js";
import { Transport } from "./http.js";
import { Images } from "./images.js";
import { Keys } from "./keys.js";
import { Machines } from "./machines.js";
import { Snapshots, Templates } from "./snapshots.js";

export interface HyperfleetOptions {
  /** The daemon, e.g. `http://127.0.0.1:3000`; default `HYPERFLEET_URL`, else that. */
  url?: string;
  /** An API key (`hf_…`); default `HYPERFLEET_API_KEY`. */
  apiKey?: string;
  /** The `fetch` to use (default the global one), e.g. one with another dispatcher. */
  fetch?: typeof fetch;
  /** Headers added to every request. */
  headers?: Record<string, string>;
  /**
   * The longest one request waits on the server, in seconds (default 240:
   * Node's `fetch` gives up on headers that take 300 s). Longer waits
   * (`wait`, actions with a larger `timeout`) are made in rounds; lower it
   * behind a proxy that drops quiet requests sooner.
   */
  waitRound?: number;
}

/** The default of {@link HyperfleetOptions.waitRound}. */
export const DEFAULT_WAIT_ROUND = 240;

export const DEFAULT_URL = "http://127.0.0.1:3000";

/** The tenant quotas (`hf.quotas`; docs/api.md "Quotas"). */
export class Quotas {
  readonly #t: Transport;

  /** @internal */
  constructor(transport: Transport) {
    this.#t = transport;
  }

  /** The limits in force for a tenant, and what its machines hold. */
  get(tenant: string, o: { signal?: AbortSignal } = {}): Promise<Quota> {
    return this.#t.json("GET /tenants/{tenant}/quota", "Quota", { path: { tenant }, signal: o.signal });
  }

  /** Replaces a tenant's limits (one left out is unlimited); operator admins only. */
  set(tenant: string, limits: QuotaLimits, o: { signal?: AbortSignal } = {}): Promise<Quota> {
    return this.#t.json("PUT /tenants/{tenant}/quota", "Quota", {
      path: { tenant },
      json: { schema: "QuotaLimits", value: limits },
      signal: o.signal,
    });
  }

  /** Drops a tenant's own quota: the server's defaults apply again. */
  reset(tenant: string, o: { signal?: AbortSignal } = {}): Promise<Quota> {
    return this.#t.json("DELETE /tenants/{tenant}/quota", "Quota", { path: { tenant }, signal: o.signal });
  }
}

export class Hyperfleet {
  /** The daemon's URL (without `/api/v1`). */
  readonly url: string;
  readonly machines: Machines;
  readonly keys: Keys;
  readonly quotas: Quotas;
  /** Snapshots of machines; `Machine.snapshot` takes one. */
  readonly snapshots: Snapshots;
  /** Templates: per machine size, a booted guest's snapshot that creates start from. */
  readonly templates: Templates;
  /** OCI images: pull, import, list, get, delete; machines are made from them (`create({ image })`). */
  readonly images: Images;
  readonly #t: Transport;

  constructor(options: HyperfleetOptions = {}) {
    const env = typeof process !== "undefined" ? process.env : {};
    const url = options.url ?? env["HYPERFLEET_URL"] ?? DEFAULT_URL;
    const apiKey = options.apiKey ?? env["HYPERFLEET_API_KEY"];
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== "function") throw new TypeError("no fetch: Node.js >= 20 is required");
    const round = options.waitRound ?? DEFAULT_WAIT_ROUND;
    if (!(round >= 1)) throw new RangeError("waitRound: at least 1 second");
    this.#t = new Transport(url, apiKey || undefined, f, options.headers ?? {}, round);
    this.url = this.#t.url;
    this.machines = new Machines(this.#t);
    this.keys = new Keys(this.#t);
    this.quotas = new Quotas(this.#t);
    this.snapshots = new Snapshots(this.#t);
    this.templates = new Templates(this.#t);
    this.images = new Images(this.#t);
  }

  /** The daemon's health (no key needed). */
  health(o: { signal?: AbortSignal } = {}): Promise<Health> {
    return this.#t.json("GET /health", "Health", { signal: o.signal });
  }

  /**
   * The storage budget (`--storage-budget`), what counts against it
   * (`usedBytes`: machines' disks, memory images and snapshots; allocated
   * bytes, as last measured), OCI images beside it, what the evictor could
   * free now and its latest evictions (`GET /storage`; docs/api.md
   * "Storage"). Host-wide: needs the `read` scope on a key of the operator
   * tenant (`default`); other tenants' keys get a `ForbiddenError`.
   */
  storage(o: { signal?: AbortSignal } = {}): Promise<Storage> {
    return this.#t.json("GET /storage", "Storage", { signal: o.signal });
  }
}
