// Test harness: runs the real `hyperfleet serve` (built by `cargo build`) on a
// temporary data directory, like crates/hyperfleet/tests/common/mod.rs: the
// stub backend (a real `hyperfleet-testvmm` process per machine) by default,
// QEMU when asked. Stopping it ends only the processes this harness started
// (the daemon by pid, then the stand-in VMMs / QEMUs still running under its
// data directory, found by their command line) and removes the directory.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.HYPERFLEET_BIN ?? join(ROOT, "target/debug/hyperfleet");
export const TESTVMM = join(dirname(BIN), "hyperfleet-testvmm");
export const ASSETS = process.env.HF_TEST_ASSETS ?? join(ROOT, "target/hf-test-data/assets/current");

/**
 * `undefined` when `ok`; else the loud `MISSING: <what>` note: printed as
 * SKIPPED outside CI (the caller skips with it), and in CI a failing test,
 * since nothing the suite needs may be absent there.
 */
export function missing(ok, what) {
  if (ok) return undefined;
  const msg = `MISSING: ${what}`;
  if (process.env.CI) {
    test(`present: ${what}`, () => {
      throw new Error(`${msg}; CI must not skip`);
    });
  } else {
    console.error(`SKIPPED: ${msg}`);
  }
  return msg;
}

/** Live (non-zombie) processes whose command line contains both strings. */
function pidsMatching(marker, program) {
  const out = [];
  for (const name of readdirSync("/proc")) {
    const pid = Number(name);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    let cmd, stat;
    try {
      cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
      stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    } catch {
      continue;
    }
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    if (cmd.includes(marker) && cmd.includes(program) && state !== "Z") out.push(pid);
  }
  return out;
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export class Daemon {
  /** Starts a daemon; `args` are extra `serve` flags (they override the defaults). */
  static async start(args = []) {
    for (const f of [BIN, TESTVMM]) {
      if (!existsSync(f)) throw new Error(`MISSING: ${f} — build it with \`cargo build -p hyperfleet -p hyperfleet-testvmm\``);
    }
    const dir = mkdtempSync(join(tmpdir(), "hf-tssdk-"));
    const defaults = [
      ["--default-vmm", "stub"],
      ["--stop-timeout", "2"],
      ["--boot-timeout", "10"],
      ["--network", "off"],
      ["--proxy-port", "0"],
    ];
    const argv = ["serve", "--data-dir", dir, "--port", "0", "--stub-vmm-binary", TESTVMM, ...args];
    for (const [flag, value] of defaults) if (!args.includes(flag)) argv.push(flag, value);
    const log = openSync(join(dir, "daemon.log"), "a");
    const env = { ...process.env, HYPERFLEET_LOG: "debug" };
    delete env.HYPERFLEET_URL;
    delete env.HYPERFLEET_API_KEY;
    const child = spawn(BIN, argv, { stdio: ["ignore", log, log], env });
    closeSync(log);
    const d = new Daemon(dir, child);
    const deadline = Date.now() + 30_000;
    for (;;) {
      let addr = "";
      try {
        addr = readFileSync(join(dir, "api.addr"), "utf8");
      } catch {}
      if (addr.endsWith("\n")) {
        d.url = `http://${addr.trim()}`;
        break;
      }
      if (Date.now() > deadline || child.exitCode !== null) {
        const log = d.log();
        await d.stop();
        throw new Error(`the daemon did not start:\n${log}`);
      }
      await sleep(20);
    }
    d.key = readFileSync(join(dir, "admin.key"), "utf8").trim();
    return d;
  }

  constructor(dir, child) {
    this.dir = dir;
    this.child = child;
    this.url = "";
    this.key = "";
    this.exited = new Promise((r) => child.once("exit", r));
  }

  log() {
    try {
      return readFileSync(join(this.dir, "daemon.log"), "utf8");
    } catch {
      return "";
    }
  }

  /** Ends the daemon (SIGTERM, then SIGKILL), what it left running, and its directory. */
  async stop() {
    const pid = this.child.pid;
    if (this.child.exitCode === null && this.child.signalCode === null && pid) {
      process.kill(pid, "SIGTERM");
      const timer = new AbortController();
      const done = await Promise.race([
        this.exited.then(() => true),
        sleep(15_000, false, { signal: timer.signal }).catch(() => false),
      ]);
      timer.abort();
      if (!done) {
        process.kill(pid, "SIGKILL");
        await this.exited;
      }
    }
    const marker = `${this.dir}/`;
    for (const p of [...pidsMatching(marker, "hyperfleet-testvmm"), ...pidsMatching(this.dir, "qemu-system")]) {
      try {
        process.kill(p, "SIGKILL");
      } catch {}
    }
    for (let i = 0; i < 100 && [...pidsMatching(marker, "hyperfleet-testvmm")].some(alive); i++) await sleep(20);
    rmSync(this.dir, { recursive: true, force: true });
  }
}
