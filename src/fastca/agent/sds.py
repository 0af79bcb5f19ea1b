"""The SDS server Envoy talks to: ``envoy.service.secret.v3.SecretDiscoveryService``
on a Unix socket, serving what a ``SecretSource`` (the secret manager) produces.

    server = SdsServer(manager, socket_path="./var/run/secrets/workload-spiffe-uds/socket")
    await server.start()          # socket 0600 from the start, parent directories 0700 when created
    ...
    await server.stop(grace=5)    # open streams end with OK, Envoy reconnects elsewhere

Semantics (each stream is independent and processes its events one at a time):

StreamSecrets (state of the world)
    A request names the resources the stream wants. A request whose
    ``response_nonce`` is not the last nonce sent is stale and ignored whole
    (Envoy re-sends its full subscription with its next ACK). A matching nonce
    without ``error_detail`` is an ACK, with it a NACK (logged, counted). After
    any request the server sends one response holding every available
    subscribed secret, but only when one of them differs from what this stream
    last sent (so an ACK, a NACK or a repeated request sends nothing; the next
    real change does). ``version_info`` is the item's version for one secret,
    a digest of the name/version pairs for several.
DeltaSecrets (incremental)
    Subscribe/unsubscribe diffs are applied from every request (also with a
    stale nonce: they are diffs, not state); ACK/NACK as above. A response
    carries only secrets whose version the client does not have (from
    ``initial_resource_versions`` on the first request, or what was last sent
    on this stream; a NACKed version counts as sent), and lists in
    ``removed_resources`` the names the client just unsubscribed.
FetchSecrets (unary)
    The named secrets now; SecretUnavailable -> UNAVAILABLE.

A secret the source cannot produce (``SecretUnavailable``) is not sent: the
stream stays open (Envoy waits) and the name is fetched again when the source
notifies a change for it. A secret that was sent and then becomes unavailable
stays as it was (nothing is withdrawn). A ``type_url`` that is set and not the
Secret type ends the stream with INVALID_ARGUMENT.

Counters for metrics: ``pushes`` (responses carrying each resource name),
``nacks``, ``active_streams``. Logs carry resource names, versions and nonces,
never key material.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from fastca.agent._sds_messages import (
    SECRET_TYPE_URL,
    combined_version,
    new_nonce,
    pack,
)
from fastca.agent.secrets import SecretItem, SecretSource, SecretUnavailable
from fastca.errors import ConfigurationError
from fastca.observability.logging import get_logger

__all__ = ["SECRET_TYPE_URL", "SdsServer"]

log = get_logger("fastca.agent.sds")

_MAX_UNIX_PATH = 107           # sun_path is 108 bytes on Linux, NUL included
_EOF = object()                # the client closed its side (or the reader failed)
_CLOSE = object()              # the server is stopping


class SdsServer:
    """The SDS endpoint. ``source`` produces the secrets; this object only
    speaks the protocol, tracks which names open streams need (and tells the
    source when none does) and counts what it sends."""

    def __init__(self, source: SecretSource, *, socket_path: str | Path) -> None:
        self.source = source
        self.socket_path = Path(socket_path)
        self.pushes: Counter[str] = Counter()     # responses sent, by resource name
        self.nacks = 0
        self.active_streams = 0
        self._refs: Counter[str] = Counter()      # name -> open streams subscribed to it
        self._streams: set[_Stream] = set()
        self._stream_ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._socket_id: tuple[int, int] | None = None   # (st_dev, st_ino) of the socket we put in place

    async def start(self) -> None:
        """Listen on ``socket_path``. The socket is bound inside a fresh
        private directory next to it, made 0600 there, and renamed into place
        only once it is private and serving: no other user can connect at any
        moment, whatever the umask and however open the directory is."""
        if self._server is not None:
            raise RuntimeError("SdsServer already started")
        path = self.socket_path.absolute()
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise ConfigurationError(f"SDS socket path is longer than {_MAX_UNIX_PATH} bytes: {path}")
        _make_private_dirs(path.parent)
        _check_socket_target(path)
        _warn_if_others_can_write(path.parent)
        with _StagingDirectory(path.parent) as staging:
            server = grpc.aio.server()
            sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_Servicer(self), server)
            try:
                try:
                    server.add_insecure_port(f"unix:{staging.socket_path}")
                except RuntimeError as exc:
                    raise ConfigurationError(f"cannot listen on unix:{staging.socket_path}: {exc}") from exc
                staging.seal_socket()
                await server.start()
                replaced = _check_socket_target(path)
                self._socket_id = staging.move_socket(path)
            except BaseException:
                await server.stop(None)
                raise
        self._server = server
        if replaced:
            log.info("sds replaced stale socket", socket=str(path))
        log.info("sds listening", socket=str(path))

    async def stop(self, grace: float | None = None) -> None:
        """End every open stream (status OK, so Envoy reconnects), then stop
        the gRPC server, waiting up to ``grace`` seconds for calls in flight."""
        server, self._server = self._server, None
        if server is None:
            return
        for stream in list(self._streams):
            stream.close()
        await server.stop(grace)
        path = self.socket_path.absolute()
        try:
            st = path.lstat()
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._socket_id:
                path.unlink()                  # ours; a socket someone else put there is left alone
        except FileNotFoundError:
            pass
        log.info("sds stopped", socket=str(path))

    # -- bookkeeping shared by the streams ---------------------------------

    def _acquire(self, name: str) -> None:
        self._refs[name] += 1

    def _release(self, name: str) -> None:
        self._refs[name] -= 1
        if self._refs[name] <= 0:
            del self._refs[name]
            self._release_to_source(name)

    def _release_to_source(self, name: str) -> None:
        try:
            self.source.release(name)
        except Exception:
            log.exception("sds source release failed", resource=name)

    async def _get(self, name: str) -> SecretItem:
        item = await self.source.get(name)
        if item.name != name:
            raise SecretUnavailable(f"the source answered {item.name!r} for {name!r}")
        return item

    async def _fetch(self, request: discovery_pb2.DiscoveryRequest,
                     context: grpc.aio.ServicerContext) -> discovery_pb2.DiscoveryResponse:
        await _check_type_url(request.type_url, context)
        names = list(dict.fromkeys(request.resource_names))
        try:
            results = await asyncio.gather(*(self._get(n) for n in names), return_exceptions=True)
        finally:
            for name in names:
                if name not in self._refs:
                    self._release_to_source(name)
        items: list[SecretItem] = []
        for name, result in zip(names, results):
            if isinstance(result, SecretUnavailable):
                log.warning("sds fetch unavailable", resource=name, reason=str(result))
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"secret {name!r} unavailable: {result}")
            if isinstance(result, BaseException):
                log.error("sds fetch failed", resource=name, exc_info=result)
                await context.abort(grpc.StatusCode.INTERNAL, f"secret {name!r}: internal error")
            items.append(result)
        version = combined_version(items) if items else ""
        nonce = new_nonce()
        for item in items:
            self.pushes[item.name] += 1
        log.info("sds fetch", resources=names, version=version, nonce=nonce)
        return discovery_pb2.DiscoveryResponse(version_info=version, resources=[pack(i) for i in items],
                                               type_url=SECRET_TYPE_URL, nonce=nonce)


class _Servicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, server: SdsServer) -> None:
        self._server = server

    async def StreamSecrets(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        await _SotwStream(self._server, context).run(request_iterator)

    async def DeltaSecrets(self, request_iterator: AsyncIterator[Any], context: Any) -> None:
        await _DeltaStream(self._server, context).run(request_iterator)

    async def FetchSecrets(self, request: Any, context: Any) -> Any:
        return await self._server._fetch(request, context)


class _Stream(ABC):
    """One Envoy stream: requests and source notifications go through one
    queue and are handled in order by ``run``; subclasses hold the protocol."""

    kind = ""

    def __init__(self, server: SdsServer, context: grpc.aio.ServicerContext) -> None:
        self._server = server
        self._context = context
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._queued_changes: set[str] = set()     # coalesces notifications for one name
        self._subscribed: dict[str, None] = {}     # ordered set of names
        self._items: dict[str, SecretItem] = {}    # last item fetched per subscribed name
        self._nonce = ""                           # of the last response sent
        self.id = next(server._stream_ids)

    def close(self) -> None:
        self._events.put_nowait(_CLOSE)

    def _on_change(self, name: str) -> None:
        """The source's listener (called on the event loop)."""
        if name in self._subscribed and name not in self._queued_changes:
            self._queued_changes.add(name)
            self._events.put_nowait(name)

    async def run(self, request_iterator: AsyncIterator[Any]) -> None:
        server = self._server
        unsubscribe = server.source.subscribe(self._on_change)
        server._streams.add(self)
        server.active_streams += 1
        reader = asyncio.create_task(self._read(request_iterator))
        log.info("sds stream opened", stream=self.id, kind=self.kind, peer=self._context.peer())
        try:
            while True:
                event = await self._events.get()
                if event is _EOF or event is _CLOSE:
                    return
                if isinstance(event, str):
                    self._queued_changes.discard(event)
                    if event in self._subscribed:
                        await self._on_source_change(event)
                else:
                    await self._on_request(event)
        finally:
            reader.cancel()
            server._streams.discard(self)
            server.active_streams -= 1
            try:
                unsubscribe()
            except Exception:
                log.exception("sds source unsubscribe failed", stream=self.id)
            names, self._subscribed = list(self._subscribed), {}
            for name in names:
                server._release(name)
            log.info("sds stream closed", stream=self.id, kind=self.kind, resources=names)

    async def _read(self, request_iterator: AsyncIterator[Any]) -> None:
        try:
            async for request in request_iterator:
                self._events.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # noqa: BLE001  (the RPC broke under us; run() ends on _EOF)
            log.debug("sds stream read ended", stream=self.id, error=repr(exc))
        self._events.put_nowait(_EOF)

    async def _refresh(self, names: Iterable[str]) -> None:
        """Fetch ``names`` again; keep the previous item of a name the source
        cannot produce now (it is retried on the next notification)."""
        names = list(names)
        results = await asyncio.gather(*(self._server._get(n) for n in names), return_exceptions=True)
        for name, result in zip(names, results):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, SecretUnavailable):
                log.warning("sds secret unavailable", stream=self.id, resource=name, reason=str(result))
            elif isinstance(result, BaseException):
                log.error("sds secret fetch failed", stream=self.id, resource=name, exc_info=result)
            elif name in self._subscribed:
                self._items[name] = result

    def _ack_or_nack(self, request: Any) -> bool:
        """Classify a request by its nonce; False when the nonce is stale."""
        nonce = request.response_nonce
        if not nonce:
            log.info("sds request", stream=self.id, node=request.node.id,
                     resources=list(self._requested_names(request)))
            return True
        if nonce != self._nonce:
            log.debug("sds stale nonce", stream=self.id, nonce=nonce, current=self._nonce)
            return False
        if request.HasField("error_detail"):
            self._server.nacks += 1
            log.warning("sds nack", stream=self.id, nonce=nonce, version=self._client_version(request),
                        code=request.error_detail.code, error=request.error_detail.message)
        else:
            log.debug("sds ack", stream=self.id, nonce=nonce, version=self._client_version(request))
        return True

    async def _write(self, response: Any, items: list[SecretItem], removed: Iterable[str] = ()) -> None:
        self._nonce = response.nonce
        await self._context.write(response)
        for item in items:
            self._server.pushes[item.name] += 1
        log.info("sds push", stream=self.id, kind=self.kind, nonce=response.nonce,
                 resources={i.name: i.version for i in items}, removed=list(removed))

    # -- protocol ----------------------------------------------------------

    @staticmethod
    @abstractmethod
    def _requested_names(request: Any) -> Iterable[str]: ...

    @staticmethod
    @abstractmethod
    def _client_version(request: Any) -> str: ...

    @abstractmethod
    async def _on_request(self, request: Any) -> None: ...

    @abstractmethod
    async def _on_source_change(self, name: str) -> None: ...


class _SotwStream(_Stream):
    kind = "sotw"

    def __init__(self, server: SdsServer, context: grpc.aio.ServicerContext) -> None:
        super().__init__(server, context)
        self._sent: dict[str, str] = {}            # name -> version in the last response
        self.acked_version = ""

    @staticmethod
    def _requested_names(request: Any) -> Iterable[str]:
        return request.resource_names

    @staticmethod
    def _client_version(request: Any) -> str:
        return request.version_info

    async def _on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        await _check_type_url(request.type_url, self._context)
        if not self._ack_or_nack(request):
            return
        if request.response_nonce and not request.HasField("error_detail"):
            self.acked_version = request.version_info
        wanted = dict.fromkeys(request.resource_names)
        for name in self._subscribed:
            if name not in wanted:
                self._items.pop(name, None)
                self._sent.pop(name, None)
                self._server._release(name)
        added = [n for n in wanted if n not in self._subscribed]
        for name in added:
            self._server._acquire(name)
        self._subscribed = wanted
        if added:
            await self._refresh(added)
        await self._push()

    async def _on_source_change(self, name: str) -> None:
        await self._refresh([name])
        await self._push()

    async def _push(self) -> None:
        current = [self._items[n] for n in self._subscribed if n in self._items]
        if all(self._sent.get(i.name) == i.version for i in current):
            return
        response = discovery_pb2.DiscoveryResponse(
            version_info=combined_version(current), resources=[pack(i) for i in current],
            type_url=SECRET_TYPE_URL, nonce=new_nonce())
        self._sent = {i.name: i.version for i in current}
        await self._write(response, current)


class _DeltaStream(_Stream):
    kind = "delta"

    def __init__(self, server: SdsServer, context: grpc.aio.ServicerContext) -> None:
        super().__init__(server, context)
        self._client_versions: dict[str, str] = {}   # what the client has (told or sent)
        self._first = True

    @staticmethod
    def _requested_names(request: Any) -> Iterable[str]:
        return request.resource_names_subscribe

    @staticmethod
    def _client_version(request: Any) -> str:
        return ""

    async def _on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        await _check_type_url(request.type_url, self._context)
        if self._first:
            self._first = False
            self._client_versions.update(request.initial_resource_versions)
        self._ack_or_nack(request)        # a stale nonce still carries subscription diffs
        removed = []
        for name in dict.fromkeys(request.resource_names_unsubscribe):
            if name in self._subscribed:
                del self._subscribed[name]
                self._items.pop(name, None)
                self._client_versions.pop(name, None)
                self._server._release(name)
                removed.append(name)
        wanted = list(dict.fromkeys(request.resource_names_subscribe))
        for name in wanted:
            if name not in self._subscribed:
                self._subscribed[name] = None
                self._server._acquire(name)
        removed = [n for n in removed if n not in self._subscribed]
        missing = [n for n in wanted if n not in self._items]
        if missing:
            await self._refresh(missing)
        await self._push(wanted, removed)

    async def _on_source_change(self, name: str) -> None:
        await self._refresh([name])
        await self._push([name], [])

    async def _push(self, names: Iterable[str], removed: list[str]) -> None:
        changed = [self._items[n] for n in names
                   if n in self._items and self._client_versions.get(n) != self._items[n].version]
        if not changed and not removed:
            return
        for item in changed:
            self._client_versions[item.name] = item.version
        held = [self._items[n] for n in self._subscribed if n in self._items]
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=combined_version(held) if held else "",
            resources=[discovery_pb2.Resource(name=i.name, version=i.version, resource=pack(i)) for i in changed],
            removed_resources=removed, type_url=SECRET_TYPE_URL, nonce=new_nonce())
        await self._write(response, changed, removed)


async def _check_type_url(type_url: str, context: grpc.aio.ServicerContext) -> None:
    if type_url and type_url != SECRET_TYPE_URL:
        shown = type_url[:200]
        log.warning("sds wrong type_url", type_url=shown)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"unsupported type_url {shown!r}: this server serves {SECRET_TYPE_URL}")


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (existing
    directories are left as they are)."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(candidate, 0o700)


def _check_socket_target(path: Path) -> bool:
    """Whether a (stale) socket is at ``path``, which the rename will
    replace; anything else there is refused."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"{path} exists and is not a socket; refusing to replace it")
    return True


def _warn_if_others_can_write(directory: Path) -> None:
    """Nobody else can connect in any case; but in a directory other users
    may write to without the sticky bit, they can remove or replace the socket."""
    mode = directory.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        log.warning("sds socket directory is writable by other users: they can remove or replace the socket",
                    directory=str(directory), mode=oct(stat.S_IMODE(mode)))


class _StagingDirectory:
    """A fresh directory next to the socket's final path, 0700 and ours,
    held open by descriptor; every step after the bind goes through that
    descriptor, so renaming or replacing the directory's name cannot make us
    seal, or move into place, anything but the socket our bind created.

    If the name was swapped before the bind landed, the socket is not in our
    directory: ``seal_socket`` refuses before the server accepts anything.
    Whatever happens, the directory is removed on exit."""

    SOCKET_NAME = "s"                        # short: sun_path is small

    def __init__(self, parent: Path) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=".sds-", dir=parent))   # mode 0700, whatever the umask
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            os.rmdir(self.path)
            raise
        st = os.fstat(self._fd)
        os.fchmod(self._fd, 0o700)           # a umask can only have taken bits away; this puts them back
        if st.st_uid != os.geteuid():
            self.__exit__(None, None, None)
            raise ConfigurationError(f"the staging directory {self.path} is not ours")
        self.socket_path = self.path / self.SOCKET_NAME
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
            self.__exit__(None, None, None)
            raise ConfigurationError(f"SDS socket path is too long: the socket is first bound at "
                                     f"{self.socket_path}, longer than {_MAX_UNIX_PATH} bytes")

    def __enter__(self) -> _StagingDirectory:
        return self

    def seal_socket(self) -> None:
        """Check our bind created the socket in our directory; make it 0600."""
        try:
            st = os.stat(self.SOCKET_NAME, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ConfigurationError(f"the SDS socket was not created in {self.path} "
                                     f"(the directory was replaced under the agent); not serving on it")
        os.chmod(self.SOCKET_NAME, 0o600, dir_fd=self._fd)

    def move_socket(self, target: Path) -> tuple[int, int]:
        """Rename the socket to ``target`` (atomically replacing a stale
        socket there); its (st_dev, st_ino)."""
        st = os.stat(self.SOCKET_NAME, dir_fd=self._fd, follow_symlinks=False)
        os.rename(self.SOCKET_NAME, target, src_dir_fd=self._fd)
        return st.st_dev, st.st_ino

    def __exit__(self, *exc_info: object) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            try:
                os.unlink(self.SOCKET_NAME, dir_fd=fd)      # still here when start() failed
            except FileNotFoundError:
                pass
            ours = os.fstat(fd)
            try:
                named = os.stat(self.path, follow_symlinks=False)
                if (named.st_dev, named.st_ino) == (ours.st_dev, ours.st_ino):
                    os.rmdir(self.path)
                else:
                    log.warning("sds staging directory was renamed by someone else; left in place",
                                directory=str(self.path))
            except OSError as error:
                log.warning("sds staging directory not removed", directory=str(self.path),
                            error=error.strerror or repr(error))
        finally:
            os.close(fd)
