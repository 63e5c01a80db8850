/** API keys (`hf.keys`; scope `admin`). */
import type { ApiKey, CreateKeyRequest, CreatedKey, KeyList } from "./generated/openapi.js";
import type { Transport } from "./http.js";

export class Keys {
  readonly #t: Transport;

  /** @internal */
  constructor(transport: Transport) {
    this.#t = transport;
  }

  /** Creates a key; the answer's `key` is the secret, shown this once. */
  async create(req: CreateKeyRequest, o: { signal?: AbortSignal } = {}): Promise<CreatedKey> {
    return this.#t.json("POST /keys", "CreatedKey", { json: { schema: "CreateKeyRequest", value: req }, signal: o.signal });
  }

  /** The keys this key may manage (without their secrets). */
  async list(o: { signal?: AbortSignal } = {}): Promise<ApiKey[]> {
    const list = await this.#t.json<"GET /keys", KeyList>("GET /keys", "KeyList", { signal: o.signal });
    return list.keys;
  }

  /** Revokes a key by id (idempotent, effective at once). */
  async delete(id: string, o: { signal?: AbortSignal } = {}): Promise<void> {
    await this.#t.empty("DELETE /keys/{id}", { path: { id }, signal: o.signal });
  }
}
