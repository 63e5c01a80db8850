"""The sync client against a real daemon with the stub backend: configuration,
create/get/list pages, every action, wait, the context manager, events (also
followed over SSE), console logs, keys, quotas and the errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import List

import httpx
import pytest

import hyperfleet
from hyperfleet import Hyperfleet, MachineEvent

from conftest import Daemon, unique


def test_config_comes_from_the_environment_like_the_cli(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPERFLEET_URL", daemon.url + "/api/v1/")
    monkeypatch.setenv("HYPERFLEET_API_KEY", daemon.key)
    with Hyperfleet() as hf:
        assert hf.url == daemon.url
        assert hf.machines.list_page(limit=1).total >= 0
        h = hf.health()
        assert h.status == "ok" and h.default_vmm == "stub" and h.store.ok
    # No key given: the bootstrap key file of HYPERFLEET_DATA_DIR, as the CLI.
    monkeypatch.delenv("HYPERFLEET_API_KEY")
    monkeypatch.setenv("HYPERFLEET_DATA_DIR", str(daemon.dir))
    with Hyperfleet() as hf:
        hf.machines.list_page(limit=1)
    # No key at all: the API refuses.
    monkeypatch.setenv("HYPERFLEET_DATA_DIR", str(daemon.dir / "nowhere"))
    with Hyperfleet() as hf, pytest.raises(hyperfleet.Unauthorized) as e:
        hf.machines.list_page(limit=1)
    assert e.value.status == 401 and e.value.code == "UNAUTHORIZED"
    with pytest.raises(ValueError):
        Hyperfleet("localhost:3000", "k")


def test_create_get_and_list_in_pages(daemon: Daemon) -> None:
    requests: List[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [requests.append]})
    hf = Hyperfleet(daemon.url, daemon.key, http_client=http)
    label = unique("page")
    made = [
        hf.machines.create(unique("p"), metadata={"batch": label}, mem_size_mib=128)
        for _ in range(7)
    ]
    try:
        m = made[0]
        assert m.status == "pending" and m.mem_size_mib == 128 and m.vmm == "stub"
        assert m.metadata == {"batch": label}
        assert hf.machines.get(m.name).id == m.id
        assert hf.machines.get(m.id).name == m.name

        requests.clear()
        listed = [x for x in hf.machines.list(page_size=3) if x.metadata.get("batch") == label]
        assert [x.id for x in listed] == [x.id for x in made], "creation order, every one once"
        pages = [r for r in requests if r.url.path == "/api/v1/machines"]
        total = hf.machines.list_page(limit=1).total
        assert len(pages) == -(-total // 3), "one request per page of 3"
        assert all(r.url.params["limit"] == "3" for r in pages)

        page = hf.machines.list_page(limit=2, offset=1)
        assert len(page.machines) == 2 and page.total == total
        pending = list(hf.machines.list(status="pending", page_size=1000))
        assert {x.id for x in made} <= {x.id for x in pending}
        assert all(x.status == "pending" for x in pending)
        assert not list(hf.machines.list(status="paused"))
    finally:
        for x in made:
            x.delete(force=True)
        hf.close()
        http.close()


def test_every_action_moves_the_machine(client: Hyperfleet) -> None:
    m = client.machines.create(unique("life"))
    try:
        assert m.start() is m and m.status == "running" and m.started_at
        gen = m.generation
        assert m.pause().status == "paused"
        assert m.resume().status == "running"
        assert m.suspend().status == "suspended"
        assert m.resume().status == "running"
        assert m.restart().status == "running"
        assert m.stop().status == "stopped"
        assert m.restart().status == "running", "restart of a stopped machine boots it"
        assert m.kill().status == "stopped"
        assert m.generation > gen
        assert m.refresh().status == "stopped"
        m.delete()
        with pytest.raises(hyperfleet.NotFound):
            m.refresh()
    finally:
        try:
            m.delete(force=True)
        except hyperfleet.NotFound:
            pass


def test_update_changes_idle_timeout_persistence_and_metadata(client: Hyperfleet) -> None:
    with client.machines.create(
        unique("upd"), idle_timeout_seconds=0, metadata={"a": "1"}, start=True
    ) as m:
        assert m.persistence == hyperfleet.Persistence("sticky", priority=5)
        assert m.idle_deadline is None
        m.update(
            idle_timeout_seconds=600,
            persistence=hyperfleet.Persistence("sticky", priority=2),
            metadata={"b": "2"},
        )
        assert m.idle_timeout_seconds == 600 and m.metadata == {"b": "2"}
        assert m.persistence is not None and m.persistence.priority == 2
        assert m.idle_deadline is not None, "re-armed"
        # Left out: unchanged; None: the server's default.
        again = client.machines.update(m.name, idle_timeout_seconds=None)
        assert again.idle_timeout_seconds is None and again.metadata == {"b": "2"}
        with pytest.raises(hyperfleet.ValidationError):
            m.update(persistence={"type": "sticky", "priority": 11})
        # An ephemeral machine is never suspended; its stop deletes it.
        m.update(persistence={"type": "ephemeral"})
        with pytest.raises(hyperfleet.InvalidState):
            m.suspend()
        m.stop()
        with pytest.raises(hyperfleet.NotFound):
            m.refresh()


def test_wait_and_requests_that_do_not_wait(client: Hyperfleet) -> None:
    with client.machines.create(unique("wait")) as m:
        m.start(wait=False)
        assert m.desired_status == "running"
        assert m.wait("running", timeout=30).status == "running"
        m.stop(wait=False)
        assert m.wait("stopped").status == "stopped"
        # Nobody asked it to run: `running` cannot come, so the wait ends at once.
        t = time.monotonic()
        with pytest.raises(hyperfleet.InvalidState) as e:
            m.wait("running", timeout=30)
        assert e.value.status == 409 and time.monotonic() - t < 10
        # A deadline shorter than the boot: 504 TIMEOUT, and the start goes on.
        with pytest.raises(hyperfleet.Timeout) as e2:
            m.start(timeout=0)
        assert e2.value.status == 504 and e2.value.code == "TIMEOUT"
        assert m.wait("running", timeout=30).status == "running"
        m.delete(force=True, wait=False)
        with pytest.raises(hyperfleet.InvalidState):
            m.start()
    with pytest.raises(hyperfleet.NotFound):
        client.machines.get(m.id)


def test_the_context_manager_deletes_the_machine(client: Hyperfleet) -> None:
    with client.machines.create(unique("ctx"), start=True) as m:
        assert m.status == "running"
    with pytest.raises(hyperfleet.NotFound):
        client.machines.get(m.id)
    with pytest.raises(ZeroDivisionError):
        with client.machines.create(unique("ctx")) as m2:
            raise ZeroDivisionError
    with pytest.raises(hyperfleet.NotFound):
        client.machines.get(m2.id)
    # Deleted inside the block already: leaving it is fine.
    with client.machines.create(unique("ctx")) as m3:
        m3.delete()


def test_errors_carry_the_api_code_and_status(daemon: Daemon, client: Hyperfleet) -> None:
    with pytest.raises(hyperfleet.NotFound) as nf:
        client.machines.get("no-such-machine")
    assert (nf.value.code, nf.value.status) == ("NOT_FOUND", 404)
    assert "no-such-machine" in nf.value.message and "NOT_FOUND" in str(nf.value)

    with client.machines.create(unique("err")) as m:
        with pytest.raises(hyperfleet.Conflict) as c:
            client.machines.create(m.name)
        assert (c.value.code, c.value.status) == ("CONFLICT", 409)
        with pytest.raises(hyperfleet.InvalidState):
            m.pause()  # pending: not allowed
        m.start()
        with pytest.raises(hyperfleet.InvalidState):
            m.delete()  # running: needs force
        with pytest.raises(hyperfleet.InvalidState, match="no guest agent"):
            m.exec(["true"])  # the stub backend has no guest
        with pytest.raises(hyperfleet.InvalidState):
            list(m.exec_stream(["true"]))
        with pytest.raises(hyperfleet.InvalidState):
            m.files.read("/etc/hostname")

    with pytest.raises(hyperfleet.ValidationError) as v:
        client.machines.create(mem_size_mib=1)
    assert (v.value.code, v.value.status) == ("VALIDATION_ERROR", 400)
    with pytest.raises(hyperfleet.ValidationError):
        client.machines.create(extra_body={"no_such_field": 1})

    with pytest.raises(hyperfleet.Unauthorized):
        Hyperfleet(daemon.url, "hf_" + "0" * 64).machines.get("x")

    with pytest.raises(hyperfleet.TransportError) as t:
        Hyperfleet("http://127.0.0.1:1", "k").machines.get("x")
    assert t.value.code is None and t.value.status is None
    assert isinstance(t.value.__cause__, httpx.HTTPError)

    # A start the host cannot hold the memory of.
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_total_mib = int(meminfo[meminfo.index("MemTotal:") + 1]) // 1024
    if mem_total_mib - 512 < 65536:
        with client.machines.create(unique("big"), mem_size_mib=65536) as big:
            with pytest.raises(hyperfleet.InsufficientCapacity) as ic:
                big.start()
            assert ic.value.status == 409


def test_events_history_and_live_stream(client: Hyperfleet) -> None:
    m = client.machines.create(unique("ev"))
    seen: List[MachineEvent] = []
    errors: List[BaseException] = []

    def follow() -> None:
        try:
            for ev in m.events(follow=True):
                seen.append(ev)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    m.start()
    m.stop()
    m.delete()
    t.join(30)
    assert not t.is_alive(), "the followed stream ends after `deleted`"
    assert not errors, errors
    kinds = [e.kind for e in seen]
    assert kinds[0] == "created" and kinds[-1] == "deleted", kinds
    assert [e.id for e in seen] == sorted({e.id for e in seen}), "each once, in order"
    to_running = [e for e in seen if e.kind == "transition" and e.to_status == "running"]
    assert to_running and {s.step for s in to_running[0].steps} >= {"spawn_vmm"}
    assert all(s.duration_ms >= 0 and s.outcome == "ok" for s in to_running[0].steps)
    assert any(e.kind == "requested" and e.operation_id for e in seen)


def test_events_history_resumes_after_an_id(client: Hyperfleet) -> None:
    with client.machines.create(unique("hist")) as m:
        m.start()
        history = list(m.events())
        assert history[0].kind == "created" and history[0].machine_id == m.id
        later = list(m.events(after=history[1].id))
        assert [e.id for e in later] == [e.id for e in history[2:]]
        # Followed from an id: history after it first, then live.
        it = m.events(follow=True, after=history[-2].id)
        assert next(it).id == history[-1].id
        it.close()


def test_console_logs(client: Hyperfleet) -> None:
    with client.machines.create(unique("log"), start=True) as m:
        lines = list(m.logs())
        assert any("testvmm" in line for line in lines), lines
        assert list(m.logs(tail=1)) == lines[-1:]
        it = m.logs(follow=True)
        assert "testvmm" in next(it)
        it.close()  # lets go of the followed stream


def test_keys(daemon: Daemon, client: Hyperfleet) -> None:
    name = unique("ro")
    k = client.keys.create(name, ["read"])
    assert k.key.startswith("hf_") and k.scopes == ["read"] and k.tenant == "default"
    assert k.key not in repr(k), "the secret stays out of reprs"
    listed = {x.id: x for x in client.keys.list()}
    assert (
        listed[k.id].name == name and listed[k.id].prefix and k.key.startswith(listed[k.id].prefix)
    )
    with Hyperfleet(daemon.url, k.key) as ro:
        ro.machines.list_page(limit=1)
        with pytest.raises(hyperfleet.Forbidden) as f:
            ro.machines.create()
        assert (f.value.code, f.value.status) == ("FORBIDDEN", 403)
        client.keys.delete(k)
        with pytest.raises(hyperfleet.Unauthorized):
            ro.machines.list_page(limit=1)
    client.keys.delete(k.id)  # idempotent
    revoked = [x for x in client.keys.list() if x.id == k.id]
    assert not revoked or revoked[0].revoked_at, "a revoked key is gone or shown revoked"
    with pytest.raises(hyperfleet.ValidationError):
        client.keys.create("bad", [])


def test_quotas(daemon: Daemon, client: Hyperfleet) -> None:
    tenant = unique("t").replace("-", "_")
    q = client.quotas.get(tenant)
    assert q.tenant == tenant and q.default and q.usage.machines == 0
    q = client.quotas.set(tenant, max_machines=1, max_memory_mib=1024)
    assert not q.default and q.limits.max_machines == 1 and q.limits.max_vcpus is None
    k = client.keys.create(unique("tk"), ["read", "write"], tenant=tenant)
    try:
        with Hyperfleet(daemon.url, k.key) as t:
            with t.machines.create(mem_size_mib=128):
                with pytest.raises(hyperfleet.QuotaExceeded) as e:
                    t.machines.create(mem_size_mib=128)
                assert (e.value.code, e.value.status) == ("QUOTA_EXCEEDED", 403)
                assert t.quotas.get(tenant).usage.machines == 1
                with pytest.raises(hyperfleet.Forbidden):
                    t.quotas.set(tenant, max_machines=5)
    finally:
        client.keys.delete(k)
    assert client.quotas.reset(tenant).default


def test_proxy_urls_and_secrets(client: Hyperfleet) -> None:
    with client.machines.create(
        unique("web"), exposed_ports=[8080], env={"PASSWORD": "s3cret"}
    ) as m:
        u = m.url(8080)
        assert u.startswith("http://8080-") and u.endswith("/"), u
        assert m.url(8080, with_token=True) == f"{u}?hf_token={m.access_token}"
        with pytest.raises(ValueError):
            m.url(9999)
        assert "s3cret" not in repr(m) and "hft_" not in repr(m)
        assert m.env == {"PASSWORD": "s3cret"}


def test_request_reaches_routes_directly(client: Hyperfleet) -> None:
    with client.machines.create(unique("raw")) as m:
        body = client.request("GET", f"/machines/{m.id}")
        assert body["name"] == m.name
        assert client.request("GET", "/machines", params={"limit": 1})["total"] >= 1
        with pytest.raises(hyperfleet.NotFound):
            client.request("GET", "/no-such-route")


def test_network_request_is_sent(client: Hyperfleet) -> None:
    with client.machines.create(
        unique("net"), network=hyperfleet.NetworkRequest(egress=False)
    ) as m:
        assert m.network is not None and m.network.egress is False
    with client.machines.create(unique("net"), network={"egress": True}, public=True) as m:
        assert m.network is not None and m.network.egress is True and m.public
