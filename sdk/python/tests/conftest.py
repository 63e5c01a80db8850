"""Test harness: runs the real ``hyperfleet serve`` on a temporary data
directory (stub backend: a real ``hyperfleet-testvmm`` process per machine; or
QEMU with the guest assets), hands out clients for it, and at the end ends
only the processes it started (the daemon by its pid, the VMMs by pid after
finding them by this run's data directory on their command line) and removes
the directory.

Paths: ``HYPERFLEET_BIN`` (default ``<repo>/target/debug/hyperfleet``), the
stand-in VMM beside it, ``HF_TEST_ASSETS`` (default
``<repo>/target/hf-test-data/assets/current``). What is absent is skipped with
a loud ``SKIPPED: MISSING: ...`` note, and fails the run when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import pytest

from hyperfleet import Hyperfleet

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("HYPERFLEET_BIN") or REPO / "target/debug/hyperfleet")
TESTVMM = BIN.with_name("hyperfleet-testvmm")
ASSETS = Path(os.environ.get("HF_TEST_ASSETS") or REPO / "target/hf-test-data/assets/current")
OPENAPI = REPO / "docs/openapi.json"


def missing(what: str) -> None:
    """Skip loudly, or fail when ``CI`` is set (nothing may be absent there)."""
    msg = f"MISSING: {what}"
    if os.environ.get("CI"):
        pytest.fail(f"{msg}; CI must not skip", pytrace=False)
    print(f"\nSKIPPED: {msg}", file=sys.stderr)
    pytest.skip(msg)


def qemu_present() -> bool:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def _pids_with(marker: str, programs: Sequence[str]) -> List[int]:
    """Live (non-zombie) processes whose command line has ``marker`` and one of ``programs``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = (
                Path(f"/proc/{entry}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode("utf-8", "replace")
            )
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[-1].split()[:1]
        if marker in cmd and any(p in cmd for p in programs) and state and state[0] != "Z":
            found.append(int(entry))
    return found


class Daemon:
    """One ``hyperfleet serve`` on a data directory of its own."""

    def __init__(self, args: Sequence[str] = ()) -> None:
        if not BIN.is_file():
            missing(f"{BIN} (build it with `cargo build --workspace --bins`)")
        if not TESTVMM.is_file():
            missing(f"{TESTVMM} (build it with `cargo build -p hyperfleet-testvmm`)")
        self.dir = Path(tempfile.mkdtemp(prefix="hf-pysdk-"))
        defaults = {
            "--default-vmm": "stub",
            "--stop-timeout": "2",
            "--boot-timeout": "10",
            "--network": "off",
            "--proxy-port": "0",
        }
        cmd = [
            str(BIN),
            "serve",
            "--data-dir",
            str(self.dir),
            "--port",
            "0",
            "--stub-vmm-binary",
            str(TESTVMM),
            *args,
        ]
        for flag, value in defaults.items():
            if flag not in args:
                cmd += [flag, value]
        # The daemon reads HYPERFLEET_* (and PROXY_PORT) from its environment:
        # only the flags above may configure it.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("HYPERFLEET_") and k != "PROXY_PORT"
        }
        env["NO_COLOR"] = "1"
        self.log_path = self.dir / "daemon.log"
        with open(self.log_path, "ab") as log:
            self.proc: Optional[subprocess.Popen[bytes]] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        addr_file = self.dir / "api.addr"
        deadline = time.monotonic() + 30
        while True:
            try:
                addr = addr_file.read_text()
            except OSError:
                addr = ""
            if addr.endswith("\n"):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = self.log()
                self.stop()
                raise RuntimeError(f"the daemon did not start:\n{log_text}")
            time.sleep(0.05)
        self.url = f"http://{addr.strip()}"
        self.key = (self.dir / "admin.key").read_text().strip()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def client(self, key: Optional[str] = None) -> Hyperfleet:
        return Hyperfleet(self.url, key or self.key)

    def vmm_pids(self) -> List[int]:
        return _pids_with(str(self.dir), ("hyperfleet-testvmm", "qemu-system"))

    def stop(self) -> None:
        """End the daemon (SIGTERM, then SIGKILL), then the VMMs it left
        (they outlive a daemon by design), then remove the data directory."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        # Twice: a VMM being spawned as the daemon stopped shows its command
        # line only once it has started.
        for _ in range(2):
            for pid in self.vmm_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """A daemon with the stub backend shared by the breadth tests."""
    d = Daemon()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Hyperfleet]:
    with daemon.client() as c:
        yield c


def unique(prefix: str) -> str:
    """A machine or key name not used before in this run."""
    unique.n += 1  # type: ignore[attr-defined]
    return f"{prefix}-{os.getpid()}-{unique.n}"  # type: ignore[attr-defined]


unique.n = 0  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the tail of the daemon's log to the report."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.failed and call.when == "call":
        for name in ("daemon", "qemu_daemon"):
            d = item.funcargs.get(name) if hasattr(item, "funcargs") else None  # type: ignore[attr-defined]
            if isinstance(d, Daemon):
                tail = "\n".join(d.log().splitlines()[-60:])
                rep.sections.append((f"{name} log (last 60 lines)", tail))
