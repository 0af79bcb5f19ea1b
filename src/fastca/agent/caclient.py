"""The agent's side of ``IstioCertificateService/CreateCertificate``
(docs/istio-contract.md): what pilot-agent sends, its retry rule, and the
checks made on a response before anything is cached or pushed to Envoy
(docs/reliability.md, case 31).

Errors: ``CAClientError`` is the base; ``CARequestFailed`` carries the final
gRPC status of a call (after retries); ``InvalidCAResponse`` means the CA
answered but the answer was discarded."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import struct_pb2

from fastca.agent.events import emit
from fastca.chain.verify import ChainInvalid, verify_chain
from fastca.keys import spki_der
from fastca.proto import istio_ca_pb2, istio_ca_pb2_grpc, trust_pb2, trust_pb2_grpc

__all__ = ["CAClient", "CAClientError", "CARequestFailed", "InvalidCAResponse", "RETRYABLE_CODES",
           "validate_response", "EventCallback"]

EventCallback = Callable[..., None]        # on_event(kind, name, **details)

# Istio's agent retries exactly these (go-grpc-middleware retry, 5 calls,
# exponential backoff from 100 ms with 10% jitter).
RETRYABLE_CODES = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE})
_PEM_CERT_BEGIN = "-----BEGIN CERTIFICATE-----"

Material = bytes | Path | str         # PEM bytes, or a file read on every call


class CAClientError(Exception):
    """A certificate could not be obtained from the CA."""


class CARequestFailed(CAClientError):
    def __init__(self, message: str, *, code: grpc.StatusCode | None, attempts: int) -> None:
        super().__init__(message)
        self.code = code
        self.attempts = attempts


class InvalidCAResponse(CAClientError):
    """The CA's answer failed a check; it must not be used."""


def _read(material: Material) -> bytes:
    if isinstance(material, bytes):
        return material
    return Path(material).read_bytes()


class CAClient:
    """One long-lived gRPC channel to the CA.

    ``root_pem`` None, or an address ending in ``:15010``, means plaintext.
    ``token_file`` is re-read on every call (a missing or empty file sends no
    ``authorization`` header). ``client_cert`` = (certificate, key), each PEM
    bytes or a path re-read on every call; a change rebuilds the channel so a
    rotated VM certificate is used. ``timeout`` None: no deadline, as Istio.
    """

    def __init__(self, address: str, *, root_pem: bytes | None = None, token_file: Path | str | None = None,
                 cluster_id: str = "", cert_signer: str = "", extra_headers: Mapping[str, str] | None = None,
                 client_cert: tuple[Material, Material] | None = None, server_name: str | None = None,
                 timeout: float | None = None, max_attempts: int = 5, initial_backoff: float = 0.1,
                 backoff_jitter: float = 0.1, on_event: EventCallback | None = None,
                 rng: random.Random | None = None) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.address = address
        self.plaintext = root_pem is None or address.endswith(":15010")
        self._root_pem = root_pem
        self._token_file = Path(token_file) if token_file is not None else None
        self.cluster_id = cluster_id
        self.cert_signer = cert_signer
        self._extra_headers = tuple((name.lower(), value) for name, value in (extra_headers or {}).items())
        self._client_cert = client_cert
        self._server_name = server_name
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.backoff_jitter = backoff_jitter
        self._on_event = on_event
        self._rng = rng or random.Random()
        self._channel: grpc.aio.Channel | None = None
        self._stub: istio_ca_pb2_grpc.IstioCertificateServiceStub | None = None
        self._channel_identity: tuple[bytes, bytes] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- channel -----------------------------------------------------------------------------------------------
    def _options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", 30_000),            # pilot-agent pings every 30 s during a call
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 10_000),
        ]
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        return options

    def _stub_for_call(self) -> istio_ca_pb2_grpc.IstioCertificateServiceStub:
        if self._closed:
            raise CAClientError("the CA client is closed")
        identity = None
        if self._client_cert is not None and not self.plaintext:
            try:
                identity = (_read(self._client_cert[0]), _read(self._client_cert[1]))
            except OSError as error:
                raise CARequestFailed(f"cannot read the client certificate: {error.strerror or error}",
                                      code=None, attempts=0) from None
        if self._stub is not None and identity == self._channel_identity:
            return self._stub
        self._drop_channel()
        if self.plaintext:
            channel = grpc.aio.insecure_channel(self.address, options=self._options())
        else:
            credentials = grpc.ssl_channel_credentials(
                self._root_pem, identity[1] if identity else None, identity[0] if identity else None)
            channel = grpc.aio.secure_channel(self.address, credentials, options=self._options())
        self._channel, self._channel_identity = channel, identity
        self._stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)
        return self._stub

    def _drop_channel(self) -> None:
        """Forget the channel; calls still on it finish (up to 30 s)."""
        channel, self._channel, self._stub, self._channel_identity = self._channel, None, None, None
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close(grace=30.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- the call ----------------------------------------------------------------------------------------------
    def _headers(self) -> list[tuple[str, str]]:
        headers = [("clusterid", self.cluster_id), *self._extra_headers]
        if self._token_file is not None:
            try:
                token = self._token_file.read_text().strip()
            except (OSError, UnicodeDecodeError):
                token = ""
            if token:
                headers.append(("authorization", f"Bearer {token}"))
        return headers

    def _request(self, csr_pem: bytes | str, ttl_seconds: int,
                 impersonate: str | None) -> istio_ca_pb2.IstioCertificateRequest:
        metadata = struct_pb2.Struct()
        metadata.update({"CertSigner": self.cert_signer})
        if impersonate is not None:
            metadata.update({"ImpersonatedIdentity": impersonate})
        return istio_ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode() if isinstance(csr_pem, bytes) else csr_pem,
            validity_duration=int(ttl_seconds), metadata=metadata)

    def _event(self, kind: str, **details: Any) -> None:
        emit(self._on_event, kind, "csr", **details)

    async def sign(self, csr_pem: bytes | str, ttl_seconds: int, *, impersonate: str | None = None) -> list[str]:
        """The CA's ``cert_chain`` for this CSR (unchecked: see
        ``validate_response``). Raises ``CARequestFailed``."""
        request = self._request(csr_pem, ttl_seconds, impersonate)
        attempt = 0
        while True:
            attempt += 1
            stub = self._stub_for_call()
            started = time.monotonic()
            try:
                response = await stub.CreateCertificate(request, metadata=self._headers(), timeout=self.timeout)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                self._event("ca_call", code=code.name, attempt=attempt, seconds=time.monotonic() - started)
                if code == grpc.StatusCode.UNAVAILABLE:
                    # A broken connection: the next attempt dials afresh rather
                    # than wait out the channel's own reconnect backoff.
                    self._drop_channel()
                if code not in RETRYABLE_CODES or attempt >= self.max_attempts:
                    raise CARequestFailed(f"CreateCertificate failed: {code.name}: {error.details()}",
                                          code=code, attempts=attempt) from None
                delay = self.initial_backoff * 2 ** (attempt - 1)
                delay *= self._rng.uniform(1 - self.backoff_jitter, 1 + self.backoff_jitter)
                self._event("ca_retry", code=code.name, attempt=attempt, delay=delay)
                await asyncio.sleep(delay)
                continue
            self._event("ca_call", code="OK", attempt=attempt, seconds=time.monotonic() - started)
            return list(response.cert_chain)

    async def trust_bundle(self) -> str:
        """The CA's root bundle now (fastca's ``TrustBundleService``), the
        last element a CreateCertificate would return. One attempt (the
        caller polls); raises ``CARequestFailed`` (``UNIMPLEMENTED`` from a
        CA that is not fastca)."""
        self._stub_for_call()
        stub = trust_pb2_grpc.TrustBundleServiceStub(self._channel)
        request = trust_pb2.TrustBundleRequest(cert_signer=self.cert_signer)
        try:
            # No token: the bundle is public, and a credential is never sent where none is asked for.
            response = await stub.GetTrustBundle(request, timeout=self.timeout or 30.0)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                self._drop_channel()
            raise CARequestFailed(f"GetTrustBundle failed: {code.name}: {error.details()}", code=code,
                                  attempts=1) from None
        return response.root_cert

    async def close(self) -> None:
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def __aenter__(self) -> CAClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- response checks (docs/reliability.md, case 31) ----------------------------------------------------------
def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def validate_response(chain: Sequence[str], key: Any, expected_spiffe_id: str, *,
                      now: float | None = None) -> tuple[x509.Certificate, str]:
    """Check a ``cert_chain`` before use: at least two elements, each ending
    with a newline, each middle element exactly one certificate; the leaf
    holds ``key``'s public key and exactly one URI SAN equal to
    ``expected_spiffe_id``; leaf → middles → a root of the last element
    verifies (signatures, names, CA flags, validity at ``now``).
    Returns (leaf, root bundle PEM); raises ``InvalidCAResponse``."""
    try:
        return _validate(list(chain), key, expected_spiffe_id, now)
    except InvalidCAResponse:
        raise
    except Exception as error:      # a malformed certificate pyca parses lazily
        raise InvalidCAResponse(f"the CA's chain could not be checked: {error!r}") from None


def _validate(chain: list[str], key: Any, expected_spiffe_id: str,
              now: float | None) -> tuple[x509.Certificate, str]:
    if len(chain) < 2:
        raise InvalidCAResponse(f"the CA returned {len(chain)} certificate element(s); at least 2 are required")
    for index, element in enumerate(chain):
        if not element.endswith("\n"):
            raise InvalidCAResponse(f"element {index} of the CA's chain does not end with a newline")
    parsed: list[list[x509.Certificate]] = []
    for index, element in enumerate(chain):
        try:
            certs = x509.load_pem_x509_certificates(element.encode())
        except ValueError as error:
            raise InvalidCAResponse(f"element {index} of the CA's chain is not PEM certificates: {error}") from None
        if index < len(chain) - 1 and (len(certs) != 1 or element.count(_PEM_CERT_BEGIN) != 1):
            raise InvalidCAResponse(f"element {index} of the CA's chain must hold exactly one certificate")
        parsed.append(certs)
    leaf = parsed[0][0]
    middles = [certs[0] for certs in parsed[1:-1]]
    roots = parsed[-1]
    when = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)

    if spki_der(leaf) != spki_der(key):
        raise InvalidCAResponse("the leaf's public key is not the key the CSR was made with")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except ValueError as error:
        raise InvalidCAResponse(f"the leaf's SAN extension does not parse: {error}") from None
    if uris != [expected_spiffe_id]:
        raise InvalidCAResponse(f"the leaf's URI SANs {uris} are not exactly [{expected_spiffe_id!r}]")
    if _is_ca(leaf):
        raise InvalidCAResponse("the leaf is a CA certificate")
    if not _valid_at(leaf, when):
        raise InvalidCAResponse(f"the leaf is not valid now (valid {leaf.not_valid_before_utc.isoformat()} "
                                f"to {leaf.not_valid_after_utc.isoformat()})")

    try:
        path = verify_chain(leaf, middles, roots, at=when)
    except ChainInvalid as error:
        raise InvalidCAResponse(f"the chain does not verify to a root in the CA's root bundle: {error}") from None
    # Istio's layout: the middle elements are the path itself, leaf-side first.
    for depth, middle in enumerate(middles, start=1):
        if depth >= len(path) or path[depth] != middle:
            raise InvalidCAResponse(f"chain element {depth} did not issue element {depth - 1} (the middle "
                                    "elements must be the path from the leaf to the root, in order)")
    return leaf, chain[-1]
