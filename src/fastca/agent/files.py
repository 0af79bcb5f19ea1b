"""File-mounted certificates (docs/istio-contract.md, docs/reliability.md, case 33) and the
writer for the agent's own output directory.

A pair is served only when the chain parses, the key parses and the key is
the leaf's; anything else (a half-written swap, bogus PEM, a key from
another generation) keeps the last good pair, or raises ``SecretUnavailable``
when there never was one. Changes are found by polling: each path is
resolved (Kubernetes swaps a ``..data`` symlink) and (path, inode, mtime,
ctime, size) of the target compared; a change is read, checked, and pushed to
listeners only when it validates and its content differs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastca.agent.events import emit
from fastca.agent.secrets import (
    FILE_CERT_PREFIX,
    FILE_ROOT_PREFIX,
    ROOT_CERT,
    WORKLOAD_CERT,
    SecretItem,
    SecretUnavailable,
)
from fastca.keys import spki_der

__all__ = ["FileCertificates", "FileRoot", "FileReader", "file_reader", "FileSecrets", "MountedDirectory",
           "write_output", "fingerprint", "KEY_FILE", "CHAIN_FILE", "ROOT_FILE"]

KEY_FILE, CHAIN_FILE, ROOT_FILE = "key.pem", "cert-chain.pem", "root-cert.pem"
_MAX_FILE_BYTES = 1 << 20

Fingerprint = tuple[Any, ...]


def fingerprint(paths: tuple[Path, ...]) -> Fingerprint:
    """What changes when any of ``paths`` (symlinks resolved) changes."""
    out: list[Any] = []
    for path in paths:
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError:
            out.append((real, None))
            continue
        out.append((real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
    return tuple(out)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_FILE_BYTES + 1)
    except OSError as error:
        raise SecretUnavailable(f"cannot read the {what} file {path}: {error.strerror or error}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise SecretUnavailable(f"the {what} file {path} is larger than {_MAX_FILE_BYTES} bytes")
    return data


def _certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise SecretUnavailable(f"the {what} file {path} does not hold PEM certificates") from None
    if not certs:
        raise SecretUnavailable(f"the {what} file {path} holds no certificate")
    return certs


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


class FileReader(Protocol):
    paths: tuple[Path, ...]

    def read(self, name: str) -> SecretItem: ...


@dataclass(frozen=True)
class FileCertificates:
    """A certificate chain (leaf first) and its private key, as files."""
    cert_path: Path
    key_path: Path

    @property
    def paths(self) -> tuple[Path, ...]:
        return (Path(self.cert_path), Path(self.key_path))

    def read(self, name: str) -> SecretItem:
        chain_pem = _read_bytes(self.cert_path, "certificate chain")
        key_pem = _read_bytes(self.key_path, "private key")
        certs = _certificates(chain_pem, self.cert_path, "certificate chain")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise SecretUnavailable(f"the private key file {self.key_path} does not hold an unencrypted "
                                    f"PEM private key") from None
        if spki_der(key) != spki_der(certs[0]):
            raise SecretUnavailable(f"the private key in {self.key_path} does not match the leaf certificate "
                                    f"in {self.cert_path}")
        return SecretItem(name=name, version=_digest(chain_pem, key_pem), certificate_chain=chain_pem,
                          private_key=key_pem)


@dataclass(frozen=True)
class FileRoot:
    """A PEM bundle of trusted roots."""
    path: Path

    @property
    def paths(self) -> tuple[Path, ...]:
        return (Path(self.path),)

    def read(self, name: str) -> SecretItem:
        data = _read_bytes(self.path, "root certificate")
        _certificates(data, self.path, "root certificate")
        return SecretItem(name=name, version=_digest(data), trusted_ca=data)


def file_reader(name: str) -> FileReader | None:
    """The reader for ``file-cert:<cert>~<key>`` / ``file-root:<path>``, else None."""
    if name.startswith(FILE_CERT_PREFIX):
        cert, sep, key = name[len(FILE_CERT_PREFIX):].partition("~")
        if not sep or not cert or not key:
            return None
        return FileCertificates(Path(cert), Path(key))
    if name.startswith(FILE_ROOT_PREFIX):
        path = name[len(FILE_ROOT_PREFIX):]
        return FileRoot(Path(path)) if path else None
    return None


@dataclass
class _Watched:
    reader: FileReader
    fingerprint: Fingerprint | None = None
    item: SecretItem | None = None     # the last good content
    good: bool = False                 # the files at `fingerprint` validated
    error: str = ""                    # why the last read failed


class FileSecrets:
    """File-backed secrets: read on ``get``, then watched by polling until
    released. ``resolve(name)`` gives the reader for a name (None: unknown)."""

    def __init__(self, resolve: Callable[[str], FileReader | None], *, notify: Callable[[str], None],
                 poll_interval: float = 0.5, on_event: Callable[..., None] | None = None) -> None:
        self._resolve = resolve
        self._notify = notify
        self.poll_interval = poll_interval
        self._on_event = on_event
        self._watched: dict[str, _Watched] = {}
        self._task: asyncio.Task[None] | None = None

    def _event(self, kind: str, name: str, **details: Any) -> None:
        emit(self._on_event, kind, name, **details)

    def _refresh(self, name: str, watched: _Watched, *, force: bool = False) -> bool:
        """Re-read if the files changed (or the last read failed); True when
        the served content changed."""
        current = fingerprint(watched.reader.paths)
        if not force and watched.good and current == watched.fingerprint:
            return False
        changed_on_disk = current != watched.fingerprint
        watched.fingerprint = current
        try:
            item = watched.reader.read(name)
        except SecretUnavailable as error:
            watched.good, watched.error = False, str(error)
            if changed_on_disk:
                self._event("file_invalid", name, error=str(error))
            return False
        watched.good = True
        if watched.item is not None and watched.item.version == item.version:
            return False
        previous, watched.item = watched.item, item
        self._event("file_loaded", name, version=item.version)
        return previous is not None

    async def get(self, name: str) -> SecretItem:
        watched = self._watched.get(name)
        if watched is None:
            reader = self._resolve(name)
            if reader is None:
                raise SecretUnavailable(f"unknown resource {name!r}")
            watched = _Watched(reader)
        if self._refresh(name, watched):
            self._notify(name)
        if watched.item is None:
            # Nothing good was ever read: report why, and do not watch yet.
            raise SecretUnavailable(watched.error or f"{name}: no valid certificate files")
        self._watched[name] = watched
        self._ensure_polling()
        return watched.item

    def release(self, name: str) -> None:
        self._watched.pop(name, None)

    def poll_once(self) -> list[str]:
        """Check every watched resource once; the names whose content changed
        (their listeners were notified)."""
        changed = []
        for name, watched in list(self._watched.items()):
            try:
                if self._refresh(name, watched):
                    changed.append(name)
            except Exception as error:      # never let one resource stop the watch
                self._event("file_watch_error", name, error=repr(error))
        for name in changed:
            if name in self._watched:
                self._notify(name)
        return changed

    def _ensure_polling(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll_loop(), name="fastca-agent-file-watch")

    async def _poll_loop(self) -> None:
        while self._watched:
            await asyncio.sleep(self.poll_interval)
            self.poll_once()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Listeners:
    def __init__(self, on_event: Callable[..., None] | None) -> None:
        self._listeners: list[Callable[[str], None]] = []
        self._on_event = on_event

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            try:
                self._listeners.remove(listener)
            except ValueError:
                pass
        return unsubscribe

    def notify(self, name: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(name)
            except Exception as error:
                emit(self._on_event, "listener_error", name, error=repr(error))


class MountedDirectory:
    """A ``SecretSource`` over a directory of ``cert-chain.pem``, ``key.pem``
    and ``root-cert.pem`` (a mounted Secret): ``default`` and ``ROOTCA`` come
    from it, ``file-cert:``/``file-root:`` names from their own paths. Every
    requested name is watched (polling) until released."""

    def __init__(self, directory: Path | str, *, poll_interval: float = 0.5,
                 on_event: Callable[..., None] | None = None) -> None:
        self.directory = Path(directory)
        self._listeners = _Listeners(on_event)
        self._files = FileSecrets(self._reader, notify=self._listeners.notify, poll_interval=poll_interval,
                                  on_event=on_event)

    def _reader(self, name: str) -> FileReader | None:
        if name == WORKLOAD_CERT:
            return FileCertificates(self.directory / CHAIN_FILE, self.directory / KEY_FILE)
        if name == ROOT_CERT:
            return FileRoot(self.directory / ROOT_FILE)
        return file_reader(name)

    async def get(self, name: str) -> SecretItem:
        return await self._files.get(name)

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        return self._listeners.subscribe(listener)

    def release(self, name: str) -> None:
        self._files.release(name)

    def poll_once(self) -> list[str]:
        return self._files.poll_once()

    async def start(self) -> None:
        """Nothing to start ahead of time: watching begins with the first get."""

    async def stop(self) -> None:
        await self._files.stop()


# -- the agent's output directory ------------------------------------------------------------------------------
def _write_atomic(directory: Path, name: str, data: bytes, mode: int) -> None:
    tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
    # Created with its final mode: a key is never readable by others, even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)                 # umask may have removed bits we want (never added any)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_output(directory: Path | str, key_pem: bytes, chain_pem: bytes, root_pem: bytes) -> None:
    """Write ``key.pem`` (0600), ``cert-chain.pem`` and ``root-cert.pem``
    (0644) atomically (temporary file + rename). The key goes first; a reader
    that sees the new key before the new chain finds a mismatch and waits."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory, KEY_FILE, key_pem, 0o600)
    _write_atomic(directory, CHAIN_FILE, chain_pem, 0o644)
    _write_atomic(directory, ROOT_FILE, root_pem, 0o644)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
