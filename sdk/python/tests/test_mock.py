"""Client logic for answers a healthy daemon rarely gives on cue, against a
scripted ``httpx.MockTransport``: waits longer than the server's 600 s
chained, an SSE stream that fell behind resumed from its last id, an error
line in the middle of a streamed exec, a degraded health answer."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Callable, Dict, List

import httpx
import pytest

import hyperfleet
from hyperfleet import AsyncHyperfleet, Hyperfleet

MACHINE: Dict[str, Any] = {
    "id": "m1",
    "name": "one",
    "status": "running",
    "desired_status": "running",
    "vmm": "stub",
    "vcpu_count": 1,
    "mem_size_mib": 256,
    "exposed_ports": [],
    "generation": 2,
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
}


def err(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": code.lower()}})


def client(handler: Callable[[httpx.Request], httpx.Response]) -> Hyperfleet:
    return Hyperfleet(
        "http://hf.test", "hf_k", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )


def test_long_waits_are_chained_under_the_servers_cap() -> None:
    asked: List[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/wait"):
            asked.append(req.url.params["timeout"])
            return err(504, "TIMEOUT") if len(asked) < 3 else httpx.Response(200, json=MACHINE)
        return httpx.Response(200, json={**MACHINE, "status": "starting"})

    hf = client(handler)
    m = hf.machines.get("one")
    assert m.status == "starting"
    assert m.wait("running", timeout=1300).status == "running"
    assert asked == ["600", "600", "600"]
    asked.clear()

    def never(req: httpx.Request) -> httpx.Response:
        return err(504, "TIMEOUT") if req.url.path.endswith("/wait") else handler(req)

    m = client(never).machines.get("one")
    with pytest.raises(hyperfleet.Timeout):
        m.wait("running", timeout=0.2)


def sse(*events: Dict[str, Any], lagged: bool = False) -> bytes:
    out = ""
    for e in events:
        out += f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e)}\n\n"
    if lagged:
        out += "event: lagged\ndata: reconnect with Last-Event-ID\n\n"
    return out.encode()


def event(id: int, kind: str) -> Dict[str, Any]:
    return {"id": id, "machine_id": "m1", "at": "2026-01-01T00:00:00Z", "kind": kind}


def test_a_followed_event_stream_that_fell_behind_is_resumed() -> None:
    last_ids: List[Any] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/events"):
            assert req.headers["accept"] == "text/event-stream"
            last_ids.append(req.headers.get("last-event-id"))
            body = (
                sse(event(1, "created"), event(2, "requested"), lagged=True)
                if len(last_ids) == 1
                else sse(event(3, "transition"), event(4, "deleted"), event(5, "never"))
            )
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=MACHINE)

    m = client(handler).machines.get("one")
    assert [e.id for e in m.events(follow=True)] == [1, 2, 3, 4]
    assert last_ids == [None, "2"]

    async def run() -> List[int]:
        last_ids.clear()
        async with AsyncHyperfleet(
            "http://hf.test",
            "k",
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        ) as hf:
            am = await hf.machines.get("one")
            return [e.id async for e in am.events(follow=True, after=0)]

    assert asyncio.run(run()) == [1, 2, 3, 4]
    assert last_ids == ["0", "2"]


def test_an_error_line_in_a_streamed_exec_raises_after_the_output() -> None:
    lines = [
        {"type": "stdout", "data": base64.b64encode(b"partial").decode()},
        {"type": "error", "code": "AGENT_ERROR", "message": "the guest agent went away"},
    ]
    body = "".join(json.dumps(x) + "\n" for x in lines).encode()

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/exec"):
            assert req.url.params["stream"] == "true"
            return httpx.Response(200, content=body)
        return httpx.Response(200, json=MACHINE)

    m = client(handler).machines.get("one")
    got: List[bytes] = []
    with pytest.raises(hyperfleet.AgentError, match="went away"):
        for ev in m.exec_stream(["x"]):
            got.append(ev.data)
    assert got == [b"partial"]


def test_degraded_health_is_an_answer_not_an_error() -> None:
    health = {
        "status": "degraded",
        "version": "0",
        "store": {"ok": False, "detail": "disk full"},
        "backends": [{"vmm": "stub", "available": True, "detail": ""}],
        "default_vmm": "stub",
        "machines": 0,
    }
    hf = client(lambda req: httpx.Response(503, json=health))
    h = hf.health()
    assert h.status == "degraded" and not h.store.ok and h.backends[0].vmm == "stub"
