// hf.storage() (GET /storage) against a daemon of its own with the stub
// backend and a small --storage-budget: the figures are numbers, the bytes a
// machine's disk holds (the stand-in VMM writes its `stub_disk_used_bytes`
// metadata's worth at the create's prepare_disk) show in usedBytes,
// machinesBytes and the machine's storedBytes, an eviction over the budget
// shows in recentEvictions, and only keys of the operator tenant may read it.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { ForbiddenError, Hyperfleet, NotFoundError } from "hyperfleet";
import { Daemon } from "./daemon.mjs";

const MIB = 1 << 20;
const BUDGET = 6 * MIB;

let d;
let hf;

before(async () => {
  d = await Daemon.start(["--storage-budget", String(BUDGET)]);
  hf = new Hyperfleet({ url: d.url, apiKey: d.key });
});

after(async () => {
  await d?.stop();
});

/** Polls `check` until it answers something (the daemon measures right after
 * a step that changes a machine's files, and every 30 s). */
async function eventually(what, check, withinMs = 40_000) {
  const deadline = Date.now() + withinMs;
  for (;;) {
    const got = await check();
    if (got !== undefined) return got;
    if (Date.now() > deadline) assert.fail(`not within ${withinMs} ms: ${what}`);
    await sleep(200);
  }
}

function checkShape(s) {
  for (const k of [
    "budgetBytes",
    "usedBytes",
    "machinesBytes",
    "memoryImagesBytes",
    "snapshotsBytes",
    "imagesBytes",
    "reclaimableBytes",
    "machines",
    "evictedMemoryImages",
    "evictedMachines",
  ]) {
    assert.ok(Number.isSafeInteger(s[k]) && s[k] >= 0, `${k}: ${JSON.stringify(s)}`);
  }
  assert.equal(typeof s.budgetSource, "string");
  assert.equal(s.usedBytes, s.machinesBytes + s.memoryImagesBytes + s.snapshotsBytes, JSON.stringify(s));
  assert.ok(Array.isArray(s.recentEvictions));
  assert.ok(!("used_bytes" in s), "field names are camelCase");
}

test("storage shows what the machines' disks hold, and an eviction", async () => {
  let s = await hf.storage();
  checkShape(s);
  assert.equal(s.budgetBytes, BUDGET);
  assert.equal(s.budgetSource, "flag");
  assert.equal(s.evictedMachines, 0);
  assert.deepEqual(s.recentEvictions, []);

  // Its create's prepare_disk writes 2 MiB into the stand-in's disk.
  const a = await hf.machines.create({
    name: "held",
    metadata: { stub_disk_used_bytes: String(2 * MIB) },
    persistence: { type: "sticky", priority: 0 },
  });
  s = await eventually("the machine's 2 MiB counted in usedBytes", async () => {
    const s = await hf.storage();
    return s.usedBytes >= 2 * MIB && s.machines >= 1 ? s : undefined;
  });
  checkShape(s);
  assert.ok(s.machinesBytes >= 2 * MIB && s.measuredAt, JSON.stringify(s));
  assert.ok(s.usedBytes < BUDGET, JSON.stringify(s));
  const held = await eventually("the machine's storedBytes", async () => (await a.refresh()).storedBytes ?? undefined);
  assert.ok(held >= 2 * MIB && held <= s.machinesBytes, `${held} ${JSON.stringify(s)}`);
  // Not running and sticky: the evictor could free it.
  assert.ok(s.reclaimableBytes >= 2 * MIB, JSON.stringify(s));

  // A second machine takes the data directory over the budget: the evictor
  // deletes the lower-priority one, and says so.
  const b = await hf.machines.create({
    name: "big",
    metadata: { stub_disk_used_bytes: String(5 * MIB) },
    persistence: { type: "sticky", priority: 10 },
  });
  s = await eventually("an eviction", async () => {
    const s = await hf.storage();
    return s.evictedMachines >= 1 ? s : undefined;
  });
  checkShape(s);
  const last = s.recentEvictions.at(-1);
  assert.deepEqual([last.machineId, last.machineName, last.what], [a.id, "held", "machine"], JSON.stringify(s));
  assert.ok(last.bytes >= 2 * MIB && last.at, JSON.stringify(last));
  await assert.rejects(a.refresh(), NotFoundError);
  s = await eventually("usedBytes back under the budget", async () => {
    const s = await hf.storage();
    return s.usedBytes < BUDGET ? s : undefined;
  });
  assert.ok(s.usedBytes >= 5 * MIB, JSON.stringify(s));
  await b.delete({ force: true });
});

test("storage takes a read key of the operator tenant", async () => {
  const ro = await hf.keys.create({ name: "ro", scopes: ["read"] });
  const other = await hf.keys.create({ name: "other", scopes: ["read"], tenant: "elsewhere" });
  try {
    checkShape(await new Hyperfleet({ url: d.url, apiKey: ro.key }).storage());
    await assert.rejects(
      new Hyperfleet({ url: d.url, apiKey: other.key }).storage(),
      (e) => e instanceof ForbiddenError && e.code === "FORBIDDEN" && e.status === 403,
    );
  } finally {
    await hf.keys.delete(ro.id);
    await hf.keys.delete(other.id);
  }
});
