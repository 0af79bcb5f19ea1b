"""File-mounted certificates (docs/istio-contract.md, docs/reliability.md, case 33) and the
writer for the agent's own output directory.

A pair is served only when the chain parses, the key parses and the key is
the leaf's; anything else (a half-written swap, bogus PEM, a key from
another generation) keeps the last good pair, or raises ``SecretUnavailable``
when there never was one. Changes are found by polling: each path is
resolved (Kubernetes swaps a ``..data`` symlink) and (path, inode, mtime,
ctime, size) of the target compared; a change is read, checked, and pushed to
listeners only when it validates and its content differs.

Only regular files are read (a FIFO, a device or a directory is refused from
the descriptor opened, so nothing can be swapped in between a check and the
read), at most 1 MiB each. Every check and read runs on a thread of its own,
never on the event loop, bounded by a timeout (5 s by default): a read that
hangs (a stuck network mount) leaves the last good content served, marks that
resource unhealthy (``health()``), and is never started twice while it hangs;
every other resource keeps being served."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import stat
import threading
import time
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
           "write_output", "fingerprint", "KEY_FILE", "CHAIN_FILE", "ROOT_FILE", "MAX_FILE_BYTES",
           "DEFAULT_READ_TIMEOUT"]

KEY_FILE, CHAIN_FILE, ROOT_FILE = "key.pem", "cert-chain.pem", "root-cert.pem"
MAX_FILE_BYTES = 1 << 20             # 1 MiB: a certificate bundle is a few KiB
DEFAULT_READ_TIMEOUT = 5.0           # seconds for one check-and-read of a resource's files
# O_NONBLOCK: opening a FIFO (or a device) does not wait for the other side;
# it is then refused by fstat. It changes nothing for a regular file's reads.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))

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


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _too_large(path: Path, what: str) -> SecretUnavailable:
    return SecretUnavailable(f"the {what} file {path} is larger than {MAX_FILE_BYTES} bytes (1 MiB); refused")


def _read_bytes(path: Path, what: str) -> bytes:
    """The content of ``path``, a regular file of at most MAX_FILE_BYTES.
    Blocking I/O: called off the event loop (``FileSecrets``)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        raise SecretUnavailable(f"cannot read the {what} file {path}: {error.strerror or error}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretUnavailable(f"the {what} file {path} is {_kind(st.st_mode)}, not a regular file; refused")
        if st.st_size > MAX_FILE_BYTES:
            raise _too_large(path, what)
        chunks, total = [], 0
        while total <= MAX_FILE_BYTES:          # the file may grow while it is read
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as error:
        raise SecretUnavailable(f"cannot read the {what} file {path}: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if total > MAX_FILE_BYTES:
        raise _too_large(path, what)
    return b"".join(chunks)


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


@dataclass(frozen=True)
class _Outcome:
    """What one check of a resource's files found (computed on a thread)."""
    fingerprint: Fingerprint
    unchanged: bool = False            # same files as the last good read: nothing was read
    item: SecretItem | None = None
    error: str = ""


def _check(reader: FileReader, name: str, known: Fingerprint | None) -> _Outcome:
    """Fingerprint the files and read them unless they are ``known`` (blocking)."""
    current = fingerprint(reader.paths)
    if known is not None and current == known:
        return _Outcome(current, unchanged=True)
    try:
        return _Outcome(current, item=reader.read(name))
    except SecretUnavailable as error:
        return _Outcome(current, error=str(error))


def _on_own_thread(function: Callable[..., _Outcome], *args: Any) -> asyncio.Future[_Outcome]:
    """Run ``function`` on a new daemon thread. Not the loop's executor: a
    call that never returns must neither use up a shared pool (key generation
    and output writes use it) nor keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_Outcome] = loop.create_future()

    def settle(result: _Outcome | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)               # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:                # noqa: BLE001  (handed to the loop)
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:                        # the loop is gone; nobody waits any more
            pass

    threading.Thread(target=run, name="fastca-agent-file-read", daemon=True).start()
    return future


@dataclass
class _Watched:
    reader: FileReader
    fingerprint: Fingerprint | None = None
    item: SecretItem | None = None     # the last good content
    good: bool = False                 # the files at `fingerprint` validated
    error: str = ""                    # why the last read failed
    check: asyncio.Future[_Outcome] | None = None   # the check in flight
    check_started: float = 0.0         # time.monotonic() when it started
    reported_stuck: bool = False       # the check in flight was reported as stuck


class FileSecrets:
    """File-backed secrets: read on ``get``, then watched by polling until
    released (also when the read failed: the name is notified once its files
    validate). ``resolve(name)`` gives the reader for a name (None: unknown).
    Reads run on their own threads, bounded by ``read_timeout`` seconds."""

    def __init__(self, resolve: Callable[[str], FileReader | None], *, notify: Callable[[str], None],
                 poll_interval: float = 0.5, on_event: Callable[..., None] | None = None,
                 read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        self._resolve = resolve
        self._notify = notify
        self.poll_interval = poll_interval
        self.read_timeout = read_timeout
        self._on_event = on_event
        self._watched: dict[str, _Watched] = {}
        self._task: asyncio.Task[None] | None = None

    def _event(self, kind: str, name: str, **details: Any) -> None:
        emit(self._on_event, kind, name, **details)

    async def _outcome(self, name: str, watched: _Watched, force: bool) -> _Outcome | None:
        """The result of a check of ``watched``'s files: the one in flight,
        or a new one; None when it has not finished within the timeout."""
        check = watched.check
        if check is None or check.done():
            known = watched.fingerprint if watched.good and not force else None
            check = watched.check = _on_own_thread(_check, watched.reader, name, known)
            watched.check_started, watched.reported_stuck = time.monotonic(), False
        remaining = watched.check_started + self.read_timeout - time.monotonic()
        try:
            outcome = await asyncio.wait_for(asyncio.shield(check), max(remaining, 0.0))
        except TimeoutError:
            return None
        except Exception as error:      # a reader that raised something else: a failed read all the same
            outcome = _Outcome(watched.fingerprint or (), error=f"{name}: reading the files failed: {error!r}")
        if watched.check is check:
            watched.check = None
        return outcome

    async def _refresh(self, name: str, watched: _Watched, *, force: bool = False) -> bool:
        """Re-read if the files changed (or the last read failed); True when
        the served content changed."""
        outcome = await self._outcome(name, watched, force)
        if outcome is None:
            stuck_for = time.monotonic() - watched.check_started
            watched.good = False
            watched.error = (f"{name}: reading {', '.join(map(str, watched.reader.paths))} has not finished "
                             f"after {stuck_for:.1f} s (timeout {self.read_timeout:g} s)")
            if not watched.reported_stuck:
                watched.reported_stuck = True
                self._event("file_invalid", name, error=watched.error, stuck=True)
            return False
        if outcome.unchanged:
            return False
        changed_on_disk = outcome.fingerprint != watched.fingerprint
        watched.fingerprint = outcome.fingerprint
        item = outcome.item
        if item is None:
            was_good, watched.good, watched.error = watched.good, False, outcome.error
            if changed_on_disk or was_good:
                self._event("file_invalid", name, error=outcome.error)
            return False
        watched.good, watched.error = True, ""
        if watched.item is not None and watched.item.version == item.version:
            return False
        watched.item = item
        self._event("file_loaded", name, version=item.version)
        return True

    async def get(self, name: str) -> SecretItem:
        watched = self._watched.get(name)
        if watched is None:
            reader = self._resolve(name)
            if reader is None:
                raise SecretUnavailable(f"unknown resource {name!r}")
            watched = _Watched(reader)
        if await self._refresh(name, watched) and name in self._watched:
            self._notify(name)
        self._watched[name] = watched       # watched until released, also while it fails
        self._ensure_polling()
        if watched.item is None:
            raise SecretUnavailable(watched.error or f"{name}: no valid certificate files")
        return watched.item

    def release(self, name: str) -> None:
        self._watched.pop(name, None)

    def health(self) -> dict[str, str]:
        """Every watched resource: "" when its last read validated, else why
        not (it may still be serving older content)."""
        return {name: "" if watched.good else (watched.error or f"{name}: not read yet")
                for name, watched in self._watched.items()}

    async def poll_once(self) -> list[str]:
        """Check every watched resource once, all at the same time; the names
        whose content changed (their listeners were notified)."""
        watched = list(self._watched.items())
        results = await asyncio.gather(*(self._refresh(name, w) for name, w in watched), return_exceptions=True)
        changed = []
        for (name, _), result in zip(watched, results):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):      # never let one resource stop the watch
                self._event("file_watch_error", name, error=repr(result))
            elif result:
                changed.append(name)
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
            await self.poll_once()

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
                 on_event: Callable[..., None] | None = None, read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        self.directory = Path(directory)
        self._listeners = _Listeners(on_event)
        self._files = FileSecrets(self._reader, notify=self._listeners.notify, poll_interval=poll_interval,
                                  on_event=on_event, read_timeout=read_timeout)

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

    async def poll_once(self) -> list[str]:
        return await self._files.poll_once()

    def file_health(self) -> dict[str, str]:
        """Per watched resource, "" or why its files did not validate."""
        return self._files.health()

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
