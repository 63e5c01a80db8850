"""The SDK against docs/openapi.json (no daemon): every model has exactly the
fields of its schema, nullable fields are Optional, enums match, every error
code has its exception, and each method sends the parameters its route
documents. A field renamed or added in the API fails here until the SDK
follows."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from typing import Any, Callable, Dict, Iterable, Set

import pytest

import hyperfleet
from hyperfleet import models
from hyperfleet.errors import ERROR_CLASSES

from conftest import OPENAPI

if not OPENAPI.is_file():  # pragma: no cover - the repository always has it
    pytest.fail(f"{OPENAPI} is missing", pytrace=False)

DOC: Dict[str, Any] = json.loads(OPENAPI.read_text())
SCHEMAS: Dict[str, Any] = DOC["components"]["schemas"]

# SDK model -> the schema it mirrors.
MODELS = {
    models.MachineFields: "Machine",
    hyperfleet.Machine: "Machine",
    hyperfleet.AsyncMachine: "Machine",
    models.MachineNetwork: "MachineNetwork",
    models.NetworkRequest: "NetworkRequest",
    models.Persistence: "Persistence",
    models.StepTiming: "StepTiming",
    models.MachineEvent: "MachineEvent",
    models.ExecResult: "ExecResult",
    models.FileWritten: "FileWritten",
    models.FileStat: "FileStat",
    models.DirEntry: "DirEntry",
    models.ApiKey: "ApiKey",
    models.CreatedKey: "CreatedKey",
    models.QuotaLimits: "QuotaLimits",
    models.QuotaUsage: "QuotaUsage",
    models.Quota: "Quota",
    models.StoreHealth: "StoreHealth",
    models.BackendHealth: "BackendHealth",
    models.Health: "Health",
    models.Storage: "Storage",
    models.StorageEviction: "StorageEviction",
    models.MachinePage: "MachineList",
    models.Snapshot: "Snapshot",
    models.ForkResult: "ForkResult",
    models.MachineOciImage: "MachineOciImage",
    models.ImageFields: "Image",
    hyperfleet.Image: "Image",
    hyperfleet.AsyncImage: "Image",
    models.ImageLayer: "ImageLayer",
    models.ImageRunConfig: "ImageRunConfig",
    models.ImageEvent: "ImageEvent",
    models.RestartPolicy: "RestartPolicy",
    models.MachineProcess: "MachineProcess",
}

ENUMS = {
    "MachineStatus": models.MachineStatus,
    "VmmKind": models.VmmKind,
    "Scope": models.Scope,
    "PersistenceType": models.PersistenceType,
    "SnapshotStatus": models.SnapshotStatus,
    "ImageStatus": models.ImageStatus,
    "RestartPolicyKind": models.RestartPolicyKind,
}


def resolve(schema: Dict[str, Any]) -> Dict[str, Any]:
    """A schema with ``$ref`` followed and ``allOf`` merged."""
    if "$ref" in schema:
        return resolve(SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]])
    if "allOf" in schema:
        props: Dict[str, Any] = {}
        required: list = []
        for part in schema["allOf"]:
            p = resolve(part)
            props.update(p.get("properties", {}))
            required += p.get("required", [])
        return {"type": "object", "properties": props, "required": required}
    return schema


def nullable(prop: Dict[str, Any]) -> bool:
    t = prop.get("type")
    if isinstance(t, list) and "null" in t:
        return True
    return any(alt.get("type") == "null" for alt in prop.get("oneOf", []))


def is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


@pytest.mark.parametrize("cls,name", list(MODELS.items()), ids=lambda v: getattr(v, "__name__", v))
def test_models_have_exactly_the_schema_fields(cls: type, name: str) -> None:
    schema = resolve(SCHEMAS[name])
    props = schema["properties"]
    required = set(schema.get("required", []))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) == set(props), (
        f"{cls.__name__} vs schema {name}: only in the SDK {sorted(set(fields) - set(props))}, "
        f"only in the API {sorted(set(props) - set(fields))}"
    )
    hints = typing.get_type_hints(cls)
    for fname, prop in props.items():
        f = fields[fname]
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        if nullable(prop):
            assert is_optional(hints[fname]), f"{cls.__name__}.{fname} is nullable in the API"
        if fname not in required:
            assert has_default, f"{cls.__name__}.{fname} may be absent in the API: needs a default"


@pytest.mark.parametrize("name", list(ENUMS))
def test_enums_match(name: str) -> None:
    assert set(typing.get_args(ENUMS[name])) == set(SCHEMAS[name]["enum"])


def test_exec_stream_event_matches_the_schema() -> None:
    variants = SCHEMAS["ExecStreamEvent"]["oneOf"]
    types = {v["properties"]["type"]["enum"][0]: set(v["properties"]) for v in variants}
    fields = {f.name for f in dataclasses.fields(models.ExecEvent)}
    # `error` lines are raised, not yielded.
    assert set(typing.get_args(typing.get_type_hints(models.ExecEvent)["type"])) == (
        set(types) - {"error"}
    )
    for t, props in types.items():
        if t != "error":
            assert props <= fields, f"ExecEvent lacks {props - fields} of the `{t}` line"
    assert {"code", "message"} <= types["error"]


def test_every_error_code_has_its_exception() -> None:
    codes = set(SCHEMAS["ErrorCode"]["enum"])
    assert set(ERROR_CLASSES) == codes
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, hyperfleet.HyperfleetError)
        assert getattr(hyperfleet, cls.__name__) is cls, f"{code} not exported"
    assert set(SCHEMAS["ErrorDetail"]["required"]) == {"code", "message"}


def op(method: str, path: str) -> Dict[str, Any]:
    return DOC["paths"][path][method]


def query_params(method: str, path: str) -> Set[str]:
    return {p["name"] for p in op(method, path).get("parameters", []) if p["in"] == "query"}


def body_props(method: str, path: str) -> Set[str]:
    content = op(method, path)["requestBody"]["content"]["application/json"]
    return set(resolve(content["schema"])["properties"])


def params_of(fn: Callable[..., Any], *, drop: Iterable[str] = ()) -> Set[str]:
    names = set(inspect.signature(fn).parameters) - {"self"}
    return names - set(drop)


# Parameters the SDK adds that are not fields of the API (each explained).
SDK_ONLY_CREATE = {
    "extra_body",  # fields newer than the SDK, sent as they are
    "start",  # create, then start
    "timeout",  # the start's deadline
}


@pytest.mark.parametrize("cls", [hyperfleet.Machines, hyperfleet.AsyncMachines])
def test_create_takes_every_create_field(cls: type) -> None:
    assert params_of(cls.create, drop=SDK_ONLY_CREATE) == body_props("post", "/machines")


@pytest.mark.parametrize("cls", [hyperfleet.Machine, hyperfleet.AsyncMachine])
def test_machine_methods_send_what_their_routes_take(cls: type) -> None:
    # exec: the ExecRequest fields (`command` being the argv).
    assert params_of(cls.exec) == body_props("post", "/machines/{id}/exec")
    assert params_of(cls.exec_stream) | {"max_output_bytes"} == body_props(
        "post", "/machines/{id}/exec"
    )
    assert query_params("post", "/machines/{id}/exec") == {"stream"}
    for verb in ("start", "stop", "restart", "pause", "resume", "kill", "suspend"):
        assert params_of(getattr(cls, verb)) == query_params("post", f"/machines/{{id}}/{verb}")
    assert params_of(cls.delete) == query_params("delete", "/machines/{id}")
    assert params_of(cls.wait) == query_params("get", "/machines/{id}/wait")
    assert params_of(cls.logs) == query_params("get", "/machines/{id}/logs")
    assert params_of(cls.events, drop={"follow"}) | {"limit"} == query_params(
        "get", "/machines/{id}/events"
    )


@pytest.mark.parametrize(
    "machines,machine",
    [
        (hyperfleet.Machines, hyperfleet.Machine),
        (hyperfleet.AsyncMachines, hyperfleet.AsyncMachine),
    ],
)
def test_update_takes_every_update_field(machines: type, machine: type) -> None:
    fields = body_props("patch", "/machines/{id}")
    assert params_of(machines.update, drop={"id"}) == fields
    assert params_of(machine.update) == fields


@pytest.mark.parametrize("cls", [hyperfleet.MachineFiles, hyperfleet.AsyncMachineFiles])
def test_file_methods_send_what_their_routes_take(cls: type) -> None:
    assert params_of(cls.write, drop={"data"}) == query_params("put", "/machines/{id}/files")
    assert params_of(cls.mkdir) == query_params("post", "/machines/{id}/files/mkdir")
    assert params_of(cls.remove) == query_params("delete", "/machines/{id}/files")
    assert params_of(cls.stat) == query_params("get", "/machines/{id}/files/stat")
    assert params_of(cls.list) == query_params("get", "/machines/{id}/files/list")
    assert query_params("get", "/machines/{id}/files") == {"path", "raw"}


@pytest.mark.parametrize("cls", [hyperfleet.Machines, hyperfleet.AsyncMachines])
def test_list_takes_the_list_filters(cls: type) -> None:
    assert params_of(cls.list_page) == query_params("get", "/machines")


@pytest.mark.parametrize(
    "keys,quotas",
    [(hyperfleet.Keys, hyperfleet.Quotas), (hyperfleet.AsyncKeys, hyperfleet.AsyncQuotas)],
)
def test_keys_and_quotas_take_their_fields(keys: type, quotas: type) -> None:
    assert params_of(keys.create) == body_props("post", "/keys")
    assert params_of(quotas.set, drop={"tenant"}) == body_props("put", "/tenants/{tenant}/quota")


@pytest.mark.parametrize(
    "machine,snapshots",
    [
        (hyperfleet.Machine, hyperfleet.Snapshots),
        (hyperfleet.AsyncMachine, hyperfleet.AsyncSnapshots),
    ],
)
def test_snapshot_and_fork_methods_send_what_their_routes_take(
    machine: type, snapshots: type
) -> None:
    path = "/machines/{id}/snapshots"
    takes = query_params("post", path) | body_props("post", path)
    assert params_of(machine.snapshot) == takes
    assert params_of(snapshots.create, drop={"machine"}) == takes
    path = "/machines/{id}/fork"
    assert params_of(machine.fork) == query_params("post", path) | body_props("post", path)


@pytest.mark.parametrize("cls", [hyperfleet.Templates, hyperfleet.AsyncTemplates])
def test_template_warm_sends_what_its_route_takes(cls: type) -> None:
    takes = query_params("post", "/templates") | body_props("post", "/templates")
    assert params_of(cls.warm) == takes


@pytest.mark.parametrize(
    "images,image",
    [(hyperfleet.Images, hyperfleet.Image), (hyperfleet.AsyncImages, hyperfleet.AsyncImage)],
)
def test_image_methods_send_what_their_routes_take(images: type, image: type) -> None:
    assert params_of(images.pull) == body_props("post", "/images")
    assert set(op("post", "/images/import")["requestBody"]["content"]) == {"application/x-tar"}
    events = query_params("get", "/images/{id}/events")
    assert params_of(images.events, drop={"id", "follow"}) == events
    assert params_of(image.events, drop={"follow"}) == events


@pytest.mark.parametrize("cls", [hyperfleet.Hyperfleet, hyperfleet.AsyncHyperfleet])
def test_storage_takes_what_its_route_takes(cls: type) -> None:
    assert params_of(cls.storage) == query_params("get", "/storage") == set()
    schema = op("get", "/storage")["responses"]["200"]["content"]["application/json"]["schema"]
    assert resolve(schema) == SCHEMAS["Storage"]


def test_routes_the_sdk_does_not_know_are_noticed() -> None:
    """Every route of the API is either wrapped by the SDK or listed here as
    left out on purpose: a new route (snapshots, fork, images) fails this test
    until the SDK wraps it or says why not."""
    wrapped = {
        ("get", "/health"),
        ("get", "/storage"),
        ("get", "/keys"),
        ("post", "/keys"),
        ("delete", "/keys/{id}"),
        ("get", "/machines"),
        ("post", "/machines"),
        ("get", "/machines/{id}"),
        ("patch", "/machines/{id}"),
        ("delete", "/machines/{id}"),
        ("get", "/machines/{id}/events"),
        ("post", "/machines/{id}/exec"),
        ("get", "/machines/{id}/files"),
        ("put", "/machines/{id}/files"),
        ("delete", "/machines/{id}/files"),
        ("get", "/machines/{id}/files/list"),
        ("post", "/machines/{id}/files/mkdir"),
        ("get", "/machines/{id}/files/stat"),
        ("get", "/machines/{id}/logs"),
        ("get", "/machines/{id}/wait"),
        ("get", "/tenants/{tenant}/quota"),
        ("put", "/tenants/{tenant}/quota"),
        ("delete", "/tenants/{tenant}/quota"),
        ("post", "/machines/{id}/snapshots"),
        ("post", "/machines/{id}/fork"),
        ("get", "/snapshots"),
        ("get", "/snapshots/{id}"),
        ("delete", "/snapshots/{id}"),
        ("post", "/templates"),
        ("get", "/templates"),
        ("delete", "/templates/{id}"),
        ("post", "/images"),
        ("post", "/images/import"),
        ("get", "/images"),
        ("get", "/images/{id}"),
        ("delete", "/images/{id}"),
        ("get", "/images/{id}/events"),
    } | {
        ("post", f"/machines/{{id}}/{v}")
        for v in ("start", "stop", "restart", "pause", "resume", "kill", "suspend")
    }
    left_out = {
        # The JSON/base64 file write: the SDK uses the raw PUT for every size.
        ("post", "/machines/{id}/files"),
        # The interactive WebSocket exec: exec_stream covers output streaming;
        # stdin streaming would need a WebSocket dependency.
        ("get", "/machines/{id}/exec/ws"),
        # Prometheus text for scrapers (being added by the metrics work).
        ("get", "/metrics"),
        # The tenant-wide event feed (the web console's live list);
        # machine.events() covers one machine.
        ("get", "/events"),
    }
    documented = {
        (m, p)
        for p, ops in DOC["paths"].items()
        for m in ops
        if m in ("get", "post", "put", "delete", "patch")
    }
    assert documented - wrapped - left_out == set(), (
        "routes the SDK does not wrap yet: wrap them, or add them to `left_out` saying why"
    )
    # (`left_out` may name routes that are still being added.)
    assert wrapped - documented == set(), "the SDK wraps routes the API lacks"
