// The SDK against a real guest booted under QEMU (KVM where usable, else
// TCG): commands (buffered and streamed), files (both directions, large and
// ranged), the console log, and examples/quickstart.mjs. Needs
// qemu-system-x86_64 and the guest assets (scripts/test.sh builds them):
// skipped loudly without them, a failure in CI.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync, writeFileSync, mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { AgentError, BadRequestError, Hyperfleet, NotFoundError, ValidationError } from "hyperfleet";
import { ASSETS, Daemon, missing } from "./daemon.mjs";

const sha = (b) => createHash("sha256").update(b).digest("hex");

function qemuPresent() {
  const r = spawnSync("qemu-system-x86_64", ["--version"], { stdio: "ignore" });
  return r.status === 0 && existsSync(join(ASSETS, "manifest.json"));
}

const absent = missing(qemuPresent(), `qemu-system-x86_64 and guest assets in ${ASSETS} (scripts/test.sh installs and builds them)`);

describe("a real guest", { skip: absent ?? false }, () => {
  let d;
  let hf;
  let m;
  let scratch;

  before(async () => {
    d = await Daemon.start(["--default-vmm", "qemu", "--assets-dir", ASSETS, "--boot-timeout", "120"]);
    hf = new Hyperfleet({ url: d.url, apiKey: d.key });
    m = await hf.machines.create({ name: "real", memSizeMib: 256, env: { FROM_MACHINE: "yes" } }, { start: true, timeout: 300 });
    scratch = mkdtempSync(join(tmpdir(), "hf-tssdk-local-"));
  });

  after(async () => {
    if (m) await m.dispose().catch(() => {});
    await d?.stop();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  test("exec: output, exit code, stdin, env, cwd, timeout", async () => {
    assert.equal(m.status, "running");
    assert.equal(m.vmm, "qemu");
    const u = await m.exec(["uname", "-n"]);
    assert.deepEqual([u.exitCode, u.stdout, u.stderr, u.timedOut, u.truncated], [0, "real\n", "", false, false]);
    assert.equal(typeof u.durationMs, "number");
    const r = await m.exec("echo to-err >&2; cat; echo \" $FROM_MACHINE $EXTRA $(pwd)\"; exit 3", {
      stdin: "piped",
      env: { EXTRA: "x" },
      cwd: "/tmp",
    });
    assert.equal(r.exitCode, 3);
    assert.equal(r.stderr, "to-err\n");
    assert.equal(r.stdout, "piped yes x /tmp\n");
    const bin = await m.exec(["cat"], { stdin: new Uint8Array([104, 105]) });
    assert.equal(bin.stdout, "hi");
    const slow = await m.exec(["sleep", "30"], { timeout: 0.5 });
    assert.equal(slow.timedOut, true);
    const big = await m.exec("head -c 100000 /dev/zero | tr '\\0' a", { maxOutputBytes: 1000 });
    assert.equal(big.stdout.length, 1000);
    assert.equal(big.truncated, true);
    await assert.rejects(m.exec(["no-such-program"]), (e) => e instanceof BadRequestError || e instanceof AgentError || e.status >= 400);
    await assert.rejects(m.exec([]), ValidationError);
  });

  test("execStream: chunks as they come, the exit, early exit kills", async () => {
    const s = await m.execStream(["sh", "-c", "for i in 1 2 3; do echo out $i; sleep 0.2; done; echo bad >&2; exit 5"]);
    const seen = [];
    const at = [];
    for await (const c of s) {
      seen.push([c.type, Buffer.from(c.data).toString()]);
      at.push(Date.now());
    }
    const exit = await s.wait();
    assert.equal(exit.exitCode, 5);
    assert.equal(exit.timedOut, false);
    const out = seen.filter(([k]) => k === "stdout").map(([, v]) => v).join("");
    assert.equal(out, "out 1\nout 2\nout 3\n");
    assert.deepEqual(seen.filter(([k]) => k === "stderr").map(([, v]) => v), ["bad\n"]);
    assert.ok(at.at(-1) - at[0] >= 300, "output arrived as it was produced, not at the end");

    // Binary output survives; collect() gathers it.
    const b = await m.execStream(["head", "-c", "300000", "/dev/urandom"]);
    const all = await b.collect();
    assert.equal(all.exitCode, 0);
    assert.equal(all.stdout.length, 300000);

    // Leaving the loop closes the connection, which kills the command.
    const long = await m.execStream(["sh", "-c", "echo $$ > /tmp/streamer; echo started; sleep 300"]);
    for await (const c of long) {
      assert.equal(Buffer.from(c.data).toString(), "started\n");
      break;
    }
    await assert.rejects(long.wait(), /without its exit/);
    const pid = (await m.files.readText("/tmp/streamer")).trim();
    let alive = true;
    for (let i = 0; i < 50 && alive; i++) {
      alive = (await m.exec(["kill", "-0", pid])).exitCode === 0;
      if (alive) await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(alive, false, "the streamed command was killed when the client left");
  });

  test("files: write/read, ranges, stat/list/mkdir/remove/exists", async () => {
    const w = await m.files.write("/root/dir/a.txt", "hello\n", { createDirs: true, mode: 0o600 });
    assert.deepEqual(w, { path: "/root/dir/a.txt", size: 6 });
    assert.equal(await m.files.readText("/root/dir/a.txt"), "hello\n");
    const bytes = new Uint8Array(256).map((_, i) => i);
    await m.files.write("/root/dir/b.bin", bytes);
    assert.deepEqual(await m.files.read("/root/dir/b.bin"), bytes);
    assert.deepEqual(await m.files.read("/root/dir/b.bin", { offset: 10, length: 5 }), bytes.slice(10, 15));
    assert.deepEqual(await m.files.read("/root/dir/b.bin", { offset: 250 }), bytes.slice(250));
    async function* parts() {
      yield new TextEncoder().encode("streamed ");
      yield new TextEncoder().encode("body");
    }
    await m.files.write("/root/dir/c.txt", parts());
    assert.equal(await m.files.readText("/root/dir/c.txt"), "streamed body");

    const st = await m.files.stat("/root/dir/a.txt");
    assert.deepEqual([st.kind, st.size, st.mode & 0o777, st.uid], ["file", 6, 0o600, 0]);
    assert.equal(typeof st.modifiedAt, "string");
    await m.files.mkdir("/root/dir/sub/deeper", { createDirs: true });
    const names = (await m.files.list("/root/dir")).map((e) => `${e.name}:${e.kind}`).sort();
    assert.deepEqual(names, ["a.txt:file", "b.bin:file", "c.txt:file", "sub:dir"]);
    assert.equal(await m.files.exists("/root/dir/a.txt"), true);
    await m.files.remove("/root/dir/a.txt");
    assert.equal(await m.files.exists("/root/dir/a.txt"), false);
    await assert.rejects(m.files.read("/root/dir/a.txt"), NotFoundError);
    await assert.rejects(m.files.remove("/root/dir"), BadRequestError);
    await m.files.remove("/root/dir", { recursive: true });
    assert.equal(await m.files.exists("/root/dir"), false);
  });

  test("upload and download stream large files", async () => {
    const data = randomBytes(24 * 1024 * 1024);
    const local = join(scratch, "big.bin");
    writeFileSync(local, data);
    const up = await m.files.upload(local, "/root/big.bin");
    assert.equal(up.size, data.length);
    const sum = await m.exec(["sha256sum", "/root/big.bin"]);
    assert.equal(sum.stdout.split(" ")[0], sha(data));
    const back = join(scratch, "back.bin");
    assert.equal(await m.files.download("/root/big.bin", back), data.length);
    assert.equal(sha(readFileSync(back)), sha(data));
    const stream = await m.files.stream("/root/big.bin", { offset: data.length - 10 });
    const chunks = [];
    for await (const c of stream) chunks.push(c);
    assert.deepEqual(Buffer.concat(chunks), data.subarray(data.length - 10));
    await assert.rejects(m.files.upload(join(scratch, "missing"), "/root/x"), /ENOENT/);
    await m.files.remove("/root/big.bin");
  });

  test("the console log: its tail, and followed as the guest writes", async () => {
    const lines = [];
    for await (const l of m.logs({ tail: 10000 })) lines.push(l);
    assert.ok(lines.some((l) => /hyperfleet-agent.*starting/.test(l)), lines.slice(0, 20).join("\n"));
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 30_000);
    let found = false;
    const writer = (async () => {
      await new Promise((r) => setTimeout(r, 300));
      await m.exec("echo sdk-follow-marker > /dev/console");
    })();
    try {
      for await (const l of m.logs({ follow: true, tail: 0, signal: abort.signal })) {
        if (l.includes("sdk-follow-marker")) {
          found = true;
          break;
        }
      }
    } finally {
      clearTimeout(timer);
    }
    await writer;
    assert.ok(found, "the followed log showed the line the guest wrote");
  });

  test("examples/quickstart.mjs runs as written", async () => {
    const r = spawnSync(process.execPath, [new URL("../examples/quickstart.mjs", import.meta.url).pathname], {
      env: { ...process.env, HYPERFLEET_URL: d.url, HYPERFLEET_API_KEY: d.key },
      encoding: "utf8",
      timeout: 300_000,
    });
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, /^exit 0: Linux \S+\nhello from the SDK\n\ntick 1\ntick 2\ntick 3\nstreamed command exited 0\n$/);
    await assert.rejects(hf.machines.get("quickstart"), NotFoundError);
  });
});
