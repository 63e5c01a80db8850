// Compiled by tsc (tsconfig.test.json), so it checks the SDK's published
// declarations as a TypeScript user sees them, and that `await using`
// disposes a machine. The type assertions fail the build when the SDK's
// options drift from the routes and request schemas of docs/openapi.json.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  Hyperfleet,
  NotFoundError,
  type ActionOptions,
  type DeleteOptions,
  type ExecOptions,
  type ImageEventsOptions,
  type LogsOptions,
  type PageOptions,
  type Storage,
  type WriteOptions,
  type api,
} from "hyperfleet";
import { Daemon } from "../../test/daemon.mjs";

type Camel<S extends string> = S extends `${infer H}_${infer T}` ? `${H}${Capitalize<Camel<T>>}` : S;
type CamelKeys<T> = { [K in keyof T & string as Camel<K>]: T[K] };
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
function expectType<T extends true>(): T | void {}
type Routes = api.Routes;
type Query<K extends keyof Routes> = keyof CamelKeys<Routes[K]["query"]>;
type Own<T> = Exclude<keyof T, "signal">;

// Options name exactly the API's parameters (camelCase), no more, no fewer.
expectType<Equal<Own<ExecOptions>, Exclude<keyof api.ExecRequest, "command">>>();
expectType<Equal<Own<ActionOptions>, Query<"POST /machines/{id}/start">>>();
expectType<Equal<Own<ActionOptions>, Query<"POST /machines/{id}/suspend">>>();
expectType<Equal<Own<ActionOptions>, Query<"POST /machines/{id}/snapshots">>>();
expectType<Equal<Own<ActionOptions>, Query<"POST /machines/{id}/fork">>>();
expectType<Equal<Own<ActionOptions>, Query<"POST /templates">>>();
expectType<Equal<Own<DeleteOptions>, Query<"DELETE /machines/{id}">>>();
expectType<Equal<Own<WriteOptions>, Exclude<Query<"PUT /machines/{id}/files">, "path">>>();
expectType<Equal<Own<LogsOptions>, Query<"GET /machines/{id}/logs">>>();
expectType<Equal<Own<PageOptions>, Query<"GET /machines">>>();
expectType<Equal<Exclude<Own<ImageEventsOptions>, "follow">, Query<"GET /images/{id}/events">>>();
// The request bodies the SDK takes are the spec's, camelCased.
expectType<Equal<keyof api.CreateMachineRequest, keyof CamelKeys<Routes["POST /machines"]["body"]>>>();
expectType<Equal<keyof api.PullImageRequest, keyof CamelKeys<Routes["POST /images"]["body"]>>>();
// Top-level reads answer their route's response type.
expectType<Equal<Awaited<ReturnType<Hyperfleet["storage"]>>, Routes["GET /storage"]["response"]>>();
expectType<Equal<Awaited<ReturnType<Hyperfleet["storage"]>>, Storage>>();

let d: Daemon;
before(async () => {
  d = await Daemon.start();
});
after(async () => {
  await d?.stop();
});

test("await using deletes the machine at the end of its scope", async () => {
  const hf = new Hyperfleet({ url: d.url, apiKey: d.key });
  let id = "";
  {
    await using m = await hf.machines.create({ name: "using", vcpuCount: 1 }, { start: true });
    id = m.id;
    const status: api.MachineStatus = m.status;
    assert.equal(status, "running");
  }
  await assert.rejects(hf.machines.get(id), NotFoundError);
  // Also when the scope is left by an error.
  await assert.rejects(
    (async () => {
      await using m = await hf.machines.create({ name: "using2" });
      id = m.id;
      throw new Error("left by an error");
    })(),
    /left by an error/,
  );
  await assert.rejects(hf.machines.get(id), NotFoundError);
});
