"""Real guests under QEMU: exec (buffered and streamed, sync and async) and
every file operation through the guest agent, and the quickstart example run
as it is. Needs qemu-system-x86_64 and the guest assets (scripts/test.sh
builds them); skipped loudly without them, and a failure in CI."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import hyperfleet
from hyperfleet import AsyncHyperfleet, Hyperfleet

from conftest import ASSETS, Daemon, missing, qemu_present, unique

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/quickstart.py"


@pytest.fixture(scope="module")
def qemu_daemon() -> Iterator[Daemon]:
    if not (ASSETS / "manifest.json").is_file() or not qemu_present():
        missing(
            f"qemu-system-x86_64 and guest assets in {ASSETS} "
            "(scripts/test.sh installs and builds them)"
        )
    d = Daemon(["--default-vmm", "qemu", "--assets-dir", str(ASSETS), "--boot-timeout", "120"])
    try:
        yield d
    finally:
        d.stop()


def test_exec_and_files_in_a_real_guest(qemu_daemon: Daemon, tmp_path: Path) -> None:
    with qemu_daemon.client() as hf, hf.machines.create(unique("q"), start=True, timeout=300) as m:
        assert m.vmm == "qemu" and m.status == "running" and m.image

        # Buffered exec.
        r = m.exec(["uname", "-a"])
        assert r.exit_code == 0 and r.ok and r.stdout.startswith(f"Linux {m.name} "), r
        r = m.exec("echo out; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
        assert r.stdout_bytes == b"out\n" and not r.ok and not r.truncated
        with pytest.raises(hyperfleet.CommandFailed) as cf:
            r.check()
        assert cf.value.result is r
        assert m.exec(["cat"], stdin=b"from stdin").stdout == "from stdin"
        assert m.exec('echo "$FOO"; pwd', env={"FOO": "bar"}, cwd="/tmp").stdout == "bar\n/tmp\n"
        r = m.exec("kill -9 $$")
        assert (r.exit_code, r.signal) == (None, 9) and not r.ok
        with pytest.raises(hyperfleet.NotFound, match="/no/such/program"):
            m.exec(["/no/such/program"])
        with pytest.raises(hyperfleet.NotFound):
            list(m.exec_stream(["/no/such/program"]))
        # Letting go of a streamed command kills it.
        it = m.exec_stream("echo started; sleep 2; touch /tmp/not-killed")
        assert next(it).data == b"started\n"
        it.close()
        time.sleep(3)
        assert not m.files.exists("/tmp/not-killed")
        r = m.exec(["sleep", "30"], timeout=0.5)
        assert r.timed_out and not r.ok
        r = m.exec("head -c 5000 /dev/zero", max_output_bytes=100)
        assert r.truncated and len(r.stdout) == 100

        # Streamed exec: output as it comes, exact bytes, the exit last.
        t0 = time.monotonic()
        arrivals = []
        events = []
        for ev in m.exec_stream(
            "for i in 1 2 3; do echo tick $i; sleep 0.4; done; printf '\\000\\377' >&2"
        ):
            arrivals.append(time.monotonic() - t0)
            events.append(ev)
        assert events[-1].type == "exit" and events[-1].exit_code == 0, events
        out = b"".join(e.data for e in events if e.type == "stdout")
        err = b"".join(e.data for e in events if e.type == "stderr")
        assert out == b"tick 1\ntick 2\ntick 3\n" and err == b"\x00\xff"
        assert arrivals[-1] - arrivals[0] >= 0.6, f"streamed, not buffered: {arrivals}"

        # Files.
        f = m.files
        f.mkdir("/srv/data/sub", create_dirs=True, mode=0o750)
        assert f.stat("/srv/data/sub").kind == "dir"
        assert f.write("/srv/data/a.bin", bytes(range(256))).size == 256
        assert f.read("/srv/data/a.bin") == bytes(range(256))
        assert f.read("/srv/data/a.bin", offset=10, length=5) == bytes(range(10, 15))
        assert f.read("/srv/data/a.bin", offset=250) == bytes(range(250, 256))
        assert f.read("/srv/data/a.bin", offset=250, length=100) == bytes(range(250, 256))
        with pytest.raises(hyperfleet.RangeNotSatisfiable) as rns:
            f.read("/srv/data/a.bin", offset=256)
        assert rns.value.status == 416
        f.write("/srv/data/b.txt", "text é\n", mode=0o600)
        assert f.read_text("/srv/data/b.txt") == "text é\n"
        st = f.stat("/srv/data/b.txt")
        assert (st.kind, st.size, st.mode & 0o777) == ("file", len("text é\n".encode()), 0o600)
        f.write("/srv/new/dir/c.txt", b"c", create_dirs=True)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
        assert f.upload(big, "/srv/data/big.bin").size == big.stat().st_size
        back = tmp_path / "back.bin"
        assert f.download("/srv/data/big.bin", back) == big.stat().st_size
        assert (
            hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
        )
        with open(big, "rb") as fh:
            fh.seek(1000)
            assert f.write("/srv/data/tail.bin", fh).size == big.stat().st_size - 1000
        assert m.exec("wc -c < /srv/data/tail.bin").stdout.strip() == str(big.stat().st_size - 1000)
        names = {e.name: e for e in f.list("/srv/data")}
        assert set(names) >= {"a.bin", "b.txt", "big.bin", "sub", "tail.bin"}
        assert names["sub"].kind == "dir" and names["a.bin"].size == 256
        assert f.exists("/srv/data/a.bin") and not f.exists("/srv/data/nope")
        f.remove("/srv/data/a.bin")
        assert not f.exists("/srv/data/a.bin")
        with pytest.raises(hyperfleet.NotFound):
            f.read("/srv/data/a.bin")
        with pytest.raises(hyperfleet.BadRequest):
            f.remove("/srv/data")  # not empty
        f.remove("/srv/data", recursive=True)
        assert not f.exists("/srv/data")

        # The serial console has the guest's boot output.
        assert any(line.strip() for line in m.logs(tail=50))

        # The async client in the same guest.
        async def async_side() -> None:
            async with AsyncHyperfleet(qemu_daemon.url, qemu_daemon.key) as ahf:
                am = await ahf.machines.get(m.id)
                r = await am.exec(["echo", "async"])
                assert r.stdout == "async\n"
                chunks = [ev async for ev in am.exec_stream(["sh", "-c", "echo a; echo b >&2"])]
                assert chunks[-1].type == "exit"
                assert b"".join(c.data for c in chunks if c.type == "stdout") == b"a\n"
                await am.files.write("/tmp/async.txt", b"x" * 10)
                assert await am.files.read("/tmp/async.txt") == b"x" * 10
                assert await am.files.read("/tmp/async.txt", offset=8) == b"xx"
                await am.files.upload(big, "/tmp/big.bin")
                await am.files.download("/tmp/big.bin", tmp_path / "aback.bin")
                assert (tmp_path / "aback.bin").read_bytes() == big.read_bytes()
                await am.files.mkdir("/tmp/ad")
                assert [e.name for e in await am.files.list("/tmp/ad")] == []
                assert (await am.files.stat("/tmp/async.txt")).size == 10
                await am.files.remove("/tmp/ad")
                assert not await am.files.exists("/tmp/ad")

        asyncio.run(asyncio.wait_for(async_side(), 300))


def test_the_quickstart_example_runs(qemu_daemon: Daemon) -> None:
    env = {**os.environ, "HYPERFLEET_URL": qemu_daemon.url, "HYPERFLEET_API_KEY": qemu_daemon.key}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    assert "0 Linux " in out.stdout and "tick 3" in out.stdout, out.stdout
    assert out.stdout.count("hello from python") == 2, out.stdout
    assert "running -> suspending" in out.stdout, out.stdout
    with Hyperfleet(qemu_daemon.url, qemu_daemon.key) as hf:
        assert hf.machines.list_page().total == 0, "the example deleted its machine"
