#!/usr/bin/env python3
"""Memory-image benchmark with real QEMU guests (run by scripts/bench-snapshots.sh).

Each figure is printed beside its floor, measured in the same run:
  - create -> running from a template, beside the same QEMU restoring the same
    template image by hand (spawn -> migrate-incoming -> running) and beside a
    cold boot through the daemon;
  - fork of a running 256 MiB machine: per copy, the source's pause, and each
    copy's private memory (PSS of its QEMU) against the guest memory in use;
  - suspend -> running (resume) through the daemon, beside the same restore by
    hand (copy the RAM file to tmpfs, spawn, load, running).

Only processes this script started are ended, by pid.
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(os.environ.get("HF_BENCH_N", "10"))
MEM = 256


def pct(xs, p):
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def fmt(xs):
    return f"p50 {pct(xs, 50):7.1f} ms  p90 {pct(xs, 90):7.1f} ms  (n={len(xs)})"


class Daemon:
    def __init__(self, binary, assets, data):
        self.data = data
        log = open(os.path.join(data, "daemon.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", data, "--port", "0", "--proxy-port", "0",
             "--default-vmm", "qemu", "--assets-dir", assets, "--network", "off",
             "--boot-timeout", "180", "--disable-auth"],
            stdout=log, stderr=log, start_new_session=True)
        addr = os.path.join(data, "api.addr")
        for _ in range(400):
            if os.path.exists(addr) and open(addr).read().endswith("\n"):
                break
            time.sleep(0.05)
        self.url = "http://" + open(addr).read().strip() + "/api/v1"

    def call(self, method, path, body=None, ok=(200, 201, 202, 204)):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        out = json.loads(raw) if raw else {}
        if status not in ok:
            raise SystemExit(f"{method} {path}: {status} {out}")
        return out

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Qmp:
    def __init__(self, path, proc):
        for _ in range(2000):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("QEMU exited before QMP answered")
                time.sleep(0.001)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.x("qmp_capabilities")

    def x(self, cmd, args=None):
        m = {"execute": cmd}
        if args:
            m["arguments"] = args
        self.f.write(json.dumps(m) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise SystemExit(f"QMP {cmd}: {r['error']}")

    def close(self):
        self.s.close()


SYNC = b"\xff\x00HFSYNC"


def agent_hello(path, timeout=30.0):
    """One agent-protocol handshake (docs/agent-protocol.md): SYNC + Hello,
    until the HelloReply: the guest answers, as the daemon's wait_agent."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(timeout)
    hello = json.dumps({"protocol_version": 2, "min_protocol_version": 1,
                        "nonce": 4242, "client": "bench-floor"}).encode()
    s.sendall(SYNC + b"HF" + bytes([1, 0]) + (0).to_bytes(4, "big")
              + len(hello).to_bytes(4, "big") + hello)
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("the agent channel closed before the hello reply")
        buf += chunk
        while True:
            if buf.startswith(SYNC):
                buf = buf[len(SYNC):]
                continue
            if len(buf) < 12:
                break
            if buf[:2] != b"HF":
                buf = buf[1:]
                continue
            n = int.from_bytes(buf[8:12], "big")
            if len(buf) < 12 + n:
                break
            kind = buf[2]
            buf = buf[12 + n:]
            if kind == 2:
                s.close()
                return


def qemu_by_hand(tmp, assets, disk_backing, mem_object, state, copy_ram=None):
    """The daemon's restore, by hand: returns ms from (copy and) spawn to the
    guest agent's answer (running, as the daemon's wait_agent sees it)."""
    overlay = os.path.join(tmp, "floor.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    disk_backing, overlay], check=True)
    qmp = os.path.join(tmp, "floor.qmp")
    agent = os.path.join(tmp, "floor.agent")
    t0 = time.monotonic()
    if copy_ram:
        subprocess.run(["cp", "--sparse=always", copy_ram[0], copy_ram[1]], check=True)
    argv = ["qemu-system-x86_64", "-machine", "microvm,acpi=on,memory-backend=mem",
            "-bios", "/usr/share/qemu/qboot.rom", "-accel", "tcg", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-m", f"{MEM}M", "-smp", "1",
            "-object", mem_object,
            "-kernel", os.path.join(assets, "vmlinux"),
            "-initrd", os.path.join(assets, "initramfs.cpio"), "-append", "console=ttyS0",
            "-chardev", f"file,id=con,path={tmp}/floor.con", "-serial", "chardev:con",
            "-chardev", f"socket,id=agent,path={agent},server=on,wait=off",
            "-device", "virtio-serial-device",
            "-device", "virtserialport,chardev=agent,name=hf.agent",
            "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-drive", f"id=root,file={overlay},format=qcow2,if=none,file.locking=off",
            "-device", "virtio-blk-device,drive=root", "-incoming", "defer"]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        q = Qmp(qmp, proc)
        q.x("migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        q.x("migrate-incoming", {"uri": f"file:{state}"})
        while q.x("query-status")["status"] not in ("paused", "postmigrate", "running"):
            time.sleep(0.001)
        q.x("cont")
        agent_hello(agent)
        ms = (time.monotonic() - t0) * 1000
        q.close()
        return ms
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for f in (overlay, qmp, agent):
            if os.path.exists(f):
                os.remove(f)


def pss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def qemu_pid(data, machine_id):
    marker = os.path.join(data, "machines", machine_id)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd.split("\0")[0] and marker in cmd:
            return int(pid)
    return None


def main():
    binary = sys.argv[1]
    assets = os.path.realpath(sys.argv[2])
    data = tempfile.mkdtemp(prefix="hf-bench-snap-")
    tmp = tempfile.mkdtemp(prefix="hf-bench-floor-")
    d = Daemon(binary, assets, data)
    try:
        run(d, data, tmp, assets)
    finally:
        d.stop()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def timed(f):
    t0 = time.monotonic()
    out = f()
    return (time.monotonic() - t0) * 1000, out


def run(d, data, tmp, assets):
    print(f"memory-image benchmark: QEMU TCG, {MEM} MiB guests, {N} runs each")
    # 1. Cold boots through the daemon (no template yet).
    cold = []
    for i in range(max(3, N // 2)):
        ms, m = timed(lambda: (d.call("POST", "/machines", {"mem_size_mib": MEM}),)[0])
        ms2, _ = timed(lambda: d.call("POST", f"/machines/{m['id']}/start?timeout=300"))
        cold.append(ms + ms2)
        d.call("DELETE", f"/machines/{m['id']}?force=true")
    # The fork and suspend source boots cold, before any template exists:
    # its RAM is a file of its own (a machine made from a template maps the
    # template's privately, and its snapshots stream RAM instead).
    src = d.call("POST", "/machines", {"name": "fork-src", "mem_size_mib": MEM})
    d.call("POST", "/machines/fork-src/start?timeout=300")
    # 2. Template creates through the daemon.
    t = d.call("POST", "/templates?timeout=300", {"mem_size_mib": MEM})
    tdir = os.path.join(data, "snapshots", t["id"])
    fast = []
    for i in range(N):
        def create_and_start():
            m = d.call("POST", "/machines", {"mem_size_mib": MEM})
            d.call("POST", f"/machines/{m['id']}/start?timeout=300")
            return m
        ms, m = timed(create_and_start)
        fast.append(ms)
        ev = json.dumps(d.call("GET", f"/machines/{m['id']}/events"))
        assert f"template {t['id']}" in ev, ev
        d.call("DELETE", f"/machines/{m['id']}?force=true")
    # 3. The floor: the same restore by hand.
    floor = []
    for i in range(N):
        floor.append(qemu_by_hand(
            tmp, assets, os.path.join(tdir, "disk.qcow2"),
            f"memory-backend-file,id=mem,size={MEM}M,mem-path={tdir}/ram,share=off,readonly=on,rom=off",
            os.path.join(tdir, "state")))
    print(f"create -> running, template  {fmt(fast)}")
    print(f"  floor: restore by hand     {fmt(floor)}   ratio p50 {pct(fast, 50) / pct(floor, 50):.2f}x (target <= 1.3x, <= 300 ms)")
    print(f"  cold boot via the daemon   {fmt(cold)}   template/cold p50 {pct(fast, 50) / pct(cold, 50) * 100:.0f}% (target <= 25%)")

    # 4. Fork of a running machine with memory in use.
    d.call("POST", "/machines/fork-src/exec", {"command": ["sh", "-c",
           "mkdir -p /run/fill && dd if=/dev/urandom of=/run/fill/blob bs=1M count=48 2>/dev/null; sync"]})
    used = d.call("POST", "/machines/fork-src/exec", {"command": ["sh", "-c",
                  "awk '/MemTotal/ {t=$2} /MemAvailable/ {a=$2} END {print t-a}' /proc/meminfo"]})
    used_kib = int(used["stdout"].strip())
    per_copy, pauses, pss = [], [], []
    rounds = max(2, N // 3)
    for i in range(rounds):
        ms, f = timed(lambda: d.call("POST", "/machines/fork-src/fork?timeout=300", {"count": 3}))
        per_copy.append(ms / 3)
        pauses.append(f["pause_ms"])
        for m in f["machines"]:
            pid = qemu_pid(data, m["id"])
            if pid:
                pss.append(pss_kib(pid))
        for m in f["machines"]:
            d.call("DELETE", f"/machines/{m['id']}?force=true")
    print(f"fork, per copy (3 at once)   {fmt(per_copy)}  (target <= 300 ms)")
    print(f"  source paused              {fmt(pauses)}  (target <= 300 ms)")
    pss_mib = [p / 1024 for p in pss if p]
    print(f"  PSS per copy's QEMU        p50 {pct(pss_mib, 50):.0f} MiB  max {max(pss_mib):.0f} MiB"
          f"  vs guest memory in use {used_kib / 1024:.0f} MiB: {pct(pss_mib, 50) / (used_kib / 1024) * 100:.0f}% (target <= 50%)")

    # 5. Suspend -> resume through the daemon, and the same restore by hand.
    suspend, resume, hand = [], [], []
    sdir = os.path.join(data, "machines", src["id"], "snapshot")
    keep = os.path.join(tmp, "suspend-copy")
    memdir = None
    for i in range(max(3, N // 2)):
        ms, _ = timed(lambda: d.call("POST", "/machines/fork-src/suspend?timeout=300"))
        suspend.append(ms)
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(sdir, keep)
        ms, _ = timed(lambda: d.call("POST", "/machines/fork-src/resume?timeout=300"))
        resume.append(ms)
        if memdir is None:
            memdir = tempfile.mkdtemp(prefix="hf-bench-ram-", dir="/dev/shm")
        ram = os.path.join(memdir, "floor.ram")
        disk = os.path.join(data, "machines", src["id"], "disk.qcow2")
        hand.append(qemu_by_hand(
            tmp, assets, disk,
            f"memory-backend-file,id=mem,size={MEM}M,mem-path={ram},share=on",
            os.path.join(keep, "state"), copy_ram=(os.path.join(keep, "ram"), ram)))
        os.remove(ram)
    if memdir:
        shutil.rmtree(memdir, ignore_errors=True)
    print(f"suspend (memory to disk)     {fmt(suspend)}")
    print(f"resume -> running            {fmt(resume)}")
    print(f"  floor: restore by hand     {fmt(hand)}   ratio p50 {pct(resume, 50) / pct(hand, 50):.2f}x (target <= 1.3x)")
    d.call("DELETE", "/machines/fork-src?force=true")
    d.call("DELETE", f"/templates/{t['id']}")


if __name__ == "__main__":
    main()
