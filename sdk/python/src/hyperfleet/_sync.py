"""The synchronous client: :class:`Hyperfleet` and the objects it hands out.

Every method builds its request with ``_core`` and sends it over one
``httpx.Client``; ``_async.py`` is the same surface over ``httpx.AsyncClient``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json as _json
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    Union,
)

import httpx

from . import _core
from ._core import CHUNK, ArchiveSource, Call, Command, FileData, PathLike
from .errors import HyperfleetError, ImageFailed, NotFound, Timeout
from .models import (
    ApiKey,
    CreatedKey,
    DirEntry,
    ExecEvent,
    ExecResult,
    FileStat,
    FileWritten,
    ForkResult,
    Health,
    ImageEvent,
    ImageFields,
    MachineEvent,
    MachineFields,
    MachinePage,
    MachineStatus,
    NetworkRequest,
    Persistence,
    Quota,
    RestartPolicy,
    Scope,
    Snapshot,
    Storage,
    VmmKind,
    from_json,
)


class Hyperfleet:
    """A client of one Hyperfleet daemon.

    Args:
        url: the daemon, e.g. ``http://127.0.0.1:3000`` (``/api/v1`` is added).
            Default: ``HYPERFLEET_URL``, else ``http://127.0.0.1:3000``.
        api_key: an API key (``hf_...``). Default: ``HYPERFLEET_API_KEY``, else
            the daemon's bootstrap key file ``$HYPERFLEET_DATA_DIR/admin.key``
            (``/var/lib/hyperfleet`` by default) when readable.
        timeout: the client-side deadline of an ordinary request in seconds.
            Requests that wait on the server (actions, ``wait``, ``exec``) get
            the server's deadline plus a margin; followed streams have none.
        http_client: an ``httpx.Client`` to send with (proxies, TLS settings,
            test transports). It is not closed by :meth:`close`.

    Use it as a context manager, or call :meth:`close`::

        with Hyperfleet() as hf:
            with hf.machines.create(mem_size_mib=256, start=True) as m:
                print(m.exec("uname -a").stdout)
    """

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = _core.DEFAULT_TIMEOUT,
        http_client: Optional[httpx.Client] = None,
    ) -> None:
        self._cfg = _core.resolve_config(url, api_key, timeout)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()
        #: Machines: create, get, list.
        self.machines = Machines(self)
        #: API keys (admin scope).
        self.keys = Keys(self)
        #: Tenant quotas.
        self.quotas = Quotas(self)
        #: Snapshots: create (of a machine), get, list, delete.
        self.snapshots = Snapshots(self)
        #: Templates: snapshots of a freshly booted guest that fast creates restore.
        self.templates = Templates(self)
        #: OCI images: pull, import, get, list, delete (machines are made from them).
        self.images = Images(self)

    @property
    def url(self) -> str:
        """The daemon's base URL (without ``/api/v1``)."""
        return self._cfg.base_url

    def health(self) -> Health:
        """``GET /health``: the store's and each backend's readiness."""
        # 503 still carries the health document.
        r = self._send(_core.health(), ok_statuses=(503,))
        return from_json(Health, r.json())

    def storage(self) -> Storage:
        """``GET /storage``: the storage budget (``--storage-budget``), what
        counts against it (machines' disks, memory images, snapshots; allocated
        bytes, as last measured), OCI images beside it, what the evictor could
        free and its latest evictions. Host-wide: needs the ``read`` scope on a
        key of the operator tenant (``default``); other tenants' keys raise
        :class:`~hyperfleet.Forbidden`."""
        return from_json(Storage, self._json(_core.storage()))

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[Mapping[str, Any]] = None,
        json: Any = None,
    ) -> Any:
        """Send any request under ``/api/v1`` and return its JSON (``None``
        when empty). The way to reach routes this SDK does not wrap yet; API
        errors raise like everywhere else."""
        call = Call(method.upper(), "/" + path.lstrip("/"), params=dict(params or {}), json=json)
        r = self._send(call)
        return r.json() if r.content else None

    def close(self) -> None:
        """Close the HTTP connections (unless the ``http_client`` was given)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Hyperfleet:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------------

    def _send(self, call: Call, ok_statuses: Sequence[int] = ()) -> httpx.Response:
        try:
            r = self._http.request(**call.request_args(self._cfg))
        except httpx.HTTPError as e:
            raise _core.transport_error(e, self._cfg) from e
        if r.status_code not in ok_statuses:
            _core.check(r.status_code, r.content, r.reason_phrase)
        return r

    def _json(self, call: Call) -> Any:
        r = self._send(call)
        return r.json() if r.content else None

    @contextlib.contextmanager
    def _stream(self, call: Call) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(**call.request_args(self._cfg)) as r:
                if r.status_code >= 400:
                    r.read()
                    _core.check(r.status_code, r.content, r.reason_phrase)
                yield r
        except httpx.HTTPError as e:
            raise _core.transport_error(e, self._cfg) from e


class Machines:
    """``client.machines``: create, get and list machines."""

    def __init__(self, client: Hyperfleet) -> None:
        self._client = client

    def create(
        self,
        name: Optional[str] = None,
        *,
        vcpu_count: Optional[int] = None,
        mem_size_mib: Optional[int] = None,
        vmm: Optional[VmmKind] = None,
        env: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        exposed_ports: Optional[Iterable[int]] = None,
        public: Optional[bool] = None,
        network: Union[NetworkRequest, Mapping[str, Any], None] = None,
        idle_timeout_seconds: Optional[int] = None,
        persistence: Union[Persistence, Mapping[str, Any], None] = None,
        snapshot_id: Union[str, Snapshot, None] = None,
        image: Union[str, ImageFields, None] = None,
        entrypoint: Optional[Iterable[str]] = None,
        cmd: Optional[Iterable[str]] = None,
        workdir: Optional[str] = None,
        user: Optional[str] = None,
        restart: Union[RestartPolicy, Mapping[str, Any], None] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
        start: bool = False,
        timeout: Optional[float] = None,
    ) -> Machine:
        """Create a machine (``POST /machines``); it is ``pending`` until started.

        Args:
            name: a DNS label unique in the tenant; generated when absent.
            vcpu_count: 1-32 (default 1).
            mem_size_mib: 128-65536 (default 256).
            vmm: ``"qemu"``, ``"firecracker"`` or ``"stub"``; default the server's.
            env: environment for commands run in the guest.
            metadata: free-form labels.
            exposed_ports: guest ports served by the daemon's proxy (see :meth:`Machine.url`).
            public: exposed ports need no credentials.
            network: ``NetworkRequest(egress=False)`` (or ``{"egress": False}``)
                cuts the guest off from the internet.
            idle_timeout_seconds: seconds without activity before it is
                suspended; ``0`` never; default the server's.
            persistence: ``Persistence("sticky", priority=3)``, ``{"type":
                "persistent"}`` or ``{"type": "ephemeral"}``; default sticky 5.
            snapshot_id: make it from this snapshot (id, name or :class:`Snapshot`):
                its disk builds on the snapshot's and, when the snapshot holds
                memory, its first start continues the snapshot's guest instead
                of booting. Shape and ``vmm`` default to the snapshot's.
            image: an OCI image as the root filesystem: an :class:`Image`, an
                image id (``img_...``), or a reference (``docker.io/library/alpine:3``),
                which uses the tenant's newest ready image of it or else pulls
                it first (the create then lasts as long as the pull). Not
                with ``snapshot_id``.
            entrypoint: with ``image``: replaces the image's entrypoint (and drops
                its cmd unless ``cmd`` is given); ``[]`` clears it.
            cmd: with ``image``: replaces the image's cmd.
            workdir: with ``image``: replaces the image's working directory.
            user: with ``image``: ``name``, ``uid``, ``name:group`` or ``uid:gid``.
            restart: with ``image``: ``RestartPolicy("on-failure", max_retries=2)``
                (or ``{"policy": "always"}``): whether the machine boots again
                when its main process exits (default ``no``).
            extra_body: fields sent as they are, for API fields newer than this SDK.
            start: also start it and wait until it is ``running``. If the start
                fails, the machine is deleted and the error raised.
            timeout: with ``start``, the server's deadline for it (seconds, <= 600).

        Returns:
            The machine. ``with client.machines.create(...) as m:`` deletes it
            (forcibly) when the block ends.
        """
        call = _core.create_machine(
            name=name,
            vcpu_count=vcpu_count,
            mem_size_mib=mem_size_mib,
            vmm=vmm,
            env=env,
            metadata=metadata,
            exposed_ports=exposed_ports,
            public=public,
            network=network,
            idle_timeout_seconds=idle_timeout_seconds,
            persistence=persistence,
            snapshot_id=snapshot_id.id if isinstance(snapshot_id, Snapshot) else snapshot_id,
            image=image.id if isinstance(image, ImageFields) else image,
            entrypoint=entrypoint,
            cmd=cmd,
            workdir=workdir,
            user=user,
            restart=restart,
            extra_body=extra_body,
        )
        m = Machine._wrap(self._client, self._client._json(call))
        if start:
            try:
                m.start(timeout=timeout)
            except BaseException:
                with contextlib.suppress(HyperfleetError):
                    m.delete(force=True)
                raise
        return m

    def get(self, id: str) -> Machine:
        """The machine with this id or name (``NotFound`` when there is none)."""
        return Machine._wrap(self._client, self._client._json(_core.get_machine(id)))

    def update(
        self,
        id: str,
        *,
        idle_timeout_seconds: Optional[int] = _core.UNSET,
        persistence: Union[Persistence, Mapping[str, Any], None] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> Machine:
        """Change the idle timeout, persistence or metadata of the machine
        with this id or name: see :meth:`Machine.update`."""
        call = _core.update_machine(id, idle_timeout_seconds, persistence, metadata)
        return Machine._wrap(self._client, self._client._json(call))

    def list(
        self, status: Optional[MachineStatus] = None, *, page_size: int = 100
    ) -> Iterator[Machine]:
        """Every machine of the tenant (in creation order), optionally only those
        in ``status``, fetched ``page_size`` (1-1000) at a time as you iterate."""
        offset = 0
        while True:
            page = self.list_page(status, limit=page_size, offset=offset)
            yield from page.machines
            offset += len(page.machines)
            if not page.machines or offset >= page.total:
                return

    def list_page(
        self, status: Optional[MachineStatus] = None, *, limit: int = 100, offset: int = 0
    ) -> MachinePage[Machine]:
        """One page of ``GET /machines``: the machines and how many match in total."""
        body = self._client._json(_core.list_machines(status, limit, offset))
        return MachinePage(
            machines=[Machine._wrap(self._client, m) for m in body["machines"]],
            total=int(body["total"]),
        )


class Machine(MachineFields):
    """A machine, with its operations. Its fields (``id``, ``name``,
    ``status``, ...) are those of the last answer about it; :meth:`refresh`
    reads them again. Actions update them in place and return ``self``.

    As a context manager it deletes the machine (``force=True``) on exit.
    """

    _client: Hyperfleet

    @classmethod
    def _wrap(cls, client: Hyperfleet, data: Mapping[str, Any]) -> Machine:
        fresh = from_json(MachineFields, data)
        m = cls(**{f.name: getattr(fresh, f.name) for f in dataclasses.fields(MachineFields)})
        m._client = client
        return m

    def _update(self, data: Any) -> Machine:
        if isinstance(data, Mapping):
            fresh = from_json(MachineFields, data)
            for f in dataclasses.fields(MachineFields):
                setattr(self, f.name, getattr(fresh, f.name))
        return self

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        with contextlib.suppress(NotFound):
            self.delete(force=True)

    # --- lifecycle ------------------------------------------------------------------------------

    def _act(self, verb: str, wait: bool, timeout: Optional[float]) -> Machine:
        return self._update(self._client._json(_core.action(self.id, verb, wait, timeout)))

    def start(self, *, wait: bool = True, timeout: Optional[float] = None) -> Machine:
        """Boot (or restore a suspended) machine; by default waits until ``running``.

        Args:
            wait: ``False`` returns as soon as the request is accepted.
            timeout: the server's deadline in seconds (default 60, at most 600);
                past it :class:`~hyperfleet.Timeout` is raised and the work goes on.
        """
        return self._act("start", wait, timeout)

    def stop(self, *, wait: bool = True, timeout: Optional[float] = None) -> Machine:
        """Stop gracefully (a kill after the server's stop timeout); see :meth:`start`."""
        return self._act("stop", wait, timeout)

    def restart(self, *, wait: bool = True, timeout: Optional[float] = None) -> Machine:
        """Stop and boot again; see :meth:`start`."""
        return self._act("restart", wait, timeout)

    def pause(self, *, wait: bool = True, timeout: Optional[float] = None) -> Machine:
        """Freeze the vCPUs (memory stays resident); see :meth:`start`."""
        return self._act("pause", wait, timeout)

    def resume(self, *, wait: bool = True, timeout: Optional[float] = None) -> Machine:
        """Continue a paused or suspended machine; see :meth:`start`."""
        return self._act("resume", wait, timeout)

    def suspend(self, *, wait: bool = True, timeout: Optional[float] = None) -> Machine:
        """Save the memory to disk and end the VMM; :meth:`resume` continues it."""
        return self._act("suspend", wait, timeout)

    def kill(self, *, wait: bool = True, timeout: Optional[float] = None) -> Machine:
        """Hard stop at once (escalates a graceful stop under way); see :meth:`start`."""
        return self._act("kill", wait, timeout)

    def delete(
        self, *, force: bool = False, wait: bool = True, timeout: Optional[float] = None
    ) -> None:
        """Delete the machine and its disk. A running machine needs ``force=True``
        (it is stopped first), else :class:`~hyperfleet.InvalidState`."""
        self._update(self._client._json(_core.delete_machine(self.id, force, wait, timeout)))

    def wait(self, status: MachineStatus, timeout: float = 60.0) -> Machine:
        """Wait until the machine is in ``status`` (a server-side long poll).

        Raises :class:`~hyperfleet.InvalidState` at once when it fails or cannot
        get there without another request, :class:`~hyperfleet.Timeout` after
        ``timeout`` seconds (which may be longer than the server's 600).
        """
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            chunk = min(math.ceil(left), int(_core.MAX_SERVER_WAIT))
            try:
                return self._update(self._client._json(_core.wait_machine(self.id, status, chunk)))
            except Timeout:
                if time.monotonic() >= deadline - 0.5:
                    raise

    def refresh(self) -> Machine:
        """Read the machine's fields again."""
        return self._update(self._client._json(_core.get_machine(self.id)))

    def update(
        self,
        *,
        idle_timeout_seconds: Optional[int] = _core.UNSET,
        persistence: Union[Persistence, Mapping[str, Any], None] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> Machine:
        """Change the machine's idle timeout, persistence or metadata
        (``PATCH /machines/{id}``); what is left out stays as it is.

        Args:
            idle_timeout_seconds: seconds without activity before it is
                suspended (deleted, when ephemeral); ``0`` never; ``None`` the
                server's default. The idle deadline starts over.
            persistence: ``Persistence("sticky", priority=3)`` or
                ``{"type": "persistent"}``.
            metadata: replaces the metadata as a whole (``{}`` empties it).
        """
        call = _core.update_machine(self.id, idle_timeout_seconds, persistence, metadata)
        return self._update(self._client._json(call))

    def url(self, port: int, *, with_token: bool = False) -> str:
        """The proxy URL of an exposed ``port`` (``http://<port>-<id>.localhost:4000/``).

        Args:
            with_token: append ``?hf_token=`` with the machine's access token
                (shown only to keys with the ``exec`` scope), for a private
                machine opened in a browser.

        Raises:
            ValueError: the port is not exposed, or the daemon runs without its proxy.
        """
        u = self.urls.get(str(port))
        if u is None:
            raise ValueError(
                f"port {port} of machine {self.name!r} has no proxy URL "
                f"(exposed: {self.exposed_ports}; none when the daemon runs --no-proxy)"
            )
        if with_token:
            if not self.access_token:
                raise ValueError("no access token: it is shown only to keys with the exec scope")
            u += f"?hf_token={self.access_token}"
        return u

    # --- history and console --------------------------------------------------------------------

    def events(
        self, *, follow: bool = False, after: Optional[int] = None
    ) -> Iterator[MachineEvent]:
        """The machine's history (``created``, ``requested``, ``transition`` with
        step timings, ``steps``, ``deleted``).

        Args:
            follow: keep streaming new events live (SSE) until the machine is
                deleted; a stream that fell behind is resumed where it was.
            after: only events with a greater id.
        """
        if not follow:
            last = after or 0
            while True:
                body = self._client._json(_core.events(self.id, last, 1000))
                evs = [from_json(MachineEvent, e) for e in body["events"]]
                yield from evs
                if len(evs) < 1000:
                    return
                last = evs[-1].id
        cursor = after
        while True:
            lagged = False
            with self._client._stream(_core.events_sse(self.id, cursor)) as r:
                dec = _core.SseDecoder()
                for line in r.iter_lines():
                    sse = dec.feed(line)
                    if sse is None:
                        continue
                    if sse.event == "lagged":
                        lagged = True
                        break
                    ev = from_json(MachineEvent, _json.loads(sse.data))
                    cursor = ev.id
                    yield ev
                    if ev.kind == "deleted":
                        return
            if not lagged:
                return

    def logs(self, *, follow: bool = False, tail: Optional[int] = None) -> Iterator[str]:
        """The serial console, line by line (without line endings).

        Args:
            follow: keep streaming new output until the machine is deleted
                (stop iterating, or close the iterator, to let go).
            tail: start with the last ``tail`` lines (the server's default is 200).
        """
        with self._client._stream(_core.logs(self.id, follow, tail)) as r:
            yield from r.iter_lines()

    # --- inside the guest -----------------------------------------------------------------------

    def exec(
        self,
        command: Command,
        *,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
        max_output_bytes: Optional[int] = None,
    ) -> ExecResult:
        """Run a command in the guest and return its output when it ends.

        Args:
            command: argv (``["ls", "-l"]``), or a string run by ``sh -c``.
            timeout: seconds before the process group is killed (default 60,
                at most 3600); ``timed_out`` then says so.
            env: added to the machine's environment.
            cwd: working directory.
            stdin: fed to the command's standard input.
            max_output_bytes: keep at most this much of each of stdout and
                stderr (default 1 MiB); ``truncated`` says when more came.

        A non-zero exit is not an error: check ``exit_code`` or call
        :meth:`ExecResult.check`.
        """
        call = _core.exec_call(
            self.id,
            command,
            stream=False,
            timeout=timeout,
            env=env,
            cwd=cwd,
            stdin=stdin,
            max_output_bytes=max_output_bytes,
        )
        return from_json(ExecResult, self._client._json(call))

    def exec_stream(
        self,
        command: Command,
        *,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
    ) -> Iterator[ExecEvent]:
        """Run a command and yield its output as it comes: :class:`ExecEvent`
        of type ``stdout``/``stderr`` with the exact bytes, then one ``exit``.
        Closing the iterator early kills the command. Arguments as :meth:`exec`.
        """
        call = _core.exec_call(
            self.id,
            command,
            stream=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
            stdin=stdin,
            max_output_bytes=None,
        )
        with self._client._stream(call) as r:
            for line in r.iter_lines():
                ev = _core.exec_line(line)
                if ev is not None:
                    yield ev

    @property
    def files(self) -> MachineFiles:
        """Files in the guest: read, write, upload, download, list, stat, mkdir, remove."""
        return MachineFiles(self._client, self.id)

    # --- snapshots and fork -----------------------------------------------------------------------

    def snapshot(
        self, name: Optional[str] = None, *, wait: bool = True, timeout: Optional[float] = None
    ) -> Snapshot:
        """Take a snapshot of the machine (running, paused, suspended or
        stopped; a running machine keeps running, its pause is in
        ``pause_ms``). Machines are made from it with
        ``machines.create(snapshot_id=...)``.

        Args:
            name: a DNS label unique among the tenant's snapshots.
            wait: ``False`` returns at once with the snapshot still ``creating``.
            timeout: the server's deadline in seconds (default 60, at most 600);
                past it the snapshot comes back still ``creating``.
        """
        call = _core.create_snapshot(self.id, name, wait, timeout)
        return from_json(Snapshot, self._client._json(call))

    def fork(
        self,
        count: Optional[int] = None,
        *,
        names: Optional[Sequence[str]] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> ForkResult[Machine]:
        """Make running copies of this running machine (it keeps running).
        Each copy gets its own address, hostname, machine id, boot id and RNG
        seed before it counts as running.

        Args:
            count: how many copies, 1-16 (default 1, or ``len(names)``).
            names: a name for each copy.
            wait: ``False`` returns once the copies exist, before they run.
            timeout: the server's deadline in seconds (default 60, at most 600).

        Returns:
            The copies (iterate it, or ``.machines``), ``snapshot_id`` and the
            source's ``pause_ms``.
        """
        body = self._client._json(_core.fork(self.id, count, names, wait, timeout))
        return ForkResult(
            machines=[Machine._wrap(self._client, m) for m in body["machines"]],
            snapshot_id=body["snapshot_id"],
            pause_ms=body.get("pause_ms"),
        )


class MachineFiles:
    """``machine.files``: the guest's files over the raw streaming routes
    (any size; the daemon and the SDK keep only a window in memory)."""

    def __init__(self, client: Hyperfleet, machine_id: str) -> None:
        self._client = client
        self._id = machine_id

    def read(self, path: str, *, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The content of the file at ``path``: all of it, or ``length`` bytes
        (fewer at the end of the file) from ``offset``. An ``offset`` past the
        end raises :class:`~hyperfleet.RangeNotSatisfiable`."""
        return b"".join(self.iter_read(path, offset=offset, length=length))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The file at ``path`` decoded as text."""
        return self.read(path).decode(encoding)

    def iter_read(
        self,
        path: str,
        *,
        offset: int = 0,
        length: Optional[int] = None,
        chunk_size: int = CHUNK,
    ) -> Iterator[bytes]:
        """The file's bytes (or a range, as :meth:`read`) in chunks as they
        arrive, for files too large to hold."""
        call = _core.file_read_raw(self._id, path, _core.byte_range(offset, length))
        with self._client._stream(call) as r:
            yield from r.iter_bytes(chunk_size)

    def write(
        self,
        path: str,
        data: FileData,
        *,
        mode: Optional[int] = None,
        create_dirs: bool = False,
    ) -> FileWritten:
        """Write (create or replace) the file at ``path``.

        Args:
            data: bytes, a string (written as UTF-8) or a binary file object
                (streamed from its current position).
            mode: permission bits, e.g. ``0o644``.
            create_dirs: create missing parent directories.
        """
        raw, f, size = _core.body_source(data)
        content = raw if f is None else _core.file_chunks(f, size)
        call = _core.file_write_raw(self._id, path, content, size, mode, create_dirs)
        return from_json(FileWritten, self._client._json(call))

    def upload(
        self,
        local_path: PathLike,
        remote_path: str,
        *,
        mode: Optional[int] = None,
        create_dirs: bool = False,
    ) -> FileWritten:
        """Copy the local file ``local_path`` to ``remote_path`` in the guest, streamed."""
        with open(local_path, "rb") as f:
            return self.write(remote_path, f, mode=mode, create_dirs=create_dirs)

    def download(self, remote_path: str, local_path: PathLike) -> int:
        """Copy ``remote_path`` in the guest to the local file ``local_path``,
        streamed; returns the number of bytes written."""
        n = 0
        tmp = Path(f"{os.fspath(local_path)}.part")
        try:
            with open(tmp, "wb") as f:
                for chunk in self.iter_read(remote_path):
                    f.write(chunk)
                    n += len(chunk)
            os.replace(tmp, local_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return n

    def list(self, path: str) -> List[DirEntry]:
        """The entries of the directory ``path``."""
        body = self._client._json(_core.file_list(self._id, path))
        return [from_json(DirEntry, e) for e in body["entries"]]

    def stat(self, path: str) -> FileStat:
        """Metadata of ``path`` (not following a final symlink)."""
        return from_json(FileStat, self._client._json(_core.file_stat(self._id, path)))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest."""
        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    def mkdir(self, path: str, *, mode: Optional[int] = None, create_dirs: bool = False) -> None:
        """Create the directory ``path`` (and missing parents with ``create_dirs``)."""
        self._client._json(_core.file_mkdir(self._id, path, mode, create_dirs))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory (non-empty ones need ``recursive``)."""
        self._client._json(_core.file_remove(self._id, path, recursive))


class Snapshots:
    """``client.snapshots``: snapshots of machines (``machine.snapshot()``
    takes one too)."""

    def __init__(self, client: Hyperfleet) -> None:
        self._client = client

    def create(
        self,
        machine: Union[str, MachineFields],
        *,
        name: Optional[str] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> Snapshot:
        """Take a snapshot of ``machine`` (id, name or machine); see
        :meth:`Machine.snapshot`."""
        mid = machine.id if isinstance(machine, MachineFields) else machine
        return from_json(
            Snapshot, self._client._json(_core.create_snapshot(mid, name, wait, timeout))
        )

    def list(self) -> List[Snapshot]:
        """The tenant's snapshots (those being deleted are not listed)."""
        body = self._client._json(_core.list_snapshots())
        return [from_json(Snapshot, x) for x in body["snapshots"]]

    def get(self, id: str) -> Snapshot:
        """The snapshot with this id or name (``NotFound`` when there is none)."""
        return from_json(Snapshot, self._client._json(_core.get_snapshot(id)))

    def delete(self, snapshot: Union[str, Snapshot]) -> None:
        """Delete a snapshot (id, name or :class:`Snapshot`). Machines made
        from it go on: its files stay until the last of them is deleted."""
        sid = snapshot.id if isinstance(snapshot, Snapshot) else snapshot
        self._client._json(_core.delete_snapshot(sid))


class Templates:
    """``client.templates``: per machine shape, a snapshot of a freshly booted
    idle guest that creating (and first starting) a machine of that shape
    restores instead of booting. Shown as :class:`Snapshot` s whose ``name``
    is the template's key. Warming and deleting need an ``admin`` key."""

    def __init__(self, client: Hyperfleet) -> None:
        self._client = client

    def warm(
        self,
        *,
        vcpu_count: Optional[int] = None,
        mem_size_mib: Optional[int] = None,
        vmm: Optional[VmmKind] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> Snapshot:
        """Make the template of this shape now (boots a guest) instead of on
        first need; returns it (the existing one when it is there already).
        Fields left out take the server's defaults."""
        call = _core.warm_template(vcpu_count, mem_size_mib, vmm, wait, timeout)
        return from_json(Snapshot, self._client._json(call))

    def list(self) -> List[Snapshot]:
        """The templates there are."""
        body = self._client._json(_core.list_templates())
        return [from_json(Snapshot, x) for x in body["snapshots"]]

    def delete(self, template: Union[str, Snapshot]) -> None:
        """Delete a template (id or :class:`Snapshot`); the next fast create
        of its shape makes it again."""
        tid = template.id if isinstance(template, Snapshot) else template
        self._client._json(_core.delete_template(tid))


class Images:
    """``client.images``: OCI images, the root filesystems of machines made
    with ``machines.create(image=...)``."""

    def __init__(self, client: Hyperfleet) -> None:
        self._client = client

    def pull(
        self,
        ref: str,
        *,
        insecure: bool = False,
        auth: Optional[Mapping[str, str]] = None,
    ) -> Image:
        """Start pulling ``ref`` from its registry (``POST /images``); the image
        comes back ``pulling``: :meth:`Image.wait_ready` waits for the outcome.

        Args:
            ref: ``registry[:port]/repository[:tag]`` or ``...@sha256:<hex>``;
                without a registry, Docker Hub.
            insecure: plain HTTP to the registry (loopback registries always are).
            auth: ``{"username": ..., "password": ...}`` or ``{"token": ...}``,
                used for this pull only and never stored.
        """
        return Image._wrap(self._client, self._client._json(_core.pull_image(ref, insecure, auth)))

    def import_archive(self, archive: ArchiveSource, *, timeout: Optional[float] = None) -> Image:
        """Import an OCI image layout tar (``skopeo copy ... oci-archive:``) or a
        ``docker save`` archive, streamed from a local path or a binary file
        object (from its current position), or given as bytes. Returns the ``ready`` image; an
        archive that is not a valid image raises
        :class:`~hyperfleet.ValidationError` (the failed record stays, with its
        ``error``).

        Args:
            timeout: the client's read deadline in seconds (default an hour).
        """
        if isinstance(archive, (str, os.PathLike)):
            with open(archive, "rb") as fh:
                return self.import_archive(fh, timeout=timeout)
        raw, f, size = _core.body_source(archive)
        content = raw if f is None else _core.file_chunks(f, size)
        call = _core.import_image(content, size, timeout)
        return Image._wrap(self._client, self._client._json(call))

    def list(self) -> List[Image]:
        """The tenant's images, oldest first."""
        body = self._client._json(_core.list_images())
        return [Image._wrap(self._client, x) for x in body["images"]]

    def get(self, id: str) -> Image:
        """The image with this id (``NotFound`` when the tenant has none)."""
        return Image._wrap(self._client, self._client._json(_core.get_image(id)))

    def delete(self, image: Union[str, ImageFields]) -> None:
        """Delete an image (id or :class:`Image`). :class:`~hyperfleet.Conflict`
        while machines made from it exist or while it is still pulling."""
        iid = image.id if isinstance(image, ImageFields) else image
        self._client._json(_core.delete_image(iid))

    def events(
        self, id: str, *, follow: bool = False, after: Optional[int] = None
    ) -> Iterator[ImageEvent]:
        """The image's pull or import steps; see :meth:`Image.events`."""
        return _image_events(self._client, id, follow, after)


class Image(ImageFields):
    """An OCI image record with its operations; its fields are those of the
    last answer about it (:meth:`refresh` reads them again)."""

    _client: Hyperfleet

    @classmethod
    def _wrap(cls, client: Hyperfleet, data: Mapping[str, Any]) -> Image:
        fresh = from_json(ImageFields, data)
        i = cls(**{f.name: getattr(fresh, f.name) for f in dataclasses.fields(ImageFields)})
        i._client = client
        return i

    def _update(self, data: Mapping[str, Any]) -> Image:
        fresh = from_json(ImageFields, data)
        for f in dataclasses.fields(ImageFields):
            setattr(self, f.name, getattr(fresh, f.name))
        return self

    def refresh(self) -> Image:
        """Read the image's fields again."""
        return self._update(self._client._json(_core.get_image(self.id)))

    def wait_ready(self, timeout: float = 600.0, *, poll_interval: float = 0.5) -> Image:
        """Poll the image until it is ``ready`` (returns ``self``) or ``failed``
        (raises :class:`~hyperfleet.ImageFailed` with its ``error``); after
        ``timeout`` seconds raises :class:`~hyperfleet.Timeout` (the pull goes on)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.status == "ready":
                return self
            if self.status == "failed":
                raise ImageFailed(f"image {self.id} ({self.ref}) failed: {self.error}", self)
            if time.monotonic() >= deadline:
                raise Timeout(f"image {self.id} is still {self.status} after {timeout} s")
            time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
            self.refresh()

    def delete(self) -> None:
        """Delete the image; see :meth:`Images.delete`."""
        self._client._json(_core.delete_image(self.id))

    def events(self, *, follow: bool = False, after: Optional[int] = None) -> Iterator[ImageEvent]:
        """The image's pull or import steps (``pulling``, ``resolved``,
        ``layer_done``, ``building``, ``built``, ``ready``, ``failed``, ...).

        Args:
            follow: the stored events then live ones (with ``layer_progress``
                download progress) until the image is ready, failed or deleted.
            after: only events with a greater id.
        """
        return _image_events(self._client, self.id, follow, after)


def _image_events(
    client: Hyperfleet, id: str, follow: bool, after: Optional[int]
) -> Iterator[ImageEvent]:
    if not follow:
        body = client._json(_core.image_events(id, after))
        yield from (from_json(ImageEvent, e) for e in body["events"])
        return
    cursor = after
    while True:
        lagged = False
        with client._stream(_core.image_events_sse(id, cursor)) as r:
            dec = _core.SseDecoder()
            for line in r.iter_lines():
                sse = dec.feed(line)
                if sse is None:
                    continue
                if sse.event == "lagged":
                    lagged = True
                    break
                ev = from_json(ImageEvent, _json.loads(sse.data))
                cursor = ev.id
                yield ev
        if not lagged:
            return


class Keys:
    """``client.keys``: API keys (needs an ``admin`` key)."""

    def __init__(self, client: Hyperfleet) -> None:
        self._client = client

    def create(
        self,
        name: str,
        scopes: Sequence[Scope],
        *,
        tenant: Optional[str] = None,
        expires_in_seconds: Optional[int] = None,
    ) -> CreatedKey:
        """Create a key; its secret (``.key``) is shown this once only.

        Args:
            name: a label, 1-64 characters.
            scopes: at least one of ``read``, ``write``, ``exec``, ``admin``.
            tenant: the tenant it acts for (default: the creating key's).
            expires_in_seconds: lifetime (60 s to 10 years); none by default.
        """
        call = _core.create_key(name, scopes, tenant, expires_in_seconds)
        return from_json(CreatedKey, self._client._json(call))

    def list(self) -> List[ApiKey]:
        """The keys this admin may manage (secrets are never shown again)."""
        return [from_json(ApiKey, k) for k in self._client._json(_core.list_keys())["keys"]]

    def delete(self, key: Union[str, ApiKey]) -> None:
        """Revoke a key (by id or :class:`ApiKey`); idempotent, effective at once."""
        self._client._json(_core.delete_key(key.id if isinstance(key, ApiKey) else key))


class Quotas:
    """``client.quotas``: tenant quotas (changing them needs an operator admin key)."""

    def __init__(self, client: Hyperfleet) -> None:
        self._client = client

    def get(self, tenant: str) -> Quota:
        """The tenant's limits in force and its usage."""
        return from_json(Quota, self._client._json(_core.get_quota(tenant)))

    def set(
        self,
        tenant: str,
        *,
        max_machines: Optional[int] = None,
        max_vcpus: Optional[int] = None,
        max_memory_mib: Optional[int] = None,
        max_disk_bytes: Optional[int] = None,
    ) -> Quota:
        """Replace all four limits of the tenant (``None``: unlimited)."""
        limits: Dict[str, Optional[int]] = {
            "max_machines": max_machines,
            "max_vcpus": max_vcpus,
            "max_memory_mib": max_memory_mib,
            "max_disk_bytes": max_disk_bytes,
        }
        return from_json(Quota, self._client._json(_core.set_quota(tenant, limits)))

    def reset(self, tenant: str) -> Quota:
        """Drop the tenant's own quota: the server's defaults apply again."""
        return from_json(Quota, self._client._json(_core.reset_quota(tenant)))
