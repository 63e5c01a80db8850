"""The asyncio client against the stub daemon: the same surface as the sync
one (create as an awaitable and as ``async with``, list pages as an async
iterator, actions, wait, events followed over SSE, logs, keys, quotas,
errors)."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, List, TypeVar

import pytest

import hyperfleet
from hyperfleet import AsyncHyperfleet, MachineEvent

from conftest import Daemon, unique

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_async_machines(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncHyperfleet(daemon.url, daemon.key) as hf:
            label = unique("apage")
            made = [
                await hf.machines.create(unique("a"), metadata={"batch": label}) for _ in range(5)
            ]
            listed = [
                m async for m in hf.machines.list(page_size=2) if m.metadata.get("batch") == label
            ]
            assert [m.id for m in listed] == [m.id for m in made]
            page = await hf.machines.list_page(limit=2)
            assert len(page.machines) == 2 and page.total >= 5
            for m in made:
                await m.delete()

            async with hf.machines.create(unique("actx"), start=True) as m:
                assert isinstance(m, hyperfleet.AsyncMachine) and m.status == "running"
                assert (await m.pause()).status == "paused"
                assert (await m.resume()).status == "running"
                assert (await m.suspend()).status == "suspended"
                assert (await m.start()).status == "running"
                assert (await m.restart()).status == "running"
                await m.stop(wait=False)
                assert (await m.wait("stopped", timeout=30)).status == "stopped"
                with pytest.raises(hyperfleet.InvalidState):
                    await m.wait("running", timeout=5)
                assert (await m.kill()).status == "stopped"
                assert (await m.refresh()).status == "stopped"
                got = await hf.machines.get(m.name)
                assert got.id == m.id
            with pytest.raises(hyperfleet.NotFound) as e:
                await hf.machines.get(m.id)
            assert (e.value.code, e.value.status) == ("NOT_FOUND", 404)

            # `await` without `async with`, and the machine's own `async with`.
            m2 = await hf.machines.create(unique("aw"))
            async with m2:
                pass
            with pytest.raises(hyperfleet.NotFound):
                await m2.refresh()

    run(main())


def test_async_events_logs_and_errors(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncHyperfleet(daemon.url, daemon.key) as hf:
            m = await hf.machines.create(unique("aev"))
            seen: List[MachineEvent] = []

            async def follow() -> None:
                async for ev in m.events(follow=True):
                    seen.append(ev)

            task = asyncio.create_task(follow())
            await m.start()
            lines = [line async for line in m.logs()]
            assert any("testvmm" in line for line in lines), lines
            with pytest.raises(hyperfleet.InvalidState):
                await m.exec("true")
            with pytest.raises(hyperfleet.InvalidState):
                async for _ in m.exec_stream("true"):
                    pass
            history = [e async for e in m.events()]
            assert history[0].kind == "created" and history[-1].to_status == "running"
            await m.delete(force=True)
            await asyncio.wait_for(task, 30)
            kinds = [e.kind for e in seen]
            assert kinds[0] == "created" and kinds[-1] == "deleted", kinds

            with pytest.raises(hyperfleet.ValidationError):
                await hf.machines.create(vcpu_count=0)
            with pytest.raises(hyperfleet.TransportError):
                async with AsyncHyperfleet("http://127.0.0.1:1", "k") as bad:
                    await bad.machines.get("x")

            k = await hf.keys.create(unique("ak"), ["read"])
            assert k.id in {x.id for x in await hf.keys.list()}
            async with AsyncHyperfleet(daemon.url, k.key) as ro:
                with pytest.raises(hyperfleet.Forbidden):
                    await ro.machines.create()
            await hf.keys.delete(k)

            tenant = unique("at").replace("-", "_")
            q = await hf.quotas.set(tenant, max_vcpus=2)
            assert q.limits.max_vcpus == 2 and not q.default
            assert (await hf.quotas.get(tenant)).limits.max_vcpus == 2
            assert (await hf.quotas.reset(tenant)).default
            assert (await hf.health()).status == "ok"
            assert (await hf.request("GET", "/machines", params={"limit": 1}))["total"] >= 0

    run(main())
