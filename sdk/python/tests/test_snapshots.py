"""Snapshots, machines made from them, forks and templates against the stub
daemon (its builder machine for a template is a stand-in process), with the
sync and the asyncio client."""

from __future__ import annotations

import asyncio
import time

import pytest

import hyperfleet
from hyperfleet import AsyncHyperfleet, Hyperfleet

from conftest import Daemon, unique


def test_snapshot_create_get_list_delete_and_machines_from_it(client: Hyperfleet) -> None:
    with client.machines.create(unique("snapsrc"), start=True) as src:
        name = unique("snap")
        s = src.snapshot(name)
        assert isinstance(s, hyperfleet.Snapshot)
        assert (s.name, s.status, s.memory, s.machine_id) == (name, "ready", True, src.id)
        assert (s.vcpu_count, s.mem_size_mib, s.vmm) == (src.vcpu_count, src.mem_size_mib, "stub")
        assert s.used_by == 0 and s.error_message is None
        assert src.refresh().status == "running", "the source keeps running"

        with pytest.raises(hyperfleet.Conflict):
            src.snapshot(name)  # names are unique among the tenant's snapshots
        assert client.snapshots.get(name).id == s.id
        assert client.snapshots.get(s.id).name == name
        assert s.id in {x.id for x in client.snapshots.list()}

        # Through client.snapshots, not waiting: it becomes ready on its own.
        s2 = client.snapshots.create(src, name=unique("snap"), wait=False)
        assert s2.status in ("creating", "ready")
        deadline = time.monotonic() + 30
        while client.snapshots.get(s2.id).status != "ready":
            assert time.monotonic() < deadline, "the snapshot never became ready"
            time.sleep(0.1)
        client.snapshots.delete(s2)
        with pytest.raises(hyperfleet.NotFound):
            client.snapshots.get(s2.id)

        # A machine from it (by Snapshot, by name), which starts from it.
        with client.machines.create(unique("child"), snapshot_id=s, start=True) as child:
            assert child.snapshot_id == s.id and child.status == "running"
            assert client.snapshots.get(s.id).used_by == 1
            with client.machines.create(unique("child"), snapshot_id=name) as other:
                assert other.snapshot_id == s.id
            # Deleting it while in use is accepted: the child goes on.
            client.snapshots.delete(s.id)
            assert s.id not in {x.id for x in client.snapshots.list()}
            assert child.refresh().status == "running"
        with pytest.raises(hyperfleet.NotFound):
            client.machines.create(unique("orphan"), snapshot_id="no-such-snapshot")
        with pytest.raises(hyperfleet.NotFound):
            client.snapshots.get("no-such-snapshot")
        src.stop()
        disk_only = src.snapshot()
        assert disk_only.memory is False and disk_only.name is None
        client.snapshots.delete(disk_only)


def test_fork_makes_running_copies(client: Hyperfleet) -> None:
    with client.machines.create(unique("forksrc"), start=True) as src:
        names = [unique("fork"), unique("fork")]
        r = src.fork(names=names)
        try:
            assert isinstance(r, hyperfleet.ForkResult) and len(r) == 2
            assert [m.name for m in r] == names
            for m in r:
                assert isinstance(m, hyperfleet.Machine)
                assert m.status == "running" and m.snapshot_id == r.snapshot_id
            assert r.snapshot_id and r[0].id != r[1].id
            assert src.refresh().status == "running"
        finally:
            for m in r:
                m.delete(force=True)
        one = src.fork()
        assert len(one.machines) == 1
        with one[0]:
            assert one[0].status == "running"
        with pytest.raises(hyperfleet.ValidationError):
            src.fork(17)
        with pytest.raises(hyperfleet.Conflict):
            src.fork(2, names=["only-one"])
        with pytest.raises(TypeError):
            src.fork(names="one-string")
        src.stop()
        with pytest.raises(hyperfleet.InvalidState):
            src.fork()


def test_templates_warm_list_use_and_delete(client: Hyperfleet) -> None:
    t = client.templates.warm(vcpu_count=1, mem_size_mib=384, vmm="stub")
    assert isinstance(t, hyperfleet.Snapshot)
    assert (t.status, t.memory, t.mem_size_mib, t.vmm) == ("ready", True, 384, "stub")
    assert client.templates.warm(mem_size_mib=384).id == t.id, "warming again answers it"
    listed = {x.id: x for x in client.templates.list()}
    assert t.id in listed
    key = listed[t.id].name or ""
    assert "stub" in key and "384" in key, "listed, a template is named by its key"
    assert t.id not in {x.id for x in client.snapshots.list()}
    # A machine of that size is made from it.
    with client.machines.create(unique("fast"), mem_size_mib=384, start=True) as m:
        assert m.snapshot_id == t.id and m.status == "running"
    client.templates.delete(t)
    assert t.id not in {x.id for x in client.templates.list()}
    with pytest.raises(hyperfleet.NotFound):
        client.templates.delete("no-such-template")
    with pytest.raises(hyperfleet.ValidationError):
        client.templates.warm(mem_size_mib=1)


def test_async_snapshots_and_fork(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncHyperfleet(daemon.url, daemon.key) as hf:
            async with hf.machines.create(unique("asnap"), start=True) as src:
                s = await src.snapshot(unique("asnap"))
                assert s.status == "ready" and s.memory
                assert (await hf.snapshots.get(s.id)).name == s.name
                assert s.id in {x.id for x in await hf.snapshots.list()}
                async with hf.machines.create(snapshot_id=s, start=True) as child:
                    assert child.snapshot_id == s.id and child.status == "running"
                r = await src.fork(2)
                assert len(r) == 2 and all(isinstance(m, hyperfleet.AsyncMachine) for m in r)
                for m in r:
                    assert m.status == "running"
                    await m.delete(force=True)
                await hf.snapshots.delete(s)
                with pytest.raises(hyperfleet.NotFound):
                    await hf.snapshots.get(s.id)
                t = await hf.templates.warm(mem_size_mib=448)
                assert t.status == "ready"
                assert t.id in {x.id for x in await hf.templates.list()}
                await hf.templates.delete(t.id)

    asyncio.run(asyncio.wait_for(main(), 120))
