/**
 * Snapshots (`hf.snapshots`): a machine's disk, and its memory when it had a
 * live or saved guest, kept for new machines to start from. Taking one is
 * `Machine.snapshot` (or `hf.snapshots.create`); a machine is made from one
 * with `hf.machines.create({ snapshotId })`. Templates (`hf.templates`) are
 * snapshots of a freshly booted guest per machine size that creates of that
 * size start from.
 */
import type { CreateSnapshotRequest, CreateTemplateRequest, Snapshot, SnapshotList } from "./generated/openapi.js";
import type { Transport } from "./http.js";
import type { ActionOptions } from "./machines.js";

/** A snapshot or machine given by id (or name), or as the object itself. */
export type Ref = string | { readonly id: string };

const idOf = (r: Ref): string => (typeof r === "string" ? r : r.id);

export class Snapshots {
  readonly #t: Transport;

  /** @internal */
  constructor(transport: Transport) {
    this.#t = transport;
  }

  /** Takes a snapshot of a machine (id, name or `Machine`); see `Machine.snapshot`. */
  create(machine: Ref, req: CreateSnapshotRequest = {}, o: ActionOptions = {}): Promise<Snapshot> {
    return this.#t.json("POST /machines/{id}/snapshots", "Snapshot", {
      path: { id: idOf(machine) },
      query: { wait: o.wait, timeout: o.timeout === undefined ? undefined : Math.min(o.timeout, this.#t.waitRound) },
      json: { schema: "CreateSnapshotRequest", value: req },
      signal: o.signal,
    });
  }

  /** The tenant's snapshots (those being deleted are not listed). */
  async list(o: { signal?: AbortSignal } = {}): Promise<Snapshot[]> {
    const list = await this.#t.json<"GET /snapshots", SnapshotList>("GET /snapshots", "SnapshotList", { signal: o.signal });
    return list.snapshots;
  }

  /** A snapshot by id or name. */
  get(idOrName: string, o: { signal?: AbortSignal } = {}): Promise<Snapshot> {
    return this.#t.json("GET /snapshots/{id}", "Snapshot", { path: { id: idOrName }, signal: o.signal });
  }

  /**
   * Deletes a snapshot. Machines made from it go on: its files stay until
   * the last of them is deleted (it shows `deleting` until then).
   */
  async delete(snapshot: Ref, o: { signal?: AbortSignal } = {}): Promise<void> {
    await this.#t.empty("DELETE /snapshots/{id}", { path: { id: idOf(snapshot) }, signal: o.signal });
  }
}

/**
 * Templates (`hf.templates`): per machine size (backend, image, vCPUs,
 * memory), a snapshot of a freshly booted idle guest that machines created
 * with that size start from instead of booting. Shown as snapshots; listed,
 * a template's `name` is its key. Warming and deleting need an admin key.
 */
export class Templates {
  readonly #t: Transport;

  /** @internal */
  constructor(transport: Transport) {
    this.#t = transport;
  }

  /**
   * Makes the template of a size now (boots a builder guest) instead of on
   * first need; answers the existing one when it is ready. Sizes left out
   * take the server's defaults.
   */
  warm(req: CreateTemplateRequest = {}, o: ActionOptions = {}): Promise<Snapshot> {
    return this.#t.json("POST /templates", "Snapshot", {
      query: { wait: o.wait, timeout: o.timeout === undefined ? undefined : Math.min(o.timeout, this.#t.waitRound) },
      json: { schema: "CreateTemplateRequest", value: req },
      signal: o.signal,
    });
  }

  /** The warmed templates. */
  async list(o: { signal?: AbortSignal } = {}): Promise<Snapshot[]> {
    const list = await this.#t.json<"GET /templates", SnapshotList>("GET /templates", "SnapshotList", { signal: o.signal });
    return list.snapshots;
  }

  /** Deletes a template (by id or as the object); machines made from it go on. */
  async delete(template: Ref, o: { signal?: AbortSignal } = {}): Promise<void> {
    await this.#t.empty("DELETE /templates/{id}", { path: { id: idOf(template) }, signal: o.signal });
  }
}
