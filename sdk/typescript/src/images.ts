/**
 * OCI images (`hf.images`; docs/api.md "Images"): pulled from a registry or
 * imported from an archive, they are the root filesystems of machines made
 * with `hf.machines.create({ image })` (an image id, or a reference that is
 * pulled first when the tenant has no ready image of it). The {@link Image}
 * handle carries the API's fields and waits for a pull to end.
 */
import { createReadStream } from "node:fs";
import { stat as fsStat } from "node:fs/promises";
import { Readable } from "node:stream";

import { HyperfleetError } from "./errors.js";
import type {
  Image as ImageData,
  ImageEvent,
  ImageEventList,
  ImageList,
  PullImageRequest,
} from "./generated/openapi.js";
import type { Body, Transport } from "./http.js";
import type { Ref } from "./snapshots.js";
import { sse } from "./streams.js";
import { fromWire } from "./wire.js";

const idOf = (r: Ref): string => (typeof r === "string" ? r : r.id);

/** Thrown by {@link Image.waitReady} when the pull or import ended `failed`. */
export class ImageFailedError extends HyperfleetError {
  /** The failed image (its `error` says why). */
  readonly image: Image;

  constructor(image: Image) {
    super("IMAGE_FAILED", `image ${image.id} (${image.ref ?? "import"}) failed: ${image.error ?? "no reason given"}`);
    this.image = image;
  }
}

export interface ImageEventsOptions {
  /**
   * The stored events, then live ones (with `layer_progress` download
   * progress) until the image is ready, failed or deleted.
   */
  follow?: boolean;
  /** Only events with a larger id. */
  after?: number;
  signal?: AbortSignal;
}

export interface WaitReadyOptions {
  /** Seconds to wait (default 600); a `TimeoutError`-coded error after, the pull goes on. */
  timeout?: number;
  /** Seconds between polls (default 0.5). */
  interval?: number;
  signal?: AbortSignal;
}

/**
 * An archive for `importArchive`: a local path (streamed from disk), bytes,
 * a Blob, or a stream of bytes.
 */
export type ArchiveData = string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

async function* imageEvents(t: Transport, id: string, o: ImageEventsOptions): AsyncGenerator<ImageEvent> {
  let after = o.after;
  if (!o.follow) {
    const list = await t.json<"GET /images/{id}/events", ImageEventList>("GET /images/{id}/events", "ImageEventList", {
      path: { id },
      query: { after },
      signal: o.signal,
    });
    yield* list.events;
    return;
  }
  for (;;) {
    const resp = await t.send("GET /images/{id}/events", {
      path: { id },
      query: { after },
      headers: { accept: "text/event-stream" },
      signal: o.signal,
    });
    if (!resp.body) return;
    let lagged = false;
    for await (const ev of sse(resp.body, "the image event stream")) {
      if (ev.event === "lagged") {
        lagged = true;
        break;
      }
      const event = fromWire<ImageEvent>("ImageEvent", JSON.parse(ev.data));
      after = event.id;
      yield event;
    }
    if (!lagged) return;
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

// Declaration merging: an Image carries every field of the API's image
// (camelCase: `status`, `digest`, `sizeBytes`, …), kept current by every
// answer about it.
export interface Image extends ImageData {}

/** An image record; its fields are the API's as of the last answer (`refresh()` asks again). */
export class Image {
  readonly #t: Transport;
  #fields: string[] = [];

  /** @internal Images come from `hf.images`. */
  constructor(transport: Transport, data: ImageData) {
    this.#t = transport;
    this.#set(data);
  }

  #set(data: ImageData): this {
    for (const k of this.#fields) delete (this as Record<string, unknown>)[k];
    const fields = Object.keys(data).filter((k) => !(k in Image.prototype));
    for (const k of fields) (this as Record<string, unknown>)[k] = (data as unknown as Record<string, unknown>)[k];
    this.#fields = fields;
    return this;
  }

  /** The image's fields as a plain object (also what `JSON.stringify` shows). */
  toJSON(): ImageData {
    const out: Record<string, unknown> = {};
    for (const k of this.#fields) out[k] = (this as Record<string, unknown>)[k];
    return out as unknown as ImageData;
  }

  /** Reads the image again. */
  async refresh(o: { signal?: AbortSignal } = {}): Promise<this> {
    return this.#set(await this.#t.json("GET /images/{id}", "Image", { path: { id: this.id }, signal: o.signal }));
  }

  /**
   * Polls the image until it is `ready` (resolves to it) or `failed`
   * (throws {@link ImageFailedError}); after `timeout` seconds throws a
   * `HyperfleetError` with code `TIMEOUT` (the pull goes on).
   */
  async waitReady(o: WaitReadyOptions = {}): Promise<this> {
    const deadline = Date.now() + (o.timeout ?? 600) * 1000;
    for (;;) {
      if (this.status === "ready") return this;
      if (this.status === "failed") throw new ImageFailedError(this);
      const left = deadline - Date.now();
      if (left <= 0) throw new HyperfleetError("TIMEOUT", `image ${this.id} is still ${this.status} after ${o.timeout ?? 600} s`);
      await sleep(Math.min((o.interval ?? 0.5) * 1000, left), o.signal);
      await this.refresh({ signal: o.signal });
    }
  }

  /** Deletes the image; `ConflictError` while machines made from it exist or while it is pulling. */
  async delete(o: { signal?: AbortSignal } = {}): Promise<void> {
    await this.#t.empty("DELETE /images/{id}", { path: { id: this.id }, signal: o.signal });
  }

  /** The pull's or import's steps (`pulling`, `resolved`, `layer_done`, `built`, `ready`, `failed`, …). */
  events(o: ImageEventsOptions = {}): AsyncGenerator<ImageEvent> {
    return imageEvents(this.#t, this.id, o);
  }
}

/** `hf.images`. */
export class Images {
  readonly #t: Transport;

  /** @internal */
  constructor(transport: Transport) {
    this.#t = transport;
  }

  /**
   * Starts pulling an image (`{ ref, insecure?, auth? }`, or the reference
   * alone); it comes back `pulling`: `waitReady()` waits for the outcome.
   * `insecure` is plain HTTP to the registry; `auth` (`{username, password}`
   * or `{token}`) is used for this pull only and never stored.
   */
  async pull(req: PullImageRequest | string, o: { signal?: AbortSignal } = {}): Promise<Image> {
    const value = typeof req === "string" ? { ref: req } : req;
    const data = await this.#t.json("POST /images", "Image", {
      json: { schema: "PullImageRequest", value },
      signal: o.signal,
    });
    return new Image(this.#t, data);
  }

  /**
   * Imports an OCI image layout tar (`skopeo copy … oci-archive:`) or a
   * `docker save` archive, streamed (a string is a local path). Resolves to
   * the `ready` image; an archive that is not an image is a
   * `ValidationError` (the failed record stays, with its `error`).
   */
  async importArchive(archive: ArchiveData, o: { signal?: AbortSignal } = {}): Promise<Image> {
    let body: Body;
    if (typeof archive === "string") {
      await fsStat(archive); // a missing local file fails here, before any request
      body = Readable.toWeb(createReadStream(archive)) as ReadableStream<Uint8Array>;
    } else if (archive instanceof Uint8Array || archive instanceof ArrayBuffer || archive instanceof Blob) body = archive;
    else if (archive instanceof ReadableStream) body = archive;
    else body = Readable.toWeb(Readable.from(archive)) as ReadableStream<Uint8Array>;
    const data = await this.#t.json("POST /images/import", "Image", {
      body,
      headers: { "content-type": "application/x-tar" },
      signal: o.signal,
    });
    return new Image(this.#t, data);
  }

  /** The tenant's images, oldest first. */
  async list(o: { signal?: AbortSignal } = {}): Promise<Image[]> {
    const list = await this.#t.json<"GET /images", ImageList>("GET /images", "ImageList", { signal: o.signal });
    return list.images.map((i) => new Image(this.#t, i));
  }

  /** An image by id. */
  async get(id: string, o: { signal?: AbortSignal } = {}): Promise<Image> {
    return new Image(this.#t, await this.#t.json("GET /images/{id}", "Image", { path: { id }, signal: o.signal }));
  }

  /** Deletes an image (by id or as the object); see `Image.delete`. */
  async delete(image: Ref, o: { signal?: AbortSignal } = {}): Promise<void> {
    await this.#t.empty("DELETE /images/{id}", { path: { id: idOf(image) }, signal: o.signal });
  }

  /** An image's pull or import steps; see `Image.events`. */
  events(image: Ref, o: ImageEventsOptions = {}): AsyncGenerator<ImageEvent> {
    return imageEvents(this.#t, idOf(image), o);
  }
}
