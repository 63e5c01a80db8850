"""The API's JSON shapes as dataclasses.

Each class mirrors one schema of ``docs/openapi.json`` field for field (a test
of the SDK compares them, so a field renamed or added in the API fails it).
Answers are turned into these with :func:`from_json`, which ignores fields it
does not know (a newer server keeps working with an older SDK).

Timestamps stay RFC 3339 strings as the API sends them.
"""

from __future__ import annotations

import base64
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    Generic,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Type,
    TypeVar,
    Union,
)

from .errors import CommandFailed

__all__ = [
    "MachineStatus",
    "VmmKind",
    "Scope",
    "PersistenceType",
    "MachineNetwork",
    "NetworkRequest",
    "Persistence",
    "MachineFields",
    "StepTiming",
    "MachineEvent",
    "ExecResult",
    "ExecEvent",
    "FileWritten",
    "FileStat",
    "DirEntry",
    "ApiKey",
    "CreatedKey",
    "QuotaLimits",
    "QuotaUsage",
    "Quota",
    "StoreHealth",
    "BackendHealth",
    "Health",
    "StorageEviction",
    "Storage",
    "MachinePage",
    "SnapshotStatus",
    "Snapshot",
    "ForkResult",
    "ImageStatus",
    "MachineOciImage",
    "ImageLayer",
    "ImageRunConfig",
    "ImageFields",
    "ImageEvent",
    "RestartPolicyKind",
    "RestartPolicy",
    "MachineProcess",
    "from_json",
]

#: The observed status of a machine (``MachineStatus`` in the API).
MachineStatus = Literal[
    "pending",
    "starting",
    "running",
    "paused",
    "stopping",
    "stopped",
    "suspending",
    "suspended",
    "failed",
    "deleting",
]
#: Which virtual machine monitor runs a machine (``VmmKind``).
VmmKind = Literal["qemu", "firecracker", "stub"]
#: What an API key may do (``Scope``); ``admin`` implies every other scope.
Scope = Literal["read", "write", "exec", "admin"]
#: Where a snapshot is in its life (``SnapshotStatus``).
SnapshotStatus = Literal["creating", "ready", "failed", "deleting"]
#: Where an OCI image record is in its life (``ImageStatus``).
ImageStatus = Literal["pulling", "ready", "failed"]
#: What happens to a machine's storage (``PersistenceType``).
PersistenceType = Literal["sticky", "persistent", "ephemeral"]
#: When a machine's main process exits, whether it boots again (``RestartPolicyKind``).
RestartPolicyKind = Literal["no", "always", "on-failure"]


@dataclass
class MachineNetwork:
    """A machine's network identity; the address fields are ``None`` until it
    first starts with networking on."""

    egress: bool
    ip: Optional[str] = None
    gateway: Optional[str] = None
    prefix_len: Optional[int] = None
    mac: Optional[str] = None
    tap: Optional[str] = None


@dataclass
class NetworkRequest:
    """``network`` when creating a machine. ``egress=False`` cuts it off from
    the internet (default ``True``)."""

    egress: Optional[bool] = None


@dataclass
class Persistence:
    """What happens to a machine's storage: ``sticky`` (kept while the
    server's storage budget allows; lower ``priority``, 0-10, is evicted
    first), ``persistent`` (never evicted) or ``ephemeral`` (deleted when it
    stops or idles, never suspended). Default sticky, priority 5."""

    type: PersistenceType
    priority: Optional[int] = None


@dataclass
class MachineOciImage:
    """``oci_image`` of a machine: the image record its root filesystem was
    made from, its config digest, and the reference (``None`` for an import)."""

    id: str
    digest: str
    ref: Optional[str] = None


@dataclass
class RestartPolicy:
    """``restart`` of a machine made from an OCI image: what happens when its
    main process exits. ``max_retries`` (0-100, default 3) only with
    ``on-failure``."""

    policy: RestartPolicyKind
    max_retries: Optional[int] = None


@dataclass
class MachineProcess:
    """``process`` of a machine: the main process it runs (an OCI image's
    entrypoint and command with the create's overrides)."""

    argv: List[str]
    workdir: Optional[str] = None
    user: Optional[str] = None


@dataclass
class MachineFields:
    """The fields of a machine as the API shows it (schema ``Machine``).

    :class:`hyperfleet.Machine` and :class:`hyperfleet.AsyncMachine` add the
    operations. ``access_token`` is ``None`` and each ``env`` value is
    ``"<redacted>"`` for keys without the ``exec`` scope.
    """

    id: str
    name: str
    status: MachineStatus
    desired_status: MachineStatus
    vmm: VmmKind
    vcpu_count: int
    mem_size_mib: int
    exposed_ports: List[int]
    generation: int
    created_at: str
    updated_at: str
    network: Optional[MachineNetwork] = None
    public: bool = False
    env: Dict[str, str] = field(default_factory=dict, repr=False)
    metadata: Dict[str, str] = field(default_factory=dict)
    urls: Dict[str, str] = field(default_factory=dict)
    image: Optional[str] = None
    oci_image: Optional[MachineOciImage] = None
    snapshot_id: Optional[str] = None
    idle_timeout_seconds: Optional[int] = None
    persistence: Optional[Persistence] = None
    error_message: Optional[str] = None
    #: Why a stopped machine stopped by itself ("guest powered off").
    exit_reason: Optional[str] = None
    #: When the machine was last used (requests, guest calls, its traffic).
    last_active_at: Optional[str] = None
    #: When an idle machine will be suspended, if it stays idle.
    idle_deadline: Optional[str] = None
    started_at: Optional[str] = None
    access_token: Optional[str] = field(default=None, repr=False)
    #: Bytes it holds on the server's disk (disk overlay, memory image), as
    #: last measured; ``None`` until measured.
    stored_bytes: Optional[int] = None
    # Main process (OCI images).
    #: The main process the guest runs; ``None`` when there is none.
    process: Optional[MachineProcess] = None
    #: What happens when the main process exits.
    restart_policy: RestartPolicy = field(default_factory=lambda: RestartPolicy(policy="no"))
    #: Boots the restart policy made since the last start or restart request.
    restart_count: int = 0
    #: The main process's exit code once its exit stopped the machine.
    exit_code: Optional[int] = None


@dataclass
class StepTiming:
    """One step a machine's run took (``spawn_vmm``, ``wait_agent``, ...)."""

    step: str
    duration_ms: float
    outcome: str
    detail: Optional[str] = None


@dataclass
class MachineEvent:
    """One entry of a machine's history: ``created``, ``requested``,
    ``transition``, ``steps`` or ``deleted``."""

    id: int
    machine_id: str
    at: str
    kind: str
    from_status: Optional[MachineStatus] = None
    to_status: Optional[MachineStatus] = None
    message: Optional[str] = None
    operation_id: Optional[str] = None
    steps: List[StepTiming] = field(default_factory=list)


@dataclass
class ExecResult:
    """The outcome of a command run with ``Machine.exec``.

    ``stdout`` and ``stderr`` are text (invalid UTF-8 replaced by the server);
    ``stdout_bytes``/``stderr_bytes`` give them as bytes. For binary output use
    ``Machine.exec_stream``, which carries the exact bytes.
    """

    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration_ms: int
    exit_code: Optional[int] = None
    signal: Optional[int] = None

    @property
    def stdout_bytes(self) -> bytes:
        """``stdout`` encoded as UTF-8."""
        return self.stdout.encode()

    @property
    def stderr_bytes(self) -> bytes:
        """``stderr`` encoded as UTF-8."""
        return self.stderr.encode()

    @property
    def ok(self) -> bool:
        """True when the command exited with 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out

    def check(self) -> ExecResult:
        """Return ``self`` if the command succeeded, else raise :class:`CommandFailed`."""
        if not self.ok:
            how = (
                "timed out"
                if self.timed_out
                else f"was killed by signal {self.signal}"
                if self.exit_code is None
                else f"exited with {self.exit_code}"
            )
            raise CommandFailed(f"the command {how}: {self.stderr[-500:]!r}", self)
        return self


@dataclass
class ExecEvent:
    """One event of ``Machine.exec_stream``.

    ``type`` is ``"stdout"`` or ``"stderr"`` (``data`` holds the bytes as they
    arrived) or, last, ``"exit"`` (``exit_code``, ``signal``, ``timed_out`` and
    ``duration_ms`` are set). An ``error`` line of the stream is raised as a
    :class:`~hyperfleet.HyperfleetError` instead.
    """

    type: Literal["stdout", "stderr", "exit"]
    data: bytes = b""
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    timed_out: bool = False
    duration_ms: Optional[int] = None

    @property
    def text(self) -> str:
        """``data`` decoded as UTF-8 (invalid sequences replaced)."""
        return self.data.decode("utf-8", "replace")

    @classmethod
    def _from_line(cls, obj: Mapping[str, Any]) -> ExecEvent:
        t = obj.get("type")
        if t in ("stdout", "stderr"):
            return cls(type=t, data=base64.b64decode(obj.get("data", "")))
        return cls(
            type="exit",
            exit_code=obj.get("exit_code"),
            signal=obj.get("signal"),
            timed_out=bool(obj.get("timed_out", False)),
            duration_ms=obj.get("duration_ms"),
        )


@dataclass
class FileWritten:
    """The answer to a file write: the path and the size written."""

    path: str
    size: int


@dataclass
class FileStat:
    """A path's metadata in the guest; ``kind`` is ``file``, ``dir``,
    ``symlink`` or ``other``."""

    path: str
    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    modified_at: str
    symlink_target: Optional[str] = None


@dataclass
class DirEntry:
    """One entry of a directory listing."""

    name: str
    kind: str
    size: int
    mode: int
    modified_at: str


@dataclass
class ApiKey:
    """An API key as listed (the secret is never shown again)."""

    id: str
    name: str
    prefix: str
    tenant: str
    scopes: List[Scope]
    created_at: str
    expires_at: Optional[str] = None
    revoked_at: Optional[str] = None


@dataclass
class CreatedKey(ApiKey):
    """A key just created: ``key`` is its secret, shown this once only."""

    key: str = field(default="", repr=False)


@dataclass
class QuotaLimits:
    """A tenant's limits; ``None`` is unlimited."""

    max_machines: Optional[int] = None
    max_vcpus: Optional[int] = None
    max_memory_mib: Optional[int] = None
    max_disk_bytes: Optional[int] = None


@dataclass
class QuotaUsage:
    """What a tenant's machines hold now (all of them, stopped ones too)."""

    machines: int
    vcpus: int
    memory_mib: int
    disk_bytes: int


@dataclass
class Quota:
    """A tenant's quota: the limits in force, whether they are the server's
    defaults, and the usage."""

    tenant: str
    limits: QuotaLimits
    default: bool
    usage: QuotaUsage


@dataclass
class StoreHealth:
    """Whether the daemon's database answers."""

    ok: bool
    detail: str


@dataclass
class BackendHealth:
    """Whether a VMM backend is usable on the host."""

    vmm: VmmKind
    available: bool
    detail: str


@dataclass
class Health:
    """``GET /health``: ``status`` is ``ok`` or ``degraded``."""

    status: str
    version: str
    store: StoreHealth
    backends: List[BackendHealth]
    default_vmm: VmmKind
    machines: int


@dataclass
class StorageEviction:
    """One eviction the storage evictor carried out: ``what`` is
    ``memory_image`` (the machine went from suspended to stopped) or
    ``machine`` (it was deleted); ``bytes`` is what it held then."""

    machine_id: str
    machine_name: str
    what: str
    bytes: int
    at: str


@dataclass
class Storage:
    """``GET /storage``: the storage budget and what the data directory holds,
    as last measured (allocated bytes; docs/api.md "Storage").

    ``used_bytes`` (what counts against ``budget_bytes``) is ``machines_bytes +
    memory_images_bytes + snapshots_bytes``; ``images_bytes`` (OCI images) is
    shown beside it, not counted. ``budget_source`` is ``flag``
    (``--storage-budget``) or ``default``. ``reclaimable_bytes`` is what the
    evictor could free now; ``machines`` how many machines were measured; the
    eviction counters and ``recent_evictions`` (the latest 100, oldest first)
    count since the daemon started. ``measured_at`` is ``None`` before the
    first measurement.
    """

    budget_bytes: int
    budget_source: str
    used_bytes: int
    machines_bytes: int
    memory_images_bytes: int
    snapshots_bytes: int
    images_bytes: int
    reclaimable_bytes: int
    machines: int
    evicted_memory_images: int
    evicted_machines: int
    recent_evictions: List[StorageEviction]
    measured_at: Optional[str] = None


M = TypeVar("M")


@dataclass
class MachinePage(Generic[M]):
    """One page of ``GET /machines``: the machines and how many match the
    filter in all (ignoring limit and offset)."""

    machines: List[M]
    total: int


@dataclass
class Snapshot:
    """A snapshot: a machine's disk, and its memory when ``memory`` is true
    (taken of a running, paused or suspended machine), kept for new machines
    to start from (``machines.create(snapshot_id=...)``). A template is shown
    as a snapshot whose ``name`` is its key."""

    id: str
    machine_id: str
    status: SnapshotStatus
    memory: bool
    size_bytes: int
    vcpu_count: int
    mem_size_mib: int
    vmm: VmmKind
    used_by: int
    created_at: str
    name: Optional[str] = None
    image: Optional[str] = None
    pause_ms: Optional[float] = None
    error_message: Optional[str] = None


@dataclass
class ForkResult(Generic[M]):
    """What ``machine.fork()`` made: the copies (in the order of the names
    given), the snapshot they were made from and how long the source was
    paused. Iterating it (and ``len``) goes over the copies."""

    machines: List[M]
    snapshot_id: str
    pause_ms: Optional[float] = None

    def __iter__(self) -> Iterator[M]:
        return iter(self.machines)

    def __len__(self) -> int:
        return len(self.machines)

    def __getitem__(self, i: int) -> M:
        return self.machines[i]


@dataclass
class ImageLayer:
    """One layer of an image: its digest, compressed size and how many bytes
    of it are downloaded (``size`` once done)."""

    digest: str
    size: int
    done: int


@dataclass
class ImageRunConfig:
    """What a machine made from the image runs, from the image config."""

    entrypoint: List[str]
    cmd: List[str]
    env: List[str]
    user: Optional[str] = None
    workdir: Optional[str] = None


@dataclass
class ImageFields:
    """The fields of an OCI image record as the API shows it (schema ``Image``).

    :class:`hyperfleet.Image` and :class:`hyperfleet.AsyncImage` add the
    operations. ``digest`` (the config digest) is the image's identity; records
    with the same digest share one filesystem on the host. ``ref`` is ``None``
    for an import; ``error`` says why a ``failed`` image failed.
    """

    id: str
    source: str
    status: ImageStatus
    layers: List[ImageLayer]
    created_at: str
    updated_at: str
    ref: Optional[str] = None
    digest: Optional[str] = None
    manifest_digest: Optional[str] = None
    size_bytes: Optional[int] = None
    config: Optional[ImageRunConfig] = None
    error: Optional[str] = None


@dataclass
class ImageEvent:
    """One step of a pull or import: ``pulling``, ``resolved``, ``reused``,
    ``layer_progress`` (live only), ``layer_done``, ``unpacking``,
    ``building``, ``built``, ``ready``, ``failed``, ``used``, ``deleted``;
    ``detail`` holds the kind's fields."""

    id: int
    image_id: str
    at: str
    kind: str
    detail: Optional[Dict[str, Any]] = None
    message: Optional[str] = None


T = TypeVar("T")
_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls: type) -> Dict[str, Any]:
    h = _HINTS.get(cls)
    if h is None:
        h = typing.get_type_hints(cls)
        _HINTS[cls] = h
    return h


def _convert(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value) if len(inner) == 1 else value
    if origin in (list, List) and args:
        return [_convert(args[0], v) for v in value]
    if origin in (dict, Dict) and len(args) == 2:
        return {k: _convert(args[1], v) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_json(tp, value)
    return value


def from_json(cls: Type[T], data: Mapping[str, Any]) -> T:
    """Build the dataclass ``cls`` from an API answer, converting nested
    objects and ignoring fields ``cls`` does not have."""
    hints = _hints(cls)
    kwargs = {
        f.name: _convert(hints[f.name], data[f.name])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and f.name in data
    }
    return cls(**kwargs)


def to_json(obj: Any) -> Any:
    """A dataclass (or mapping of them) as JSON, leaving out ``None`` fields."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_json(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, Mapping):
        return {k: to_json(v) for k, v in obj.items()}
    return obj
