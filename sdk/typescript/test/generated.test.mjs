// No drift from docs/openapi.json: the committed src/generated/openapi.ts is
// what scripts/generate.mjs makes of the spec today, every error code of the
// spec has its class, and the wire conversion keeps maps as they are.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { ERROR_CLASSES, HyperfleetError, NotFoundError, errorFor } from "hyperfleet";
import { OUT, SPEC, camel, generate, snake } from "../scripts/generate.mjs";

const spec = JSON.parse(readFileSync(SPEC, "utf8"));

test("src/generated/openapi.ts is up to date with docs/openapi.json", () => {
  const committed = readFileSync(OUT, "utf8");
  assert.ok(committed === generate(spec), "src/generated/openapi.ts is stale: run `npm run generate` in sdk/typescript and commit it");
});

test("every error code of the spec has its own class", () => {
  const codes = spec.components.schemas.ErrorCode.enum;
  assert.deepEqual(Object.keys(ERROR_CLASSES).sort(), [...codes].sort());
  for (const code of codes) {
    const e = errorFor(code, "m", 400);
    assert.ok(e instanceof ERROR_CLASSES[code] && e instanceof HyperfleetError);
    assert.equal(e.code, code);
  }
  const unknown = errorFor("SOMETHING_NEW", "m", 418);
  assert.equal(unknown.constructor, HyperfleetError);
  assert.ok(errorFor("NOT_FOUND", "m") instanceof NotFoundError);
});

test("every field name of the spec survives camelCase and back", () => {
  for (const [name, s] of Object.entries(spec.components.schemas)) {
    for (const v of [s, ...(s.oneOf ?? []), ...(s.allOf ?? [])]) {
      for (const field of Object.keys(v.properties ?? {})) {
        assert.equal(snake(camel(field)), field, `${name}.${field}`);
      }
    }
  }
});
