"""``client.storage()`` (``GET /storage``) against a daemon of its own with the
stub backend and a small ``--storage-budget``: the figures are numbers, the
bytes a machine's disk holds (the stand-in VMM writes its
``stub_disk_used_bytes`` metadata's worth at the create's ``prepare_disk``)
show in ``used_bytes``, ``machines_bytes`` and the machine's
``stored_bytes``, an eviction over the budget shows in ``recent_evictions``,
and only keys of the operator tenant may read it."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterator, Optional, TypeVar

import pytest

import hyperfleet
from hyperfleet import AsyncHyperfleet, Hyperfleet, Persistence, Storage, StorageEviction

from conftest import Daemon, unique

MIB = 1 << 20
BUDGET = 6 * MIB
T = TypeVar("T")


@pytest.fixture(scope="module")
def budgeted() -> Iterator[Daemon]:
    """A daemon of its own: the figures are this test's machines only."""
    d = Daemon(["--storage-budget", str(BUDGET)])
    try:
        yield d
    finally:
        d.stop()


def eventually(what: str, check: Callable[[], Optional[T]], within: float = 40.0) -> T:
    """Poll ``check`` until it answers something (the daemon measures right
    after a step that changes a machine's files, and every 30 s)."""
    deadline = time.monotonic() + within
    while True:
        got = check()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(0.2)


def check_shape(s: Storage) -> None:
    numbers = (
        s.budget_bytes,
        s.used_bytes,
        s.machines_bytes,
        s.memory_images_bytes,
        s.snapshots_bytes,
        s.images_bytes,
        s.reclaimable_bytes,
        s.machines,
        s.evicted_memory_images,
        s.evicted_machines,
    )
    assert all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers), s
    assert s.used_bytes == s.machines_bytes + s.memory_images_bytes + s.snapshots_bytes, s
    assert isinstance(s.recent_evictions, list)
    assert all(isinstance(e, StorageEviction) for e in s.recent_evictions)


def test_storage_shows_what_the_machines_disks_hold(budgeted: Daemon) -> None:
    with budgeted.client() as hf:
        s = hf.storage()
        check_shape(s)
        assert (s.budget_bytes, s.budget_source) == (BUDGET, "flag"), s
        assert s.evicted_machines == 0 and s.recent_evictions == []

        # Its create's prepare_disk writes 2 MiB into the stand-in's disk.
        a = hf.machines.create(
            unique("held"),
            metadata={"stub_disk_used_bytes": str(2 * MIB)},
            persistence=Persistence("sticky", priority=0),
        )

        def measured() -> Optional[Storage]:
            s = hf.storage()
            return s if s.used_bytes >= 2 * MIB and s.machines >= 1 else None

        s = eventually("the machine's 2 MiB counted in used_bytes", measured)
        check_shape(s)
        assert s.machines_bytes >= 2 * MIB and s.measured_at, s
        assert s.used_bytes < BUDGET, s
        held = eventually("the machine's stored_bytes", lambda: a.refresh().stored_bytes)
        assert 2 * MIB <= held <= s.machines_bytes, (held, s)
        # Not running and sticky: the evictor could free it.
        assert s.reclaimable_bytes >= 2 * MIB, s

        # A second machine takes the data directory over the budget: the
        # evictor deletes the lower-priority one, and says so.
        b = hf.machines.create(
            unique("big"),
            metadata={"stub_disk_used_bytes": str(5 * MIB)},
            persistence=Persistence("sticky", priority=10),
        )

        def evicted() -> Optional[Storage]:
            s = hf.storage()
            return s if s.evicted_machines >= 1 else None

        s = eventually("an eviction", evicted)
        check_shape(s)
        last = s.recent_evictions[-1]
        assert (last.machine_id, last.machine_name, last.what) == (a.id, a.name, "machine"), s
        assert last.bytes >= 2 * MIB and last.at, last
        with pytest.raises(hyperfleet.NotFound):
            a.refresh()

        def under_budget() -> Optional[Storage]:
            s = hf.storage()
            return s if s.used_bytes < BUDGET else None

        s = eventually("used_bytes back under the budget", under_budget)
        assert s.used_bytes >= 5 * MIB, s
        b.delete(force=True)


def test_storage_takes_a_read_key_of_the_operator_tenant(budgeted: Daemon) -> None:
    with budgeted.client() as hf:
        ro = hf.keys.create(unique("ro"), ["read"])
        other = hf.keys.create(unique("other"), ["read"], tenant=unique("t").replace("-", "_"))
        try:
            with Hyperfleet(budgeted.url, ro.key) as c:
                check_shape(c.storage())
            with Hyperfleet(budgeted.url, other.key) as c:
                with pytest.raises(hyperfleet.Forbidden) as e:
                    c.storage()
                assert (e.value.code, e.value.status) == ("FORBIDDEN", 403)
        finally:
            hf.keys.delete(ro)
            hf.keys.delete(other)


def test_async_storage(budgeted: Daemon) -> None:
    async def main() -> Storage:
        async with AsyncHyperfleet(budgeted.url, budgeted.key) as hf:
            return await hf.storage()

    s = asyncio.run(asyncio.wait_for(main(), 60))
    check_shape(s)
    assert s.budget_bytes == BUDGET
