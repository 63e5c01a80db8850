#!/usr/bin/env node
// Generates src/generated/openapi.ts from the daemon's docs/openapi.json, so
// that the SDK's request and response types cannot drift from the API:
//
//   - one interface per schema, with the API's snake_case field names turned
//     into camelCase (`desired_status` -> `desiredStatus`), JSDoc from the
//     schema's descriptions, and a const array per string enum;
//   - `SHAPES`: for each schema, the fields whose values are objects of
//     another schema (directly, in arrays or nullable), which the SDK's
//     converters (src/wire.ts) follow to rename keys at every level while
//     leaving free-form maps (`env`, `metadata`, `urls`) as they are;
//   - `Routes`: every path and method with its path and query parameters
//     (wire names), so the client can only call routes the spec has.
//
// `node scripts/generate.mjs` rewrites the file; `--check` exits 1 when the
// committed file differs (test/generated.test.mjs runs the same comparison).
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const SPEC = join(here, "../../../docs/openapi.json");
export const OUT = join(here, "../src/generated/openapi.ts");

export function camel(name) {
  return name.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());
}

export function snake(name) {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

function refName(ref) {
  const prefix = "#/components/schemas/";
  if (!ref.startsWith(prefix)) throw new Error(`unsupported $ref ${ref}`);
  return ref.slice(prefix.length);
}

function doc(text, indent) {
  if (!text) return "";
  const lines = text.replace(/\*\//g, "*\\/").split("\n");
  if (lines.length === 1) return `${indent}/** ${lines[0]} */\n`;
  return `${indent}/**\n${lines.map((l) => `${indent} *${l ? ` ${l}` : ""}`).join("\n")}\n${indent} */\n`;
}

const PRIMITIVE = { string: "string", integer: "number", number: "number", boolean: "boolean", null: "null" };

/** The TypeScript type of a schema (inline), and the schema names it nests. */
function tsType(schema, nested, indent) {
  if (schema.$ref) {
    nested.add(refName(schema.$ref));
    return refName(schema.$ref);
  }
  if (schema.oneOf) {
    return schema.oneOf.map((s) => tsType(s, nested, indent)).join(" | ");
  }
  if (schema.allOf) {
    return schema.allOf.map((s) => tsType(s, nested, indent)).join(" & ");
  }
  if (schema.enum) {
    return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  }
  const types = Array.isArray(schema.type) ? schema.type : [schema.type];
  return types
    .map((t) => {
      if (t === "array") return `Array<${tsType(schema.items ?? {}, nested, indent)}>`;
      if (t === "object") {
        if (schema.properties) return objectBody(schema, nested, indent);
        const values = schema.additionalProperties;
        const v = values && typeof values === "object" ? tsType(values, new Set(), indent) : "unknown";
        return `Record<string, ${v}>`;
      }
      if (t === undefined) return "unknown";
      if (!(t in PRIMITIVE)) throw new Error(`unsupported type ${t}`);
      return PRIMITIVE[t];
    })
    .join(" | ");
}

function objectBody(schema, nested, indent) {
  const required = new Set(schema.required ?? []);
  const inner = `${indent}  `;
  let out = "{\n";
  for (const [name, prop] of Object.entries(schema.properties)) {
    const key = camel(name);
    if (snake(key) !== name) throw new Error(`field ${name} does not survive camelCase and back`);
    out += doc(prop.description, inner);
    const sub = new Set();
    out += `${inner}${key}${required.has(name) ? "" : "?"}: ${tsType(prop, sub, inner)};\n`;
    for (const s of sub) nested.add([name, s]);
  }
  return `${out}${indent}}`;
}

/** Wire field -> nested schema, for the fields that hold schema objects. */
function shapeOf(schema, schemas) {
  const out = {};
  const variants = schema.oneOf ?? schema.allOf ?? [schema];
  for (const v of variants) {
    if (v.$ref) Object.assign(out, shapeOf(schemas[refName(v.$ref)], schemas));
    for (const [name, prop] of Object.entries(v.properties ?? {})) {
      const refs = [];
      const walk = (s) => {
        if (s.$ref) refs.push(refName(s.$ref));
        for (const x of s.oneOf ?? []) walk(x);
        for (const x of s.allOf ?? []) walk(x);
        if (s.items) walk(s.items);
      };
      walk(prop);
      const objects = refs.filter((r) => {
        const t = schemas[r];
        return t.properties || t.oneOf || t.allOf;
      });
      if (objects.length > 1) throw new Error(`field ${name} nests several schemas`);
      if (objects.length === 1) out[name] = objects[0];
    }
  }
  return out;
}

function enumConst(name) {
  // MachineStatus -> MACHINE_STATUSES, Scope -> SCOPES, VmmKind -> VMM_KINDS
  const upper = snake(name).replace(/^_/, "").toUpperCase();
  return upper.endsWith("S") ? `${upper}ES` : `${upper}S`;
}

function paramType(p) {
  return tsType(p.schema ?? {}, new Set(), "    ");
}

export function generate(spec) {
  const schemas = spec.components.schemas;
  let out =
    "// Generated by scripts/generate.mjs from docs/openapi.json: do not edit.\n" +
    "// Regenerate with `npm run generate`; test/generated.test.mjs fails when\n" +
    "// this file and the spec differ.\n" +
    "/* eslint-disable */\n\n" +
    `/** The API version this file was generated from (\`info.version\`). */\n` +
    `export const API_VERSION = ${JSON.stringify(spec.info.version)};\n\n`;
  const shapes = {};
  for (const name of Object.keys(schemas).sort()) {
    const s = schemas[name];
    out += doc(s.description, "");
    if (s.enum) {
      out += `export type ${name} = ${s.enum.map((v) => JSON.stringify(v)).join(" | ")};\n`;
      out += `/** Every {@link ${name}}, in the spec's order. */\n`;
      out += `export const ${enumConst(name)} = ${JSON.stringify(s.enum)} as const satisfies readonly ${name}[];\n\n`;
      continue;
    }
    if (s.allOf && s.allOf.length === 2 && s.allOf[0].$ref && s.allOf[1].properties) {
      const base = refName(s.allOf[0].$ref);
      out += `export interface ${name} extends ${base} ${objectBody(s.allOf[1], new Set(), "")}\n\n`;
    } else if (s.properties) {
      out += `export interface ${name} ${objectBody(s, new Set(), "")}\n\n`;
    } else {
      out += `export type ${name} = ${tsType(s, new Set(), "")};\n\n`;
    }
    const shape = shapeOf(s, schemas);
    if (Object.keys(shape).length) shapes[name] = shape;
  }
  out += "/** Wire field -> schema of the object(s) it holds, per schema (see src/wire.ts). */\n";
  out += `export const SHAPES: Readonly<Record<string, Readonly<Record<string, string>>>> = ${JSON.stringify(shapes, null, 2)};\n\n`;

  out += "/** Every route of the API: `\"METHOD /path\"` -> its path and query parameters (wire names). */\n";
  out += "export interface Routes {\n";
  const methods = ["get", "put", "post", "delete", "patch"];
  for (const path of Object.keys(spec.paths).sort()) {
    for (const method of methods) {
      const op = spec.paths[path][method];
      if (!op) continue;
      const params = op.parameters ?? [];
      const group = (where) => {
        const ps = params.filter((p) => p.in === where);
        if (!ps.length) return "{}";
        return `{ ${ps.map((p) => `${p.name}${p.required ? "" : "?"}: ${paramType(p)}`).join("; ")} }`;
      };
      const body = op.requestBody?.content?.["application/json"]?.schema;
      const ok = Object.entries(op.responses ?? {}).find(([code]) => code.startsWith("2"));
      const resp = ok?.[1]?.content?.["application/json"]?.schema;
      out += `  ${JSON.stringify(`${method.toUpperCase()} ${path}`)}: {\n`;
      out += `    path: ${group("path")};\n`;
      out += `    query: ${group("query")};\n`;
      out += `    body: ${body ? tsType(body, new Set(), "    ") : "never"};\n`;
      out += `    response: ${resp ? tsType(resp, new Set(), "    ") : "void"};\n`;
      out += "  };\n";
    }
  }
  out += "}\n";
  return out;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const text = generate(JSON.parse(readFileSync(SPEC, "utf8")));
  if (process.argv.includes("--check")) {
    if (readFileSync(OUT, "utf8") !== text) {
      console.error(`${OUT} is stale: run \`npm run generate\``);
      process.exit(1);
    }
  } else {
    writeFileSync(OUT, text);
    console.log(`wrote ${OUT}`);
  }
}
