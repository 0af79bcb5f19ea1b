"""The CA-backed ``SecretSource``: a fresh key and CSR per certificate, the
CA's answer checked before use, one certificate cached, renewed in the
background before it expires (docs/istio-contract.md, docs/reliability.md, cases 29–33).

- ``default`` is fetched on the first ``get`` and whenever it is due; concurrent
  callers share one CSR (single flight). ``ROOTCA`` is the last element of the
  same response: a ``get("ROOTCA")`` before any ``default`` fetches ``default``
  (as Istio does), and afterwards is served from the cache (a root does not
  go stale because the workload leaf expired).
- A cached leaf is served until it expires, also while the CA is down; an
  expired leaf is never served: ``get`` renews, and raises ``SecretUnavailable``
  when that fails.
- ``start()`` runs the renewal task: while ``default`` or ``ROOTCA`` is wanted
  (requested and not released), it sleeps until ``refresh_at``, renews, pushes
  ``default`` (and ``ROOTCA`` when the root bundle changed) to listeners, and on
  failure retries with capped exponential backoff (the client re-reads the
  token on every try).
- Between renewals, every ``root_poll_interval`` seconds while ``ROOTCA`` is
  wanted, the CA is asked for its root bundle alone (``CAClient.trust_bundle``,
  fastca's TrustBundleService): a changed bundle (a peer's roots added, a root
  rotation) that still verifies the cached leaf replaces ``ROOTCA`` and is
  pushed. A CA that does not implement it (istiod) is not asked again; then, as
  with Istio's agent, the next renewal brings the bundle.
- ``file-cert:`` / ``file-root:`` names are served from files (``files.py``: regular
  files only, read off the event loop with a size bound and a timeout).

``on_event(kind, name, **details)`` kinds: ``csr_sent`` (key_type), ``issued`` (serial, not_after,
refresh_at, root_changed), ``fetch_failed`` (error, code), ``response_invalid``
(error), ``root_updated`` (version), ``root_poll_failed`` (error), ``root_poll_unsupported``, ``rotation_failed`` (failures, retry_in, error), ``output_failed``
(error), ``listener_error``, and the file kinds of ``files.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastca.agent.events import emit
from fastca.agent.caclient import CAClientError, CARequestFailed, InvalidCAResponse, validate_response
from fastca.agent.csr import KEY_TYPES, agent_csr, new_key, private_key_pem
from fastca.agent.files import DEFAULT_READ_TIMEOUT, FileSecrets, _Listeners, file_reader, write_output
from fastca.agent.rotation import Backoff, refresh_at
from fastca.agent.secrets import (FILE_CERT_PREFIX, FILE_ROOT_PREFIX, ROOT_CERT, WORKLOAD_CERT, SecretItem,
                                  SecretUnavailable)

__all__ = ["SecretManager", "CertificateSigner"]


class CertificateSigner(Protocol):
    """What the manager needs from a CA client (``CAClient`` is one)."""

    async def sign(self, csr_pem: bytes, ttl_seconds: int, *, impersonate: str | None = None) -> list[str]: ...


@dataclass(frozen=True)
class _Issued:
    workload: SecretItem
    root: SecretItem
    not_after: float
    received: float
    refresh_at: float
    elements: tuple[str, ...] = ()      # the response's leaf and intermediates, as received
    key: Any = None


def _root_item(root_bytes: bytes) -> SecretItem:
    return SecretItem(name=ROOT_CERT, version=hashlib.sha256(root_bytes).hexdigest()[:32], trusted_ca=root_bytes)


class SecretManager:
    def __init__(self, ca_client: CertificateSigner, *, spiffe_id: str, key_type: str = "rsa-2048",
                 ttl_seconds: int = 86400, rotation_ratio: float = 0.5, jitter: float = 0.01,
                 clock: Callable[[], float] = time.time, backoff_initial: float = 1.0, backoff_max: float = 60.0,
                 backoff_jitter: float = 0.1, output_dir: Path | str | None = None,
                 on_event: Callable[..., None] | None = None, impersonate: bool = False,
                 file_poll_interval: float = 0.5, file_read_timeout: float = DEFAULT_READ_TIMEOUT,
                 rng: random.Random | None = None, root_poll_interval: float = 0.0) -> None:
        if key_type not in KEY_TYPES:
            raise ValueError(f"unknown key type {key_type!r} (expected one of {', '.join(KEY_TYPES)})")
        self._client = ca_client
        self.spiffe_id = spiffe_id
        self.key_type = key_type
        self.ttl_seconds = ttl_seconds
        self.rotation_ratio = rotation_ratio
        self.jitter = jitter
        self._clock = clock
        self._rng = rng or random.Random()
        self._backoff = Backoff(backoff_initial, backoff_max, 2.0, backoff_jitter, rng=self._rng)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._on_event = on_event
        self._impersonate = impersonate
        self._listeners = _Listeners(on_event)
        self._files = FileSecrets(file_reader, notify=self._listeners.notify,
                                  poll_interval=file_poll_interval, on_event=on_event,
                                  read_timeout=file_read_timeout)
        self._issued: _Issued | None = None
        self._inflight: asyncio.Task[_Issued] | None = None
        self._wanted: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._rotation: asyncio.Task[None] | None = None
        self.root_poll_interval = root_poll_interval
        self._root_poll: asyncio.Task[None] | None = None
        self.rotation_failures = 0          # consecutive failed renewals (0 after a success)
        self.csr_count = 0                  # CSRs sent (each one a new key)

    # -- SecretSource ------------------------------------------------------------------------------------------
    async def get(self, name: str) -> SecretItem:
        if name.startswith((FILE_CERT_PREFIX, FILE_ROOT_PREFIX)):
            return await self._files.get(name)
        if name not in (WORKLOAD_CERT, ROOT_CERT):
            raise SecretUnavailable(f"unknown resource {name!r}")
        if name not in self._wanted:
            self._wanted.add(name)
            self._poke()
        issued = self._issued
        now = self._clock()
        if issued is None:
            issued = await self._fetch_shared()
        elif name == ROOT_CERT:
            pass
        elif now >= issued.not_after:
            try:
                issued = await self._fetch_shared()
            except SecretUnavailable as error:
                raise SecretUnavailable(f"the cached certificate expired and renewal failed: {error}") from None
        elif now >= issued.refresh_at and not self._rotating():
            try:
                issued = await self._fetch_shared()
            except SecretUnavailable:
                issued = self._issued or issued     # still valid: keep serving it
        return issued.root if name == ROOT_CERT else issued.workload

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        return self._listeners.subscribe(listener)

    def release(self, name: str) -> None:
        if name.startswith((FILE_CERT_PREFIX, FILE_ROOT_PREFIX)):
            self._files.release(name)
            return
        self._wanted.discard(name)
        self._poke()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._rotating():
            self._wake = asyncio.Event()
            self._rotation = asyncio.get_running_loop().create_task(self._rotate_loop(),
                                                                    name="fastca-agent-rotation")
        if self.root_poll_interval > 0 and hasattr(self._client, "trust_bundle") and self._root_poll is None:
            self._root_poll = asyncio.get_running_loop().create_task(self._root_poll_loop(),
                                                                     name="fastca-agent-root-poll")

    async def stop(self) -> None:
        tasks = [t for t in (self._rotation, self._inflight, self._root_poll) if t is not None and not t.done()]
        self._rotation = self._root_poll = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._files.stop()

    def file_health(self) -> dict[str, str]:
        """Per watched ``file-*`` resource, "" or why its files did not validate."""
        return self._files.health()

    @property
    def not_after(self) -> float | None:
        """Expiry (unix seconds) of the cached workload certificate."""
        return self._issued.not_after if self._issued else None

    @property
    def next_refresh(self) -> float | None:
        return self._issued.refresh_at if self._issued else None

    # -- internals ---------------------------------------------------------------------------------------------
    def _event(self, kind: str, name: str, **details: Any) -> None:
        emit(self._on_event, kind, name, **details)

    def _rotating(self) -> bool:
        return self._rotation is not None and not self._rotation.done()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _fetch_shared(self) -> _Issued:
        task = self._inflight
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch(), name="fastca-agent-csr")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())   # always retrieved
            self._inflight = task
        return await asyncio.shield(task)

    async def _fetch(self) -> _Issued:
        key = await asyncio.to_thread(new_key, self.key_type)
        csr = agent_csr(key, self.spiffe_id)
        self.csr_count += 1
        self._event("csr_sent", WORKLOAD_CERT, key_type=self.key_type)
        try:
            chain = await self._client.sign(csr, self.ttl_seconds,
                                            impersonate=self.spiffe_id if self._impersonate else None)
        except CAClientError as error:
            code = error.code.name if isinstance(error, CARequestFailed) and error.code else None
            self._event("fetch_failed", WORKLOAD_CERT, error=str(error), code=code)
            raise SecretUnavailable(f"the CA did not issue a certificate: {error}") from None
        except Exception as error:    # any client: no exception but SecretUnavailable leaves the manager
            self._event("fetch_failed", WORKLOAD_CERT, error=repr(error), code=None)
            raise SecretUnavailable(f"the CA did not issue a certificate: {error!r}") from None
        try:
            leaf, root_pem = validate_response(chain, key, self.spiffe_id, now=self._clock())
        except InvalidCAResponse as error:
            self._event("response_invalid", WORKLOAD_CERT, error=str(error))
            raise SecretUnavailable(f"the CA's response was discarded: {error}") from None

        received = self._clock()
        not_after = leaf.not_valid_after_utc.timestamp()
        key_pem = private_key_pem(key)
        chain_pem = "".join(chain[:-1]).encode()
        root_bytes = root_pem.encode()
        issued = _Issued(
            workload=SecretItem(name=WORKLOAD_CERT, version=format(leaf.serial_number, "x"),
                                certificate_chain=chain_pem, private_key=key_pem),
            root=_root_item(root_bytes), not_after=not_after, received=received,
            refresh_at=refresh_at(received, not_after, self.rotation_ratio, self.jitter, self._rng),
            elements=tuple(chain[:-1]), key=key)
        if self.output_dir is not None:
            try:
                await asyncio.to_thread(write_output, self.output_dir, key_pem, chain_pem, root_bytes)
            except OSError as error:
                self._event("output_failed", WORKLOAD_CERT, error=str(error))

        previous, self._issued = self._issued, issued
        root_changed = previous is not None and previous.root.trusted_ca != issued.root.trusted_ca
        self._event("issued", WORKLOAD_CERT, serial=issued.workload.version, not_after=not_after,
                    refresh_at=issued.refresh_at, root_changed=root_changed)
        self._poke()
        if previous is not None:
            self._listeners.notify(WORKLOAD_CERT)
            if root_changed:
                self._listeners.notify(ROOT_CERT)
        return issued

    async def _root_poll_loop(self) -> None:
        """Ask for the root bundle alone every ``root_poll_interval`` while
        ROOTCA is wanted; push it when it changed and still verifies the leaf."""
        while True:
            await asyncio.sleep(self.root_poll_interval)
            issued = self._issued
            if issued is None or ROOT_CERT not in self._wanted:
                continue
            try:
                bundle = await self._client.trust_bundle()      # type: ignore[attr-defined]
            except asyncio.CancelledError:
                raise
            except CARequestFailed as error:
                if error.code is not None and error.code.name == "UNIMPLEMENTED":
                    self._event("root_poll_unsupported", ROOT_CERT)
                    return
                self._event("root_poll_failed", ROOT_CERT, error=str(error))
                continue
            except Exception as error:          # the loop must survive any client
                self._event("root_poll_failed", ROOT_CERT, error=repr(error))
                continue
            await self._adopt_root(issued, bundle)

    async def _adopt_root(self, issued: _Issued, bundle: str) -> None:
        root_bytes = bundle.encode()
        if root_bytes == issued.root.trusted_ca or self._issued is not issued:
            return                              # unchanged, or a renewal brought a newer answer meanwhile
        try:
            validate_response([*issued.elements, bundle], issued.key, self.spiffe_id, now=self._clock())
        except InvalidCAResponse as error:
            self._event("root_poll_failed", ROOT_CERT, error=f"the CA's bundle was discarded: {error}")
            return
        updated = dataclasses.replace(issued, root=_root_item(root_bytes))
        if self.output_dir is not None:
            try:
                await asyncio.to_thread(write_output, self.output_dir, issued.workload.private_key,
                                        issued.workload.certificate_chain, root_bytes)
            except OSError as error:
                self._event("output_failed", ROOT_CERT, error=str(error))
        if self._issued is not issued:
            return
        self._issued = updated
        self._event("root_updated", ROOT_CERT, version=updated.root.version)
        self._listeners.notify(ROOT_CERT)

    async def _rotate_loop(self) -> None:
        assert self._wake is not None
        failed_for: _Issued | None = None   # the certificate whose renewal last failed
        retry_at = 0.0
        while True:
            self._wake.clear()
            issued = self._issued
            if issued is None or not self._wanted & {WORKLOAD_CERT, ROOT_CERT}:
                await self._wake.wait()
                continue
            if failed_for is not issued:
                failed_for = None
                self._backoff.reset()
            due = retry_at if failed_for is not None else issued.refresh_at
            delay = due - self._clock()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                except TimeoutError:
                    pass
                continue
            try:
                await self._fetch_shared()
                self.rotation_failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:          # SecretUnavailable, or a bug: the loop must survive
                self.rotation_failures += 1
                pause = self._backoff.next()
                failed_for, retry_at = issued, self._clock() + pause
                self._event("rotation_failed", WORKLOAD_CERT, failures=self.rotation_failures, retry_in=pause,
                            error=str(error), expired=self._clock() >= issued.not_after)
