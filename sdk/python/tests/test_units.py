"""The I/O-free layer on its own: configuration rules, query encoding, the
error mapping (also for answers that are not the API's envelope), and the
decoders of the streamed answers (SSE, NDJSON exec lines)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

import hyperfleet
from hyperfleet import _core
from hyperfleet.errors import error_from_response


def test_config_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HYPERFLEET_URL", "HYPERFLEET_API_KEY", "HYPERFLEET_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HYPERFLEET_DATA_DIR", str(tmp_path))
    c = _core.resolve_config(None, None, 5)
    assert (c.base_url, c.api_key) == ("http://127.0.0.1:3000", None)
    assert "Authorization" not in c.headers()
    (tmp_path / "admin.key").write_text("hf_fromfile\n")
    assert _core.resolve_config(None, None, 5).api_key == "hf_fromfile"
    monkeypatch.setenv("HYPERFLEET_API_KEY", "hf_fromenv")
    monkeypatch.setenv("HYPERFLEET_URL", "https://h.example:3000/api/v1/")
    c = _core.resolve_config(None, None, 5)
    assert (c.base_url, c.api_key) == ("https://h.example:3000", "hf_fromenv")
    assert c.api_base == "https://h.example:3000/api/v1"
    assert c.headers()["Authorization"] == "Bearer hf_fromenv"
    c = _core.resolve_config("http://other:1/", "hf_arg", 5)
    assert (c.base_url, c.api_key) == ("http://other:1", "hf_arg")
    with pytest.raises(ValueError, match="http"):
        _core.resolve_config("ftp://x", None, 5)


def test_requests_are_encoded_as_the_api_reads_them() -> None:
    cfg = _core.Config("http://h:1", "k", 7.0)
    args = _core.action("my machine/x", "start", wait=False, timeout=2.5).request_args(cfg)
    assert args["url"] == "http://h:1/api/v1/machines/my%20machine%2Fx/start"
    # Booleans as the API spells them; fractions of a second round up.
    assert args["params"] == {"wait": "false", "timeout": 3}
    args = _core.delete_machine("m", force=True, wait=True, timeout=None).request_args(cfg)
    assert args["params"] == {"force": "true"}
    assert args["timeout"].read == 90.0, "the server's 60 s default plus a margin"
    assert _core.logs("m", follow=True, tail=None).request_args(cfg)["timeout"].read is None
    assert _core.get_machine("m").request_args(cfg)["timeout"].read == 7.0
    body = _core.exec_call(
        "m",
        "echo hi",
        stream=False,
        timeout=None,
        env={"A": "1"},
        cwd=None,
        stdin="in",
        max_output_bytes=None,
    ).json
    assert body == {"command": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "stdin": "aW4="}
    create = _core.create_machine(
        name=None,
        vcpu_count=2,
        mem_size_mib=None,
        vmm=None,
        env=None,
        metadata=None,
        exposed_ports=(80,),
        public=None,
        network=hyperfleet.NetworkRequest(egress=False),
        idle_timeout_seconds=None,
        persistence=hyperfleet.Persistence(type="sticky"),
        snapshot_id="snap-1",
        image=None,
        entrypoint=None,
        cmd=None,
        workdir=None,
        user=None,
        restart=None,
        extra_body={"image": "x"},
    )
    assert create.json == {
        "vcpu_count": 2,
        "snapshot_id": "snap-1",
        "exposed_ports": [80],
        "network": {"egress": False},
        "persistence": {"type": "sticky"},
        "image": "x",
    }
    create = _core.create_machine(
        name=None,
        vcpu_count=None,
        mem_size_mib=None,
        vmm=None,
        env={"FOO": "1"},
        metadata=None,
        exposed_ports=None,
        public=None,
        network=None,
        idle_timeout_seconds=None,
        persistence=None,
        snapshot_id=None,
        image="img_x",
        entrypoint=("/bin/sh", "-c"),
        cmd=["exit 3"],
        workdir="/srv",
        user="app",
        restart=hyperfleet.RestartPolicy(policy="on-failure", max_retries=2),
        extra_body=None,
    )
    assert create.json == {
        "env": {"FOO": "1"},
        "image": "img_x",
        "entrypoint": ["/bin/sh", "-c"],
        "cmd": ["exit 3"],
        "workdir": "/srv",
        "user": "app",
        "restart": {"policy": "on-failure", "max_retries": 2},
    }


def test_byte_ranges() -> None:
    assert _core.byte_range(0, None) is None
    assert _core.byte_range(5, None) == "bytes=5-"
    assert _core.byte_range(5, 10) == "bytes=5-14"
    for bad in ((-1, None), (0, 0)):
        with pytest.raises(ValueError):
            _core.byte_range(*bad)


def test_errors_map_codes_and_statuses() -> None:
    body = json.dumps({"error": {"code": "INVALID_STATE", "message": "it is stopped"}}).encode()
    e = error_from_response(409, body)
    assert isinstance(e, hyperfleet.InvalidState)
    assert (e.code, e.status, e.message) == ("INVALID_STATE", 409, "it is stopped")
    assert str(e) == "it is stopped (INVALID_STATE, HTTP 409)"
    # Not the envelope (a proxy in between): the status picks the class.
    e = error_from_response(502, b"<html>bad gateway</html>")
    assert isinstance(e, hyperfleet.BadGateway) and e.code is None
    assert "bad gateway" in e.message
    e = error_from_response(418, b"", "I'm a teapot")
    assert type(e) is hyperfleet.HyperfleetError and e.message == "I'm a teapot"
    # A code this SDK does not know yet: the status decides.
    e = error_from_response(404, b'{"error":{"code":"GONE_FOREVER","message":"m"}}')
    assert isinstance(e, hyperfleet.NotFound) and e.code == "GONE_FOREVER"
    # 416 carries BAD_REQUEST.
    e = error_from_response(416, b'{"error":{"code":"BAD_REQUEST","message":"range"}}')
    assert isinstance(e, hyperfleet.RangeNotSatisfiable) and isinstance(e, hyperfleet.BadRequest)


def test_sse_decoder() -> None:
    d = _core.SseDecoder()
    lines = [
        ": keep-alive",
        "",
        "id: 7",
        "event: transition",
        'data: {"a":',
        "data:1}",
        "",
        "event: lagged",
        "data: reconnect",
        "",
    ]
    out = [ev for ev in map(d.feed, lines) if ev is not None]
    assert [(e.event, e.data, e.id) for e in out] == [
        ("transition", '{"a":\n1}', "7"),
        ("lagged", "reconnect", "7"),
    ]


def test_exec_lines() -> None:
    line = json.dumps({"type": "stdout", "data": base64.b64encode(b"\x00\xffhi").decode()})
    ev = _core.exec_line(line)
    assert ev is not None and (ev.type, ev.data, ev.text) == (
        "stdout",
        b"\x00\xffhi",
        "\x00\ufffdhi",
    )
    ev = _core.exec_line('{"type":"exit","exit_code":0,"timed_out":false,"duration_ms":5}')
    assert ev is not None and (ev.type, ev.exit_code, ev.duration_ms) == ("exit", 0, 5)
    assert _core.exec_line("  ") is None
    with pytest.raises(hyperfleet.AgentError, match="lost"):
        _core.exec_line('{"type":"error","code":"AGENT_ERROR","message":"agent lost"}')


def test_exec_result_helpers() -> None:
    ok = hyperfleet.ExecResult("out", "", False, False, 3, exit_code=0)
    assert ok.ok and ok.check() is ok and ok.stdout_bytes == b"out"
    bad = hyperfleet.ExecResult("", "boom", False, False, 3, exit_code=2)
    with pytest.raises(hyperfleet.CommandFailed, match="exited with 2"):
        bad.check()
    killed = hyperfleet.ExecResult("", "", False, False, 3, exit_code=None, signal=9)
    with pytest.raises(hyperfleet.CommandFailed, match="signal 9"):
        killed.check()
