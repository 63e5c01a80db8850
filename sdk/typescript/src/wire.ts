/**
 * Converts between the API's JSON (snake_case field names) and the SDK's
 * objects (camelCase), following the nesting the spec describes
 * (`SHAPES`, generated from docs/openapi.json). Only field names of schema
 * objects are renamed: free-form maps such as `env`, `metadata` and `urls`
 * keep their keys as they are. Fields the SDK does not know yet (a newer
 * daemon) are kept, renamed the same way.
 */
import { SHAPES } from "./generated/openapi.js";

const camel = (k: string): string => k.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
const snake = (k: string): string => k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

function convert(schema: string, value: unknown, rename: (k: string) => string, inbound: boolean): unknown {
  if (Array.isArray(value)) return value.map((v) => convert(schema, v, rename, inbound));
  if (value === null || typeof value !== "object") return value;
  const shape = SHAPES[schema] ?? {};
  const out: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(value as Record<string, unknown>)) {
    if (v === undefined) continue;
    const wire = inbound ? key : snake(key);
    const nested = shape[wire];
    out[rename(key)] = nested ? convert(nested, v, rename, inbound) : v;
  }
  return out;
}

/** The API's JSON for `schema` as the SDK's camelCase object. */
export function fromWire<T>(schema: string, value: unknown): T {
  return convert(schema, value, camel, true) as T;
}

/** The SDK's camelCase object for `schema` as the API's JSON. */
export function toWire(schema: string, value: unknown): unknown {
  return convert(schema, value, snake, false);
}
