// The SDK against the real daemon with the stub backend (a real stand-in VMM
// process per machine, no guest): lifecycle, waiting, listing, events, logs,
// keys, quotas, errors, disposal. Commands and files need a guest: see
// qemu.test.mjs.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  ConflictError,
  ForbiddenError,
  Hyperfleet,
  HyperfleetError,
  InvalidStateError,
  Machine,
  NotFoundError,
  TimeoutError,
  UnauthorizedError,
  ValidationError,
  ConnectionError,
  MACHINE_STATUSES,
} from "hyperfleet";
import { Daemon } from "./daemon.mjs";

let d;
let hf;

before(async () => {
  d = await Daemon.start();
  hf = new Hyperfleet({ url: d.url, apiKey: d.key });
});

after(async () => {
  await d?.stop();
});

async function rejects(promise, cls, code, status) {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof cls, `${e} is a ${cls.name}`);
    assert.ok(e instanceof HyperfleetError);
    assert.equal(e.code, code);
    assert.equal(e.status, status);
    assert.equal(e.name, cls.name);
    assert.ok(e.message.length > 0);
    return true;
  });
}

describe("client", () => {
  test("reads HYPERFLEET_URL and HYPERFLEET_API_KEY", async () => {
    const saved = { url: process.env.HYPERFLEET_URL, key: process.env.HYPERFLEET_API_KEY };
    process.env.HYPERFLEET_URL = `${d.url}/`;
    process.env.HYPERFLEET_API_KEY = d.key;
    try {
      const env = new Hyperfleet();
      assert.equal(env.url, d.url);
      const page = await env.machines.page({ limit: 1 });
      assert.equal(typeof page.total, "number");
      // Options win over the environment.
      const other = new Hyperfleet({ apiKey: "hf_not_a_key" });
      await rejects(other.machines.page(), UnauthorizedError, "UNAUTHORIZED", 401);
    } finally {
      for (const [k, v] of [["HYPERFLEET_URL", saved.url], ["HYPERFLEET_API_KEY", saved.key]]) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });

  test("health needs no key", async () => {
    const h = await new Hyperfleet({ url: d.url, apiKey: "" }).health();
    assert.equal(h.status, "ok");
    assert.equal(h.defaultVmm, "stub");
    assert.ok(h.backends.some((b) => b.vmm === "stub" && b.available));
  });

  test("an unreachable daemon is a ConnectionError", async () => {
    const nobody = new Hyperfleet({ url: "http://127.0.0.1:1", apiKey: "x" });
    await assert.rejects(nobody.health(), (e) => e instanceof ConnectionError && e.code === "CONNECTION_ERROR" && e.status === undefined);
  });
});

describe("machines", () => {
  test("create, get, fields in camelCase, maps kept as they are", async () => {
    const m = await hf.machines.create({
      name: "fields",
      vcpuCount: 2,
      memSizeMib: 512,
      exposedPorts: [8080],
      env: { MY_VAR: "1" },
      metadata: { owner_team: "sdk" },
      network: { egress: false },
    });
    assert.ok(m instanceof Machine);
    assert.equal(m.name, "fields");
    assert.equal(m.status, "pending");
    assert.equal(m.vcpuCount, 2);
    assert.equal(m.memSizeMib, 512);
    assert.deepEqual(m.env, { MY_VAR: "1" });
    assert.deepEqual(m.metadata, { owner_team: "sdk" });
    assert.equal(m.network.egress, false);
    assert.equal(m.network.prefixLen, null);
    assert.match(m.accessToken, /^hft_/);
    assert.match(m.url(8080), new RegExp(`^http://8080-${m.id}\\.localhost:\\d+/$`));
    assert.match(m.url(8080, { withToken: true }), /\?hf_token=hft_/);
    assert.throws(() => m.url(9999), NotFoundError);
    const again = await hf.machines.get("fields");
    assert.equal(again.id, m.id);
    assert.deepEqual(JSON.parse(JSON.stringify(again)).metadata, { owner_team: "sdk" });
    await m.delete();
    await rejects(hf.machines.get(m.id), NotFoundError, "NOT_FOUND", 404);
  });

  test("every lifecycle action, and wait", async () => {
    const m = await hf.machines.create({ name: "life" });
    assert.equal((await m.start()).status, "running");
    assert.equal((await m.pause()).status, "paused");
    assert.equal((await m.resume()).status, "running");
    assert.equal((await m.suspend()).status, "suspended");
    assert.equal((await m.resume()).status, "running");
    assert.equal((await m.restart()).status, "running");
    assert.equal((await m.stop()).status, "stopped");
    assert.equal((await m.start({ wait: false })).desiredStatus, "running");
    assert.equal((await m.wait("running", { timeout: 30 })).status, "running");
    assert.equal((await m.kill()).status, "stopped");
    assert.equal(m.desiredStatus, "stopped");
    const before = m.generation;
    await m.refresh();
    assert.equal(m.generation, before);
    await m.delete();
  });

  test("update changes the idle timeout, persistence and metadata", async () => {
    const m = await hf.machines.create({ name: "ts-upd", idleTimeoutSeconds: 0, metadata: { a: "1" } }, { start: true });
    try {
      assert.deepEqual(m.persistence, { type: "sticky", priority: 5 });
      assert.equal(m.idleDeadline, null);
      await m.update({ idleTimeoutSeconds: 600, persistence: { type: "sticky", priority: 2 }, metadata: { b: "2" } });
      assert.equal(m.idleTimeoutSeconds, 600);
      assert.deepEqual(m.metadata, { b: "2" });
      assert.equal(m.persistence.priority, 2);
      assert.ok(m.idleDeadline, "re-armed");
      const again = await hf.machines.update("ts-upd", { idleTimeoutSeconds: null });
      assert.equal(again.idleTimeoutSeconds, null);
      assert.deepEqual(again.metadata, { b: "2" }, "left out: unchanged");
      await rejects(m.update({ persistence: { type: "sticky", priority: 11 } }), ValidationError, "VALIDATION_ERROR", 400);
      await m.update({ persistence: { type: "ephemeral" } });
      await rejects(m.suspend(), InvalidStateError, "INVALID_STATE", 409);
      await m.stop(); // deletes it (204)
      await rejects(m.refresh(), NotFoundError, "NOT_FOUND", 404);
    } finally {
      await m.dispose();
    }
  });

  test("errors carry the API's code and status", async () => {
    await rejects(hf.machines.get("nope"), NotFoundError, "NOT_FOUND", 404);
    await rejects(hf.machines.create({ memSizeMib: 1 }), ValidationError, "VALIDATION_ERROR", 400);
    const m = await hf.machines.create({ name: "errs" });
    await rejects(hf.machines.create({ name: "errs" }), ConflictError, "CONFLICT", 409);
    await rejects(m.pause(), InvalidStateError, "INVALID_STATE", 409);
    // Waiting for running on a machine nobody started cannot succeed.
    await rejects(m.wait("running", { timeout: 5 }), InvalidStateError, "INVALID_STATE", 409);
    await m.start();
    await rejects(m.delete(), InvalidStateError, "INVALID_STATE", 409);
    // The stub has no guest agent: commands are refused, with the reason.
    await rejects(m.exec(["true"]), InvalidStateError, "INVALID_STATE", 409);
    await rejects(m.execStream(["true"]), InvalidStateError, "INVALID_STATE", 409);
    await rejects(m.files.read("/etc/hostname"), InvalidStateError, "INVALID_STATE", 409);
    await m.delete({ force: true });
    await rejects(m.refresh(), NotFoundError, "NOT_FOUND", 404);
  });

  test("a wait past its timeout is a TimeoutError", async () => {
    const m = await hf.machines.create({ name: "slow", metadata: { stub_boot_ms: "30000" } });
    await m.start({ wait: false });
    const t0 = Date.now();
    await rejects(m.wait("running", { timeout: 1 }), TimeoutError, "TIMEOUT", 504);
    assert.ok(Date.now() - t0 < 10_000);
    await m.dispose();
  });

  test("waits longer than one round go on in rounds", async () => {
    const short = new Hyperfleet({ url: d.url, apiKey: d.key, waitRound: 1 });
    const m = await short.machines.create({ name: "rounds", metadata: { stub_boot_ms: "2500" } });
    const t0 = Date.now();
    await m.start({ timeout: 30 }); // the server answers TIMEOUT after 1 s; the SDK waits on
    assert.equal(m.status, "running");
    assert.ok(Date.now() - t0 >= 2000);
    await m.stop();
    await m.start({ wait: false });
    assert.equal((await m.wait("running", { timeout: 30 })).status, "running");
    // A restart is not continued: its outcome cannot be told from the state before it.
    await assert.rejects(m.restart({ timeout: 30 }), TimeoutError);
    await m.dispose();
  });

  test("list iterates every page; page and pages", async () => {
    const made = [];
    for (let i = 0; i < 5; i++) made.push(await hf.machines.create({ name: `page-${i}`, metadata: { batch: "pages" } }));
    await made[0].start();
    const all = [];
    for await (const m of hf.machines.list({ pageSize: 2 })) all.push(m);
    const names = all.map((m) => m.name);
    for (const m of made) assert.ok(names.includes(m.name), `${m.name} listed`);
    assert.equal(new Set(all.map((m) => m.id)).size, all.length, "no machine twice");
    const pages = [];
    for await (const p of hf.machines.pages({ pageSize: 2 })) pages.push(p);
    assert.ok(pages.length >= 3);
    assert.ok(pages.every((p) => p.machines.length <= 2 && p.total === all.length));
    const running = [];
    for await (const m of hf.machines.list({ status: "running" })) running.push(m.name);
    assert.ok(running.includes("page-0") && !running.includes("page-1"));
    const page = await hf.machines.page({ limit: 1, offset: 1 });
    assert.equal(page.machines.length, 1);
    assert.equal(page.total, all.length);
    for (const m of made) await m.dispose();
  });

  test("events: history with step timings, and followed live over SSE to deleted", async () => {
    const m = await hf.machines.create({ name: "evts" });
    await m.start();
    const history = [];
    for await (const e of m.events()) history.push(e);
    assert.deepEqual(history.slice(0, 1).map((e) => e.kind), ["created"]);
    const running = history.find((e) => e.kind === "transition" && e.toStatus === "running");
    assert.ok(running, JSON.stringify(history));
    assert.ok(running.steps.some((s) => s.step === "spawn_vmm" && typeof s.durationMs === "number"));
    assert.equal(running.machineId, m.id);

    const seen = [];
    const following = (async () => {
      for await (const e of m.events({ follow: true })) seen.push(e);
    })();
    await m.stop();
    await m.delete();
    await following; // ends by itself after `deleted`
    const kinds = seen.map((e) => e.kind);
    assert.equal(kinds[0], "created");
    assert.equal(kinds.at(-1), "deleted");
    assert.ok(seen.some((e) => e.kind === "transition" && e.toStatus === "stopped"));
    const ids = seen.map((e) => e.id);
    assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
    // Resuming after an event id skips what came before.
    assert.ok(history.length < seen.length);
  });

  test("logs: the console, and follow until the caller stops", async () => {
    const m = await hf.machines.create({ name: "logs" });
    await m.start();
    const lines = [];
    for await (const l of m.logs()) lines.push(l);
    assert.ok(lines.some((l) => l.includes("testvmm")), lines.join("\n"));
    const abort = new AbortController();
    const followed = [];
    for await (const l of m.logs({ follow: true, tail: 1, signal: abort.signal })) {
      followed.push(l);
      break; // leaving the loop closes the connection
    }
    assert.equal(followed.length, 1);
    await m.dispose();
  });

  test("a followed log that fetch gave up on for silence is picked up again", async () => {
    const urls = [];
    let cut = false;
    // A fetch whose first followed answer breaks off after its first chunk
    // as undici's body timeout does.
    const flaky = async (url, init) => {
      urls.push(String(url));
      const resp = await fetch(url, init);
      if (cut || !String(url).includes("follow=true")) return resp;
      cut = true;
      const reader = resp.body.getReader();
      const body = new ReadableStream({
        async pull(c) {
          const r = await reader.read();
          if (!r.done) c.enqueue(r.value);
          await reader.cancel();
          const timeout = Object.assign(new Error("Body Timeout Error"), { code: "UND_ERR_BODY_TIMEOUT" });
          c.error(new TypeError("terminated", { cause: timeout }));
        },
      });
      return new Response(body, { status: resp.status, headers: resp.headers });
    };
    const client = new Hyperfleet({ url: d.url, apiKey: d.key, fetch: flaky });
    const m = await client.machines.create({ name: "relog" }, { start: true });
    const abort = new AbortController();
    const got = [];
    const reading = (async () => {
      for await (const l of m.logs({ follow: true, signal: abort.signal })) {
        got.push(l);
        if (got.length === 2) return;
      }
    })();
    // The second request (tail=0) sees what the restarted stand-in prints.
    while (urls.filter((u) => u.includes("follow=true")).length < 2) await new Promise((r) => setTimeout(r, 20));
    await m.restart();
    await reading;
    const follows = urls.filter((u) => u.includes("follow=true"));
    assert.equal(follows.length, 2);
    assert.match(follows[1], /tail=0/);
    assert.ok(got.every((l) => l.includes("testvmm")), got.join("\n"));
    abort.abort();
    await m.dispose();
  });

  test("machines.with and dispose delete the machine", async () => {
    let id;
    const r = await hf.machines.with({ name: "scoped" }, async (m) => {
      id = m.id;
      assert.equal(m.status, "running");
      return 7;
    }, { start: true });
    assert.equal(r, 7);
    await rejects(hf.machines.get(id), NotFoundError, "NOT_FOUND", 404);
    await assert.rejects(hf.machines.with({ name: "scoped2" }, async () => {
      throw new Error("boom");
    }), /boom/);
    await rejects(hf.machines.get("scoped2"), NotFoundError, "NOT_FOUND", 404);
    const m = await hf.machines.create({ name: "disposed" }, { start: true });
    await m[Symbol.asyncDispose]();
    await m.dispose(); // already gone: no error
    await rejects(hf.machines.get("disposed"), NotFoundError, "NOT_FOUND", 404);
  });

  test("statuses match the spec", () => {
    assert.ok(MACHINE_STATUSES.includes("suspended"));
  });
});

describe("keys and quotas", () => {
  test("create, use, list, revoke", async () => {
    const created = await hf.keys.create({ name: "reader", scopes: ["read"], expiresInSeconds: 3600 });
    assert.match(created.key, /^hf_/);
    assert.deepEqual(created.scopes, ["read"]);
    assert.equal(created.tenant, "default");
    assert.ok(created.expiresAt);
    const listed = await hf.keys.list();
    const mine = listed.find((k) => k.id === created.id);
    assert.ok(mine && !("key" in mine) && mine.prefix && created.key.startsWith(mine.prefix));

    const reader = new Hyperfleet({ url: d.url, apiKey: created.key });
    const m = await hf.machines.create({ name: "secrets", env: { TOKEN: "s3cret" } });
    const seen = await reader.machines.get("secrets");
    assert.equal(seen.accessToken, null);
    assert.deepEqual(seen.env, { TOKEN: "<redacted>" });
    await rejects(reader.machines.create({}), ForbiddenError, "FORBIDDEN", 403);
    await rejects(reader.keys.list(), ForbiddenError, "FORBIDDEN", 403);

    await hf.keys.delete(created.id);
    await hf.keys.delete(created.id); // idempotent
    await rejects(reader.machines.get("secrets"), UnauthorizedError, "UNAUTHORIZED", 401);
    await m.dispose();
  });

  test("the last admin key cannot be revoked", async () => {
    const admins = (await hf.keys.list()).filter((k) => k.scopes.includes("admin") && !k.revokedAt);
    assert.equal(admins.length, 1);
    await rejects(hf.keys.delete(admins[0].id), ConflictError, "CONFLICT", 409);
  });

  test("quotas: set, refused create, reset", async () => {
    const q = await hf.quotas.set("quota-t", { maxMachines: 1 });
    assert.equal(q.limits.maxMachines, 1);
    assert.equal(q.default, false);
    const k = await hf.keys.create({ name: "q", scopes: ["read", "write"], tenant: "quota-t" });
    const tenant = new Hyperfleet({ url: d.url, apiKey: k.key });
    const m = await tenant.machines.create({ name: "one" });
    await assert.rejects(tenant.machines.create({ name: "two" }), (e) => e.code === "QUOTA_EXCEEDED" && e.status === 403 && e.name === "QuotaExceededError");
    const got = await hf.quotas.get("quota-t");
    assert.equal(got.usage.machines, 1);
    assert.equal((await hf.quotas.reset("quota-t")).default, true);
    await m.delete();
    await hf.keys.delete(k.id);
  });
});

describe("snapshots and fork", () => {
  test("snapshot, get, list, machines from it, deferred delete", async () => {
    const src = await hf.machines.create({ name: "snap-src" }, { start: true });
    try {
      const s = await src.snapshot({ name: "snap-one" });
      assert.equal(s.name, "snap-one");
      assert.equal(s.status, "ready");
      assert.equal(s.memory, true);
      assert.equal(s.machineId, src.id);
      assert.equal(s.vmm, "stub");
      assert.equal(s.usedBy, 0);
      assert.equal(typeof s.sizeBytes, "number");
      assert.equal((await src.refresh()).status, "running", "the source keeps running");
      await rejects(src.snapshot({ name: "snap-one" }), ConflictError, "CONFLICT", 409);
      assert.equal((await hf.snapshots.get("snap-one")).id, s.id);
      assert.equal((await hf.snapshots.get(s.id)).name, "snap-one");
      assert.ok((await hf.snapshots.list()).some((x) => x.id === s.id));

      // Not waiting: it comes back at once and becomes ready on its own.
      const s2 = await hf.snapshots.create(src, { name: "snap-two" }, { wait: false });
      assert.ok(["creating", "ready"].includes(s2.status), s2.status);
      const deadline = Date.now() + 30_000;
      while ((await hf.snapshots.get(s2.id)).status !== "ready") {
        assert.ok(Date.now() < deadline, "the snapshot never became ready");
        await new Promise((r) => setTimeout(r, 100));
      }
      await hf.snapshots.delete(s2);
      await rejects(hf.snapshots.get(s2.id), NotFoundError, "NOT_FOUND", 404);

      const child = await hf.machines.create({ name: "snap-child", snapshotId: s.id }, { start: true });
      try {
        assert.equal(child.snapshotId, s.id);
        assert.equal(child.status, "running");
        assert.equal((await hf.snapshots.get(s.id)).usedBy, 1);
        // In use: deleting is accepted and deferred; the child goes on.
        await hf.snapshots.delete("snap-one");
        assert.ok(!(await hf.snapshots.list()).some((x) => x.id === s.id));
        assert.equal((await child.refresh()).status, "running");
      } finally {
        await child.dispose();
      }
      await rejects(hf.machines.create({ snapshotId: "no-such-snapshot" }), NotFoundError, "NOT_FOUND", 404);
      await src.stop();
      const diskOnly = await src.snapshot();
      assert.equal(diskOnly.memory, false);
      assert.equal(diskOnly.name, null);
      await hf.snapshots.delete(diskOnly.id);
    } finally {
      await src.dispose();
    }
  });

  test("fork makes running copies; the source keeps running", async () => {
    const src = await hf.machines.create({ name: "fork-src" }, { start: true });
    try {
      const r = await src.fork({ names: ["fork-a", "fork-b"] });
      assert.deepEqual(r.machines.map((m) => m.name), ["fork-a", "fork-b"]);
      assert.ok(r.snapshotId.length > 0);
      for (const m of r.machines) {
        assert.ok(m instanceof Machine);
        assert.equal(m.status, "running");
        assert.equal(m.snapshotId, r.snapshotId);
        await m.dispose();
      }
      assert.equal((await src.refresh()).status, "running");
      const one = await src.fork();
      assert.equal(one.machines.length, 1);
      await one.machines[0].dispose();
      await rejects(src.fork({ count: 17 }), ValidationError, "VALIDATION_ERROR", 400);
      await rejects(src.fork({ count: 2, names: ["only-one"] }), ConflictError, "CONFLICT", 409);
      await src.stop();
      await rejects(src.fork(), InvalidStateError, "INVALID_STATE", 409);
    } finally {
      await src.dispose();
    }
  });

  test("templates: warm, list by key, a machine made from one, delete", async () => {
    const t = await hf.templates.warm({ vcpuCount: 1, memSizeMib: 384, vmm: "stub" });
    assert.equal(t.status, "ready");
    assert.equal(t.memory, true);
    assert.equal(t.memSizeMib, 384);
    assert.equal((await hf.templates.warm({ memSizeMib: 384 })).id, t.id, "warming again answers it");
    const listed = (await hf.templates.list()).find((x) => x.id === t.id);
    assert.ok(listed, "listed");
    assert.match(listed.name, /stub.*384/, "listed, a template is named by its key");
    assert.ok(!(await hf.snapshots.list()).some((x) => x.id === t.id));
    const m = await hf.machines.create({ name: "from-template", memSizeMib: 384 }, { start: true });
    try {
      assert.equal(m.snapshotId, t.id);
      assert.equal(m.status, "running");
    } finally {
      await m.dispose();
    }
    await hf.templates.delete(t);
    assert.ok(!(await hf.templates.list()).some((x) => x.id === t.id));
    await rejects(hf.templates.delete("no-such-template"), NotFoundError, "NOT_FOUND", 404);
    await rejects(hf.templates.warm({ memSizeMib: 1 }), ValidationError, "VALIDATION_ERROR", 400);
  });
});
