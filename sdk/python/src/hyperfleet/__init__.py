"""Hyperfleet: a Python client for the Hyperfleet microVM daemon.

::

    from hyperfleet import Hyperfleet

    hf = Hyperfleet()  # HYPERFLEET_URL / HYPERFLEET_API_KEY, like the CLI
    with hf.machines.create(mem_size_mib=256, start=True) as m:
        print(m.exec(["uname", "-a"]).stdout)
        m.files.write("/root/hello.txt", b"hi")
    # the machine is deleted here

:class:`Hyperfleet` is the synchronous client, :class:`AsyncHyperfleet` the
asyncio one with the same surface. API errors raise subclasses of
:class:`HyperfleetError` named after the API's error code (``NotFound``,
``InvalidState``, ...). The routes and shapes are those of the daemon's
``docs/api.md`` and ``docs/openapi.json``.
"""

from ._async import (
    AsyncHyperfleet,
    AsyncKeys,
    AsyncMachine,
    AsyncMachineFiles,
    AsyncMachines,
    AsyncQuotas,
)
from ._core import __version__
from ._sync import Hyperfleet, Keys, Machine, MachineFiles, Machines, Quotas
from .errors import (
    AgentError,
    BadGateway,
    BadRequest,
    CommandFailed,
    Conflict,
    Forbidden,
    HyperfleetError,
    InsufficientCapacity,
    InsufficientStorage,
    InternalError,
    InvalidState,
    MachineFailed,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RangeNotSatisfiable,
    Timeout,
    TooManyRequests,
    TransportError,
    Unauthorized,
    Unavailable,
    ValidationError,
)
from .models import (
    ApiKey,
    BackendHealth,
    CreatedKey,
    DirEntry,
    ExecEvent,
    ExecResult,
    FileStat,
    FileWritten,
    Health,
    MachineEvent,
    MachineFields,
    MachineNetwork,
    MachinePage,
    MachineStatus,
    NetworkRequest,
    Persistence,
    PersistenceType,
    Quota,
    QuotaLimits,
    QuotaUsage,
    Scope,
    StepTiming,
    StoreHealth,
    VmmKind,
)

__all__ = [
    "__version__",
    "Hyperfleet",
    "Machines",
    "Machine",
    "MachineFiles",
    "Keys",
    "Quotas",
    "AsyncHyperfleet",
    "AsyncMachines",
    "AsyncMachine",
    "AsyncMachineFiles",
    "AsyncKeys",
    "AsyncQuotas",
    "HyperfleetError",
    "TransportError",
    "CommandFailed",
    "Unauthorized",
    "Forbidden",
    "QuotaExceeded",
    "NotFound",
    "MethodNotAllowed",
    "BadRequest",
    "ValidationError",
    "PayloadTooLarge",
    "RangeNotSatisfiable",
    "InvalidState",
    "Conflict",
    "InsufficientCapacity",
    "Timeout",
    "MachineFailed",
    "AgentError",
    "BadGateway",
    "TooManyRequests",
    "Unavailable",
    "InsufficientStorage",
    "InternalError",
    "ApiKey",
    "BackendHealth",
    "CreatedKey",
    "DirEntry",
    "ExecEvent",
    "ExecResult",
    "FileStat",
    "FileWritten",
    "Health",
    "MachineEvent",
    "MachineFields",
    "MachineNetwork",
    "MachinePage",
    "MachineStatus",
    "NetworkRequest",
    "Persistence",
    "PersistenceType",
    "Quota",
    "QuotaLimits",
    "QuotaUsage",
    "Scope",
    "StepTiming",
    "StoreHealth",
    "VmmKind",
]
