"""The request-building layer shared by the sync and the async client.

Everything here is free of I/O: where the client finds its URL and key
(:func:`resolve_config`), one :class:`Call` per API route (what to send and how
long to wait for it), the error envelope, and the decoders of the streamed
answers (NDJSON exec output, Server-Sent Events). ``_sync.py`` and
``_async.py`` each send :class:`Call` objects over their own ``httpx``
client; adding a route means one builder here and a thin method in each.
"""

from __future__ import annotations

import base64
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    IO,
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import quote

import httpx

from .errors import HyperfleetError, TransportError, error_from_code, error_from_response
from .models import ExecEvent, NetworkRequest, Persistence, RestartPolicy, to_json

__version__ = "0.1.0"

#: Where the API listens when neither an argument nor ``HYPERFLEET_URL`` says.
DEFAULT_URL = "http://127.0.0.1:3000"
#: The daemon's default data directory, where its bootstrap ``admin.key`` is.
DEFAULT_DATA_DIR = "/var/lib/hyperfleet"
#: Client-side deadline of an ordinary request, in seconds.
DEFAULT_TIMEOUT = 60.0
#: Extra seconds the client waits beyond a server-side deadline
#: (actions, ``wait``, exec) before giving up on the connection itself.
SLACK = 30.0
#: The server's longest deadline for actions and ``wait``.
MAX_SERVER_WAIT = 600.0
#: Client-side read deadline of requests that last as long as an image pull or
#: import (an import, a machine create from an image reference), in seconds.
IMAGE_WAIT = 3600.0

Command = Union[str, Sequence[str]]


@dataclass
class Config:
    """Where the API is and how to authenticate."""

    base_url: str
    api_key: Optional[str]
    timeout: float

    @property
    def api_base(self) -> str:
        """The URL every route is under (``<url>/api/v1``)."""
        return f"{self.base_url}/api/v1"

    def headers(self) -> Dict[str, str]:
        h = {"User-Agent": f"hyperfleet-python/{__version__}"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


def _nonempty_env(name: str) -> Optional[str]:
    v = os.environ.get(name, "").strip()
    return v or None


def resolve_config(url: Optional[str], api_key: Optional[str], timeout: float) -> Config:
    """The client's settings, found like the CLI finds them.

    URL: the argument, else ``HYPERFLEET_URL``, else ``http://127.0.0.1:3000``
    (a trailing ``/api/v1`` is accepted). Key: the argument, else
    ``HYPERFLEET_API_KEY``, else the bootstrap key file
    ``$HYPERFLEET_DATA_DIR/admin.key`` (default ``/var/lib/hyperfleet``) when
    it is readable, else none (every route but ``/health`` then answers 401).
    """
    base = (url or _nonempty_env("HYPERFLEET_URL") or DEFAULT_URL).strip().rstrip("/")
    if base.endswith("/api/v1"):
        base = base[: -len("/api/v1")]
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"the Hyperfleet URL must start with http:// or https://, got {base!r}")
    key = api_key or _nonempty_env("HYPERFLEET_API_KEY")
    if key is None:
        key_file = Path(_nonempty_env("HYPERFLEET_DATA_DIR") or DEFAULT_DATA_DIR) / "admin.key"
        try:
            key = key_file.read_text().strip() or None
        except OSError:
            key = None
    return Config(base_url=base, api_key=key, timeout=timeout)


_DEFAULT = object()


@dataclass
class Call:
    """One HTTP request to the API: method, path under ``/api/v1``, query,
    body, headers, and the client-side read deadline (``None``: wait forever,
    for followed streams; unset: the client's default)."""

    method: str
    path: str
    params: Dict[str, Any] = field(default_factory=dict)
    json: Any = None
    content: Any = None
    headers: Dict[str, str] = field(default_factory=dict)
    read_timeout: Any = _DEFAULT

    def request_args(self, cfg: Config) -> Dict[str, Any]:
        """Keyword arguments for ``httpx.Client.request``/``stream``."""
        args: Dict[str, Any] = {
            "method": self.method,
            "url": cfg.api_base + self.path,
            "params": {k: _query_value(v) for k, v in self.params.items() if v is not None},
            "headers": {**cfg.headers(), **self.headers},
        }
        if self.json is not None:
            args["json"] = self.json
        if self.content is not None:
            args["content"] = self.content
        if self.read_timeout is not _DEFAULT:
            read = self.read_timeout
            args["timeout"] = httpx.Timeout(cfg.timeout, read=read)
        else:
            args["timeout"] = httpx.Timeout(cfg.timeout)
        return args


def _query_value(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


def seg(s: str) -> str:
    """A path segment, percent-encoded."""
    return quote(str(s), safe="")


def check(status: int, body: bytes, reason: str = "") -> None:
    """Raise the API's error for a non-2xx answer."""
    if status >= 400:
        raise error_from_response(status, body, reason)


def transport_error(exc: httpx.HTTPError, cfg: Config) -> HyperfleetError:
    """The :class:`TransportError` for an ``httpx`` failure (to raise ``from`` it)."""
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(f"no answer from {cfg.base_url} in time: {exc!r}")
    return TransportError(f"cannot talk to {cfg.base_url}: {exc!r}")


# --- machines -----------------------------------------------------------------------------------


def create_machine(
    *,
    name: Optional[str],
    vcpu_count: Optional[int],
    mem_size_mib: Optional[int],
    vmm: Optional[str],
    env: Optional[Mapping[str, str]],
    metadata: Optional[Mapping[str, str]],
    exposed_ports: Optional[Iterable[int]],
    public: Optional[bool],
    network: Union[NetworkRequest, Mapping[str, Any], None],
    idle_timeout_seconds: Optional[int],
    persistence: Union[Persistence, Mapping[str, Any], None],
    snapshot_id: Optional[str],
    image: Optional[str],
    entrypoint: Optional[Iterable[str]],
    cmd: Optional[Iterable[str]],
    workdir: Optional[str],
    user: Optional[str],
    restart: Union[RestartPolicy, Mapping[str, Any], None],
    extra_body: Optional[Mapping[str, Any]],
) -> Call:
    body: Dict[str, Any] = {
        "name": name,
        "vcpu_count": vcpu_count,
        "mem_size_mib": mem_size_mib,
        "vmm": vmm,
        "env": dict(env) if env is not None else None,
        "metadata": dict(metadata) if metadata is not None else None,
        "exposed_ports": list(exposed_ports) if exposed_ports is not None else None,
        "public": public,
        "network": to_json(network),
        "idle_timeout_seconds": idle_timeout_seconds,
        "persistence": to_json(persistence),
        "snapshot_id": snapshot_id,
        "image": image,
        "entrypoint": list(entrypoint) if entrypoint is not None else None,
        "cmd": list(cmd) if cmd is not None else None,
        "workdir": workdir,
        "user": user,
        "restart": to_json(restart),
    }
    body = {k: v for k, v in body.items() if v is not None}
    body.update(extra_body or {})
    # A create from an image reference the tenant has no ready image of
    # answers only when the server has pulled it.
    call = Call("POST", "/machines", json=body)
    if image is not None:
        call.read_timeout = IMAGE_WAIT
    return call


#: An argument left out (``None`` means something of its own).
UNSET: Any = object()


def update_machine(
    id: str,
    idle_timeout_seconds: Any,
    persistence: Union[Persistence, Mapping[str, Any], None],
    metadata: Optional[Mapping[str, str]],
) -> Call:
    """``PATCH /machines/{id}``: only the fields given (``idle_timeout_seconds=None``
    is the server's default; left out, it stays)."""
    body: Dict[str, Any] = {}
    if idle_timeout_seconds is not UNSET:
        body["idle_timeout_seconds"] = idle_timeout_seconds
    if persistence is not None:
        body["persistence"] = to_json(persistence)
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return Call("PATCH", f"/machines/{seg(id)}", json=body)


def get_machine(id: str) -> Call:
    return Call("GET", f"/machines/{seg(id)}")


def list_machines(status: Optional[str], limit: int, offset: int) -> Call:
    return Call("GET", "/machines", params={"status": status, "limit": limit, "offset": offset})


def action(id: str, verb: str, wait: bool, timeout: Optional[float]) -> Call:
    """``POST /machines/{id}/{verb}`` (start, stop, restart, pause, resume, kill, suspend)."""
    return Call(
        "POST",
        f"/machines/{seg(id)}/{verb}",
        params={"wait": None if wait else False, "timeout": _secs(timeout)},
        read_timeout=_server_wait(timeout) if wait else _DEFAULT,
    )


def delete_machine(id: str, force: bool, wait: bool, timeout: Optional[float]) -> Call:
    return Call(
        "DELETE",
        f"/machines/{seg(id)}",
        params={
            "force": True if force else None,
            "wait": None if wait else False,
            "timeout": _secs(timeout),
        },
        read_timeout=_server_wait(timeout) if wait else _DEFAULT,
    )


def wait_machine(id: str, status: str, timeout: float) -> Call:
    return Call(
        "GET",
        f"/machines/{seg(id)}/wait",
        params={"status": status, "timeout": _secs(timeout)},
        read_timeout=_server_wait(timeout),
    )


def events(id: str, after: int, limit: int) -> Call:
    return Call("GET", f"/machines/{seg(id)}/events", params={"after": after, "limit": limit})


def events_sse(id: str, after: Optional[int]) -> Call:
    headers = {"Accept": "text/event-stream"}
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    return Call("GET", f"/machines/{seg(id)}/events", headers=headers, read_timeout=None)


def logs(id: str, follow: bool, tail: Optional[int]) -> Call:
    return Call(
        "GET",
        f"/machines/{seg(id)}/logs",
        params={"tail": tail, "follow": True if follow else None},
        read_timeout=None if follow else _DEFAULT,
    )


def _secs(t: Optional[float]) -> Optional[int]:
    # The API takes whole seconds (0-600): a fraction rounds up.
    return None if t is None else max(0, math.ceil(t))


def _server_wait(timeout: Optional[float]) -> float:
    return (60.0 if timeout is None else float(timeout)) + SLACK


# --- exec ---------------------------------------------------------------------------------------


def argv(command: Command) -> List[str]:
    """A command as argv: a string runs through ``sh -c``, a sequence as is."""
    if isinstance(command, str):
        return ["sh", "-c", command]
    return [str(a) for a in command]


def exec_call(
    id: str,
    command: Command,
    *,
    stream: bool,
    timeout: Optional[float],
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: Union[bytes, str, None],
    max_output_bytes: Optional[int],
) -> Call:
    body: Dict[str, Any] = {"command": argv(command)}
    if timeout is not None:
        body["timeout"] = timeout
    if env is not None:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if stdin is not None:
        raw = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        body["stdin"] = base64.b64encode(raw).decode("ascii")
    if max_output_bytes is not None:
        body["max_output_bytes"] = max_output_bytes
    return Call(
        "POST",
        f"/machines/{seg(id)}/exec",
        params={"stream": True if stream else None},
        json=body,
        read_timeout=_server_wait(timeout),
    )


def exec_line(line: str) -> Optional[ExecEvent]:
    """One NDJSON line of a streamed exec: the event, or ``None`` for a blank
    line. An ``error`` line raises the API error it names."""
    line = line.strip()
    if not line:
        return None
    obj = json.loads(line)
    if obj.get("type") == "error":
        raise error_from_code(obj.get("code"), str(obj.get("message", "")), 200)
    return ExecEvent._from_line(obj)


# --- files --------------------------------------------------------------------------------------


def byte_range(offset: int, length: Optional[int]) -> Optional[str]:
    """The ``Range`` header for ``length`` bytes from ``offset`` (to the end
    when ``length`` is ``None``); ``None`` for the whole file."""
    if offset < 0 or (length is not None and length <= 0):
        raise ValueError(f"offset must be >= 0 and length > 0, got {offset} and {length}")
    if offset == 0 and length is None:
        return None
    return f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))


def file_read_raw(id: str, path: str, range: Optional[str] = None) -> Call:
    headers = {"Range": range} if range else {}
    return Call(
        "GET",
        f"/machines/{seg(id)}/files",
        params={"path": path, "raw": True},
        headers=headers,
    )


def file_write_raw(
    id: str, path: str, content: Any, size: int, mode: Optional[int], create_dirs: bool
) -> Call:
    return Call(
        "PUT",
        f"/machines/{seg(id)}/files",
        params={"path": path, "mode": mode, "create_dirs": True if create_dirs else None},
        content=content,
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )


def file_stat(id: str, path: str) -> Call:
    return Call("GET", f"/machines/{seg(id)}/files/stat", params={"path": path})


def file_list(id: str, path: str) -> Call:
    return Call("GET", f"/machines/{seg(id)}/files/list", params={"path": path})


def file_mkdir(id: str, path: str, mode: Optional[int], create_dirs: bool) -> Call:
    return Call(
        "POST",
        f"/machines/{seg(id)}/files/mkdir",
        params={"path": path, "mode": mode, "create_dirs": True if create_dirs else None},
    )


def file_remove(id: str, path: str, recursive: bool) -> Call:
    return Call(
        "DELETE",
        f"/machines/{seg(id)}/files",
        params={"path": path, "recursive": True if recursive else None},
    )


#: Chunk size of uploads and downloads.
CHUNK = 256 * 1024

#: What ``files.write`` takes.
FileData = Union[bytes, bytearray, memoryview, str, IO[bytes]]
#: A local path.
PathLike = Union[str, "os.PathLike[str]"]


def body_source(data: FileData) -> Tuple[Optional[bytes], Optional[IO[bytes]], int]:
    """What to send for ``data`` and its length: bytes as they are (strings as
    UTF-8), or a binary file object to stream from its current position."""
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        b = bytes(data)
        return b, None, len(b)
    start = data.tell()
    data.seek(0, os.SEEK_END)
    size = data.tell() - start
    data.seek(start)
    return None, data, size


def file_chunks(f: IO[bytes], size: int) -> Iterator[bytes]:
    """``size`` bytes of ``f`` in chunks (the body of a streamed upload; its
    length was promised in ``Content-Length``)."""
    left = size
    while left > 0:
        b = f.read(min(CHUNK, left))
        if not b:
            raise HyperfleetError(f"the file shrank while it was sent ({left} bytes short)")
        left -= len(b)
        yield b


# --- snapshots, fork, templates -----------------------------------------------------------------


def _waiting(wait: bool, timeout: Optional[float]) -> Dict[str, Any]:
    """The ``wait``/``timeout`` query and client deadline of a route that may
    wait for its outcome on the server."""
    return {
        "params": {"wait": None if wait else False, "timeout": _secs(timeout)},
        "read_timeout": _server_wait(timeout) if wait else _DEFAULT,
    }


def create_snapshot(id: str, name: Optional[str], wait: bool, timeout: Optional[float]) -> Call:
    body = {} if name is None else {"name": name}
    return Call("POST", f"/machines/{seg(id)}/snapshots", json=body, **_waiting(wait, timeout))


def list_snapshots() -> Call:
    return Call("GET", "/snapshots")


def get_snapshot(id: str) -> Call:
    return Call("GET", f"/snapshots/{seg(id)}")


def delete_snapshot(id: str) -> Call:
    return Call("DELETE", f"/snapshots/{seg(id)}")


def fork(
    id: str,
    count: Optional[int],
    names: Optional[Iterable[str]],
    wait: bool,
    timeout: Optional[float],
) -> Call:
    body: Dict[str, Any] = {}
    if count is not None:
        body["count"] = count
    if names is not None:
        if isinstance(names, str):
            raise TypeError("names: give a list of names, not one string")
        body["names"] = list(names)
    return Call("POST", f"/machines/{seg(id)}/fork", json=body, **_waiting(wait, timeout))


def warm_template(
    vcpu_count: Optional[int],
    mem_size_mib: Optional[int],
    vmm: Optional[str],
    wait: bool,
    timeout: Optional[float],
) -> Call:
    body = {
        k: v
        for k, v in {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib, "vmm": vmm}.items()
        if v is not None
    }
    return Call("POST", "/templates", json=body, **_waiting(wait, timeout))


def list_templates() -> Call:
    return Call("GET", "/templates")


def delete_template(id: str) -> Call:
    return Call("DELETE", f"/templates/{seg(id)}")


# --- OCI images ---------------------------------------------------------------------------------


def pull_image(ref: str, insecure: bool, auth: Optional[Mapping[str, str]]) -> Call:
    body: Dict[str, Any] = {"ref": ref}
    if insecure:
        body["insecure"] = True
    if auth is not None:
        body["auth"] = dict(auth)
    return Call("POST", "/images", json=body)


def import_image(content: Any, size: int, timeout: Optional[float]) -> Call:
    return Call(
        "POST",
        "/images/import",
        content=content,
        headers={"Content-Type": "application/x-tar", "Content-Length": str(size)},
        read_timeout=IMAGE_WAIT if timeout is None else timeout,
    )


def list_images() -> Call:
    return Call("GET", "/images")


def get_image(id: str) -> Call:
    return Call("GET", f"/images/{seg(id)}")


def delete_image(id: str) -> Call:
    return Call("DELETE", f"/images/{seg(id)}")


def image_events(id: str, after: Optional[int]) -> Call:
    return Call("GET", f"/images/{seg(id)}/events", params={"after": after})


def image_events_sse(id: str, after: Optional[int]) -> Call:
    return Call(
        "GET",
        f"/images/{seg(id)}/events",
        params={"after": after},
        headers={"Accept": "text/event-stream"},
        read_timeout=None,
    )


#: What ``images.import_archive`` takes: a local path, a binary file object or bytes.
ArchiveSource = Union[str, "os.PathLike[str]", IO[bytes], bytes]

#: Image statuses a pull or import ends in.
IMAGE_DONE = ("ready", "failed")


# --- keys, quotas, health, storage ----------------------------------------------------------------


def create_key(
    name: str,
    scopes: Sequence[str],
    tenant: Optional[str],
    expires_in_seconds: Optional[int],
) -> Call:
    body: Dict[str, Any] = {"name": name, "scopes": list(scopes)}
    if tenant is not None:
        body["tenant"] = tenant
    if expires_in_seconds is not None:
        body["expires_in_seconds"] = expires_in_seconds
    return Call("POST", "/keys", json=body)


def list_keys() -> Call:
    return Call("GET", "/keys")


def delete_key(id: str) -> Call:
    return Call("DELETE", f"/keys/{seg(id)}")


def get_quota(tenant: str) -> Call:
    return Call("GET", f"/tenants/{seg(tenant)}/quota")


def set_quota(tenant: str, limits: Mapping[str, Optional[int]]) -> Call:
    return Call("PUT", f"/tenants/{seg(tenant)}/quota", json=dict(limits))


def reset_quota(tenant: str) -> Call:
    return Call("DELETE", f"/tenants/{seg(tenant)}/quota")


def health() -> Call:
    return Call("GET", "/health")


def storage() -> Call:
    return Call("GET", "/storage")


# --- Server-Sent Events -------------------------------------------------------------------------


@dataclass
class SseEvent:
    """One dispatched Server-Sent Event."""

    event: str
    data: str
    id: Optional[str]


class SseDecoder:
    """The SSE wire format, fed one line at a time (without its line ending)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: List[str] = []
        self._id: Optional[str] = None

    def feed(self, line: str) -> Optional[SseEvent]:
        """Take one line; return the event it completes, if any."""
        if line == "":
            if not self._data and not self._event:
                return None
            ev = SseEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None
