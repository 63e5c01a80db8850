"""The asyncio client: :class:`AsyncHyperfleet`, the same surface as
:class:`hyperfleet.Hyperfleet` with coroutines and async iterators.

Requests are built by ``_core`` exactly as for the sync client and sent over
one ``httpx.AsyncClient``. Local file I/O of ``upload``/``download`` is done in
chunks on the event loop's thread (plain file reads and writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json as _json
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import (
    IO,
    Any,
    AsyncIterator,
    Awaitable,
    Dict,
    Generator,
    Iterable,
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


class AsyncHyperfleet:
    """An asyncio client of one Hyperfleet daemon; arguments as :class:`hyperfleet.Hyperfleet`.

    ::

        async with AsyncHyperfleet() as hf:
            async with hf.machines.create(start=True) as m:
                print((await m.exec("uname -a")).stdout)
    """

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = _core.DEFAULT_TIMEOUT,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self._cfg = _core.resolve_config(url, api_key, timeout)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()
        #: Machines: create, get, list.
        self.machines = AsyncMachines(self)
        #: API keys (admin scope).
        self.keys = AsyncKeys(self)
        #: Tenant quotas.
        self.quotas = AsyncQuotas(self)
        #: Snapshots: create (of a machine), get, list, delete.
        self.snapshots = AsyncSnapshots(self)
        #: Templates: snapshots of a freshly booted guest that fast creates restore.
        self.templates = AsyncTemplates(self)
        #: OCI images: pull, import, get, list, delete (machines are made from them).
        self.images = AsyncImages(self)

    @property
    def url(self) -> str:
        """The daemon's base URL (without ``/api/v1``)."""
        return self._cfg.base_url

    async def health(self) -> Health:
        """``GET /health``: the store's and each backend's readiness."""
        r = await self._send(_core.health(), ok_statuses=(503,))
        return from_json(Health, r.json())

    async def storage(self) -> Storage:
        """``GET /storage``: the storage budget, what counts against it and the
        latest evictions, as last measured. Host-wide: needs the ``read``
        scope on a key of the operator tenant (``default``)."""
        return from_json(Storage, await self._json(_core.storage()))

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[Mapping[str, Any]] = None,
        json: Any = None,
    ) -> Any:
        """Send any request under ``/api/v1`` and return its JSON (``None`` when
        empty), for routes this SDK does not wrap yet."""
        call = Call(method.upper(), "/" + path.lstrip("/"), params=dict(params or {}), json=json)
        r = await self._send(call)
        return r.json() if r.content else None

    async def close(self) -> None:
        """Close the HTTP connections (unless the ``http_client`` was given)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncHyperfleet:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    # --- transport ------------------------------------------------------------------------------

    async def _send(self, call: Call, ok_statuses: Sequence[int] = ()) -> httpx.Response:
        try:
            r = await self._http.request(**call.request_args(self._cfg))
        except httpx.HTTPError as e:
            raise _core.transport_error(e, self._cfg) from e
        if r.status_code not in ok_statuses:
            _core.check(r.status_code, r.content, r.reason_phrase)
        return r

    async def _json(self, call: Call) -> Any:
        r = await self._send(call)
        return r.json() if r.content else None

    @contextlib.asynccontextmanager
    async def _stream(self, call: Call) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream(**call.request_args(self._cfg)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _core.check(r.status_code, r.content, r.reason_phrase)
                yield r
        except httpx.HTTPError as e:
            raise _core.transport_error(e, self._cfg) from e


class _PendingMachine(Awaitable["AsyncMachine"]):
    """What :meth:`AsyncMachines.create` returns: await it for the machine, or
    use it in ``async with`` to have the machine deleted at the end."""

    def __init__(self, coro: Awaitable[AsyncMachine]) -> None:
        self._coro = coro
        self._machine: Optional[AsyncMachine] = None

    def __await__(self) -> Generator[Any, None, AsyncMachine]:
        return self._coro.__await__()

    async def __aenter__(self) -> AsyncMachine:
        self._machine = await self._coro
        return self._machine

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._machine is not None:
            await self._machine.__aexit__(exc_type, exc, tb)


class AsyncMachines:
    """``client.machines``: create, get and list machines."""

    def __init__(self, client: AsyncHyperfleet) -> None:
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
    ) -> _PendingMachine:
        """Create a machine; arguments as :meth:`hyperfleet.Machines.create`.

        ``m = await client.machines.create(...)``, or
        ``async with client.machines.create(...) as m:`` to delete it (forcibly)
        when the block ends.
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

        async def run() -> AsyncMachine:
            m = AsyncMachine._wrap(self._client, await self._client._json(call))
            if start:
                try:
                    await m.start(timeout=timeout)
                except BaseException:
                    with contextlib.suppress(HyperfleetError):
                        await m.delete(force=True)
                    raise
            return m

        return _PendingMachine(run())

    async def get(self, id: str) -> AsyncMachine:
        """The machine with this id or name (``NotFound`` when there is none)."""
        return AsyncMachine._wrap(self._client, await self._client._json(_core.get_machine(id)))

    async def update(
        self,
        id: str,
        *,
        idle_timeout_seconds: Optional[int] = _core.UNSET,
        persistence: Union[Persistence, Mapping[str, Any], None] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> AsyncMachine:
        """Change the idle timeout, persistence or metadata of the machine
        with this id or name: see :meth:`AsyncMachine.update`."""
        call = _core.update_machine(id, idle_timeout_seconds, persistence, metadata)
        return AsyncMachine._wrap(self._client, await self._client._json(call))

    async def list(
        self, status: Optional[MachineStatus] = None, *, page_size: int = 100
    ) -> AsyncIterator[AsyncMachine]:
        """Every machine of the tenant, fetched ``page_size`` at a time as you
        iterate (``async for m in client.machines.list(): ...``)."""
        offset = 0
        while True:
            page = await self.list_page(status, limit=page_size, offset=offset)
            for m in page.machines:
                yield m
            offset += len(page.machines)
            if not page.machines or offset >= page.total:
                return

    async def list_page(
        self, status: Optional[MachineStatus] = None, *, limit: int = 100, offset: int = 0
    ) -> MachinePage[AsyncMachine]:
        """One page of ``GET /machines``: the machines and how many match in total."""
        body = await self._client._json(_core.list_machines(status, limit, offset))
        return MachinePage(
            machines=[AsyncMachine._wrap(self._client, m) for m in body["machines"]],
            total=int(body["total"]),
        )


class AsyncMachine(MachineFields):
    """A machine with its operations as coroutines; see :class:`hyperfleet.Machine`.

    ``async with`` deletes the machine (``force=True``) on exit.
    """

    _client: AsyncHyperfleet

    @classmethod
    def _wrap(cls, client: AsyncHyperfleet, data: Mapping[str, Any]) -> AsyncMachine:
        fresh = from_json(MachineFields, data)
        m = cls(**{f.name: getattr(fresh, f.name) for f in dataclasses.fields(MachineFields)})
        m._client = client
        return m

    def _update(self, data: Any) -> AsyncMachine:
        if isinstance(data, Mapping):
            fresh = from_json(MachineFields, data)
            for f in dataclasses.fields(MachineFields):
                setattr(self, f.name, getattr(fresh, f.name))
        return self

    async def __aenter__(self) -> AsyncMachine:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        with contextlib.suppress(NotFound):
            await self.delete(force=True)

    # --- lifecycle ------------------------------------------------------------------------------

    async def _act(self, verb: str, wait: bool, timeout: Optional[float]) -> AsyncMachine:
        call = _core.action(self.id, verb, wait, timeout)
        return self._update(await self._client._json(call))

    async def start(self, *, wait: bool = True, timeout: Optional[float] = None) -> AsyncMachine:
        """Boot (or restore); see :meth:`hyperfleet.Machine.start`."""
        return await self._act("start", wait, timeout)

    async def stop(self, *, wait: bool = True, timeout: Optional[float] = None) -> AsyncMachine:
        """Stop gracefully; see :meth:`hyperfleet.Machine.stop`."""
        return await self._act("stop", wait, timeout)

    async def restart(self, *, wait: bool = True, timeout: Optional[float] = None) -> AsyncMachine:
        """Stop and boot again; see :meth:`hyperfleet.Machine.restart`."""
        return await self._act("restart", wait, timeout)

    async def pause(self, *, wait: bool = True, timeout: Optional[float] = None) -> AsyncMachine:
        """Freeze the vCPUs; see :meth:`hyperfleet.Machine.pause`."""
        return await self._act("pause", wait, timeout)

    async def resume(self, *, wait: bool = True, timeout: Optional[float] = None) -> AsyncMachine:
        """Continue a paused or suspended machine; see :meth:`hyperfleet.Machine.resume`."""
        return await self._act("resume", wait, timeout)

    async def suspend(self, *, wait: bool = True, timeout: Optional[float] = None) -> AsyncMachine:
        """Save the memory to disk; see :meth:`hyperfleet.Machine.suspend`."""
        return await self._act("suspend", wait, timeout)

    async def kill(self, *, wait: bool = True, timeout: Optional[float] = None) -> AsyncMachine:
        """Hard stop at once; see :meth:`hyperfleet.Machine.kill`."""
        return await self._act("kill", wait, timeout)

    async def delete(
        self, *, force: bool = False, wait: bool = True, timeout: Optional[float] = None
    ) -> None:
        """Delete the machine; see :meth:`hyperfleet.Machine.delete`."""
        call = _core.delete_machine(self.id, force, wait, timeout)
        self._update(await self._client._json(call))

    async def wait(self, status: MachineStatus, timeout: float = 60.0) -> AsyncMachine:
        """Wait until the machine is in ``status``; see :meth:`hyperfleet.Machine.wait`."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            chunk = min(math.ceil(left), int(_core.MAX_SERVER_WAIT))
            try:
                call = _core.wait_machine(self.id, status, chunk)
                return self._update(await self._client._json(call))
            except Timeout:
                if time.monotonic() >= deadline - 0.5:
                    raise

    async def refresh(self) -> AsyncMachine:
        """Read the machine's fields again."""
        return self._update(await self._client._json(_core.get_machine(self.id)))

    async def update(
        self,
        *,
        idle_timeout_seconds: Optional[int] = _core.UNSET,
        persistence: Union[Persistence, Mapping[str, Any], None] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> AsyncMachine:
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
        return self._update(await self._client._json(call))

    def url(self, port: int, *, with_token: bool = False) -> str:
        """The proxy URL of an exposed ``port``; see :meth:`hyperfleet.Machine.url`."""
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

    async def events(
        self, *, follow: bool = False, after: Optional[int] = None
    ) -> AsyncIterator[MachineEvent]:
        """The machine's history; with ``follow`` live over SSE until it is
        deleted. See :meth:`hyperfleet.Machine.events`."""
        if not follow:
            last = after or 0
            while True:
                body = await self._client._json(_core.events(self.id, last, 1000))
                evs = [from_json(MachineEvent, e) for e in body["events"]]
                for ev in evs:
                    yield ev
                if len(evs) < 1000:
                    return
                last = evs[-1].id
        cursor = after
        while True:
            lagged = False
            async with self._client._stream(_core.events_sse(self.id, cursor)) as r:
                dec = _core.SseDecoder()
                async for line in r.aiter_lines():
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

    async def logs(self, *, follow: bool = False, tail: Optional[int] = None) -> AsyncIterator[str]:
        """The serial console line by line; see :meth:`hyperfleet.Machine.logs`."""
        async with self._client._stream(_core.logs(self.id, follow, tail)) as r:
            async for line in r.aiter_lines():
                yield line

    # --- inside the guest -----------------------------------------------------------------------

    async def exec(
        self,
        command: Command,
        *,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
        max_output_bytes: Optional[int] = None,
    ) -> ExecResult:
        """Run a command and return its output; see :meth:`hyperfleet.Machine.exec`."""
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
        return from_json(ExecResult, await self._client._json(call))

    async def exec_stream(
        self,
        command: Command,
        *,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[bytes, str, None] = None,
    ) -> AsyncIterator[ExecEvent]:
        """Run a command and yield its output as it comes; see
        :meth:`hyperfleet.Machine.exec_stream`."""
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
        async with self._client._stream(call) as r:
            async for line in r.aiter_lines():
                ev = _core.exec_line(line)
                if ev is not None:
                    yield ev

    @property
    def files(self) -> AsyncMachineFiles:
        """Files in the guest; see :class:`hyperfleet.MachineFiles`."""
        return AsyncMachineFiles(self._client, self.id)

    # --- snapshots and fork -----------------------------------------------------------------------

    async def snapshot(
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
        return from_json(Snapshot, await self._client._json(call))

    async def fork(
        self,
        count: Optional[int] = None,
        *,
        names: Optional[Sequence[str]] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> ForkResult[AsyncMachine]:
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
        body = await self._client._json(_core.fork(self.id, count, names, wait, timeout))
        return ForkResult(
            machines=[AsyncMachine._wrap(self._client, m) for m in body["machines"]],
            snapshot_id=body["snapshot_id"],
            pause_ms=body.get("pause_ms"),
        )


class AsyncMachineFiles:
    """``machine.files`` of an :class:`AsyncMachine`; see :class:`hyperfleet.MachineFiles`."""

    def __init__(self, client: AsyncHyperfleet, machine_id: str) -> None:
        self._client = client
        self._id = machine_id

    async def read(self, path: str, *, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The file's content, or a range of it; see :meth:`hyperfleet.MachineFiles.read`."""
        return b"".join([c async for c in self.iter_read(path, offset=offset, length=length)])

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The file at ``path`` decoded as text."""
        return (await self.read(path)).decode(encoding)

    async def iter_read(
        self,
        path: str,
        *,
        offset: int = 0,
        length: Optional[int] = None,
        chunk_size: int = CHUNK,
    ) -> AsyncIterator[bytes]:
        """The file's bytes (or a range) in chunks as they arrive."""
        call = _core.file_read_raw(self._id, path, _core.byte_range(offset, length))
        async with self._client._stream(call) as r:
            async for chunk in r.aiter_bytes(chunk_size):
                yield chunk

    async def write(
        self,
        path: str,
        data: FileData,
        *,
        mode: Optional[int] = None,
        create_dirs: bool = False,
    ) -> FileWritten:
        """Write (create or replace) the file at ``path``; see
        :meth:`hyperfleet.MachineFiles.write`."""
        raw, f, size = _core.body_source(data)
        content: Any = raw if f is None else _achunks(f, size)
        call = _core.file_write_raw(self._id, path, content, size, mode, create_dirs)
        return from_json(FileWritten, await self._client._json(call))

    async def upload(
        self,
        local_path: PathLike,
        remote_path: str,
        *,
        mode: Optional[int] = None,
        create_dirs: bool = False,
    ) -> FileWritten:
        """Copy the local file ``local_path`` to ``remote_path`` in the guest, streamed."""
        with open(local_path, "rb") as f:
            return await self.write(remote_path, f, mode=mode, create_dirs=create_dirs)

    async def download(self, remote_path: str, local_path: PathLike) -> int:
        """Copy ``remote_path`` in the guest to the local ``local_path``; returns the size."""
        n = 0
        tmp = Path(f"{os.fspath(local_path)}.part")
        try:
            with open(tmp, "wb") as f:
                async for chunk in self.iter_read(remote_path):
                    f.write(chunk)
                    n += len(chunk)
            os.replace(tmp, local_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return n

    async def list(self, path: str) -> List[DirEntry]:
        """The entries of the directory ``path``."""
        body = await self._client._json(_core.file_list(self._id, path))
        return [from_json(DirEntry, e) for e in body["entries"]]

    async def stat(self, path: str) -> FileStat:
        """Metadata of ``path``."""
        return from_json(FileStat, await self._client._json(_core.file_stat(self._id, path)))

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest."""
        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    async def mkdir(
        self, path: str, *, mode: Optional[int] = None, create_dirs: bool = False
    ) -> None:
        """Create the directory ``path`` (and missing parents with ``create_dirs``)."""
        await self._client._json(_core.file_mkdir(self._id, path, mode, create_dirs))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory (non-empty ones need ``recursive``)."""
        await self._client._json(_core.file_remove(self._id, path, recursive))


async def _achunks(f: IO[bytes], size: int) -> AsyncIterator[bytes]:
    for chunk in _core.file_chunks(f, size):
        yield chunk


class AsyncSnapshots:
    """``client.snapshots``: snapshots of machines (``machine.snapshot()``
    takes one too)."""

    def __init__(self, client: AsyncHyperfleet) -> None:
        self._client = client

    async def create(
        self,
        machine: Union[str, MachineFields],
        *,
        name: Optional[str] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> Snapshot:
        """Take a snapshot of ``machine`` (id, name or machine); see
        :meth:`AsyncMachine.snapshot`."""
        mid = machine.id if isinstance(machine, MachineFields) else machine
        return from_json(
            Snapshot, await self._client._json(_core.create_snapshot(mid, name, wait, timeout))
        )

    async def list(self) -> List[Snapshot]:
        """The tenant's snapshots (those being deleted are not listed)."""
        body = await self._client._json(_core.list_snapshots())
        return [from_json(Snapshot, x) for x in body["snapshots"]]

    async def get(self, id: str) -> Snapshot:
        """The snapshot with this id or name (``NotFound`` when there is none)."""
        return from_json(Snapshot, await self._client._json(_core.get_snapshot(id)))

    async def delete(self, snapshot: Union[str, Snapshot]) -> None:
        """Delete a snapshot (id, name or :class:`Snapshot`). Machines made
        from it go on: its files stay until the last of them is deleted."""
        sid = snapshot.id if isinstance(snapshot, Snapshot) else snapshot
        await self._client._json(_core.delete_snapshot(sid))


class AsyncTemplates:
    """``client.templates``: per machine shape, a snapshot of a freshly booted
    idle guest that creating (and first starting) a machine of that shape
    restores instead of booting. Shown as :class:`Snapshot` s whose ``name``
    is the template's key. Warming and deleting need an ``admin`` key."""

    def __init__(self, client: AsyncHyperfleet) -> None:
        self._client = client

    async def warm(
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
        return from_json(Snapshot, await self._client._json(call))

    async def list(self) -> List[Snapshot]:
        """The templates there are."""
        body = await self._client._json(_core.list_templates())
        return [from_json(Snapshot, x) for x in body["snapshots"]]

    async def delete(self, template: Union[str, Snapshot]) -> None:
        """Delete a template (id or :class:`Snapshot`); the next fast create
        of its shape makes it again."""
        tid = template.id if isinstance(template, Snapshot) else template
        await self._client._json(_core.delete_template(tid))


class AsyncImages:
    """``client.images``: OCI images; see :class:`hyperfleet.Images`."""

    def __init__(self, client: AsyncHyperfleet) -> None:
        self._client = client

    async def pull(
        self,
        ref: str,
        *,
        insecure: bool = False,
        auth: Optional[Mapping[str, str]] = None,
    ) -> AsyncImage:
        """Start pulling ``ref``; see :meth:`hyperfleet.Images.pull`."""
        body = await self._client._json(_core.pull_image(ref, insecure, auth))
        return AsyncImage._wrap(self._client, body)

    async def import_archive(
        self, archive: ArchiveSource, *, timeout: Optional[float] = None
    ) -> AsyncImage:
        """Import an OCI layout tar or ``docker save`` archive, streamed; see
        :meth:`hyperfleet.Images.import_archive`."""
        if isinstance(archive, (str, os.PathLike)):
            with open(archive, "rb") as fh:
                return await self.import_archive(fh, timeout=timeout)
        raw, f, size = _core.body_source(archive)
        content: Any = raw if f is None else _achunks(f, size)
        call = _core.import_image(content, size, timeout)
        return AsyncImage._wrap(self._client, await self._client._json(call))

    async def list(self) -> List[AsyncImage]:
        """The tenant's images, oldest first."""
        body = await self._client._json(_core.list_images())
        return [AsyncImage._wrap(self._client, x) for x in body["images"]]

    async def get(self, id: str) -> AsyncImage:
        """The image with this id (``NotFound`` when the tenant has none)."""
        return AsyncImage._wrap(self._client, await self._client._json(_core.get_image(id)))

    async def delete(self, image: Union[str, ImageFields]) -> None:
        """Delete an image (id or image); see :meth:`hyperfleet.Images.delete`."""
        iid = image.id if isinstance(image, ImageFields) else image
        await self._client._json(_core.delete_image(iid))

    def events(
        self, id: str, *, follow: bool = False, after: Optional[int] = None
    ) -> AsyncIterator[ImageEvent]:
        """The image's pull or import steps; see :meth:`hyperfleet.Image.events`."""
        return _image_events(self._client, id, follow, after)


class AsyncImage(ImageFields):
    """An OCI image record with its operations as coroutines; see :class:`hyperfleet.Image`."""

    _client: AsyncHyperfleet

    @classmethod
    def _wrap(cls, client: AsyncHyperfleet, data: Mapping[str, Any]) -> AsyncImage:
        fresh = from_json(ImageFields, data)
        i = cls(**{f.name: getattr(fresh, f.name) for f in dataclasses.fields(ImageFields)})
        i._client = client
        return i

    def _update(self, data: Mapping[str, Any]) -> AsyncImage:
        fresh = from_json(ImageFields, data)
        for f in dataclasses.fields(ImageFields):
            setattr(self, f.name, getattr(fresh, f.name))
        return self

    async def refresh(self) -> AsyncImage:
        """Read the image's fields again."""
        return self._update(await self._client._json(_core.get_image(self.id)))

    async def wait_ready(self, timeout: float = 600.0, *, poll_interval: float = 0.5) -> AsyncImage:
        """Poll until ``ready`` (returns ``self``) or ``failed`` (raises
        :class:`~hyperfleet.ImageFailed`); see :meth:`hyperfleet.Image.wait_ready`."""
        deadline = time.monotonic() + timeout
        while True:
            if self.status == "ready":
                return self
            if self.status == "failed":
                raise ImageFailed(f"image {self.id} ({self.ref}) failed: {self.error}", self)
            if time.monotonic() >= deadline:
                raise Timeout(f"image {self.id} is still {self.status} after {timeout} s")
            await asyncio.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
            await self.refresh()

    async def delete(self) -> None:
        """Delete the image; see :meth:`hyperfleet.Images.delete`."""
        await self._client._json(_core.delete_image(self.id))

    def events(
        self, *, follow: bool = False, after: Optional[int] = None
    ) -> AsyncIterator[ImageEvent]:
        """The image's pull or import steps; see :meth:`hyperfleet.Image.events`."""
        return _image_events(self._client, self.id, follow, after)


async def _image_events(
    client: AsyncHyperfleet, id: str, follow: bool, after: Optional[int]
) -> AsyncIterator[ImageEvent]:
    if not follow:
        body = await client._json(_core.image_events(id, after))
        for e in body["events"]:
            yield from_json(ImageEvent, e)
        return
    cursor = after
    while True:
        lagged = False
        async with client._stream(_core.image_events_sse(id, cursor)) as r:
            dec = _core.SseDecoder()
            async for line in r.aiter_lines():
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


class AsyncKeys:
    """``client.keys``: API keys; see :class:`hyperfleet.Keys`."""

    def __init__(self, client: AsyncHyperfleet) -> None:
        self._client = client

    async def create(
        self,
        name: str,
        scopes: Sequence[Scope],
        *,
        tenant: Optional[str] = None,
        expires_in_seconds: Optional[int] = None,
    ) -> CreatedKey:
        """Create a key; its secret (``.key``) is shown this once only."""
        call = _core.create_key(name, scopes, tenant, expires_in_seconds)
        return from_json(CreatedKey, await self._client._json(call))

    async def list(self) -> List[ApiKey]:
        """The keys this admin may manage."""
        body = await self._client._json(_core.list_keys())
        return [from_json(ApiKey, k) for k in body["keys"]]

    async def delete(self, key: Union[str, ApiKey]) -> None:
        """Revoke a key (by id or :class:`ApiKey`); idempotent."""
        await self._client._json(_core.delete_key(key.id if isinstance(key, ApiKey) else key))


class AsyncQuotas:
    """``client.quotas``: tenant quotas; see :class:`hyperfleet.Quotas`."""

    def __init__(self, client: AsyncHyperfleet) -> None:
        self._client = client

    async def get(self, tenant: str) -> Quota:
        """The tenant's limits in force and its usage."""
        return from_json(Quota, await self._client._json(_core.get_quota(tenant)))

    async def set(
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
        return from_json(Quota, await self._client._json(_core.set_quota(tenant, limits)))

    async def reset(self, tenant: str) -> Quota:
        """Drop the tenant's own quota: the server's defaults apply again."""
        return from_json(Quota, await self._client._json(_core.reset_quota(tenant)))
