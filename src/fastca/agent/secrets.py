"""What the SDS server serves and the secret manager produces: the contract
between the two halves of the agent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol
from collections.abc import Callable

__all__ = ["WORKLOAD_CERT", "ROOT_CERT", "FILE_CERT_PREFIX", "FILE_ROOT_PREFIX", "SecretItem", "SecretSource",
           "SecretUnavailable"]

WORKLOAD_CERT = "default"            # Secret.tls_certificate: chain + private key
ROOT_CERT = "ROOTCA"                 # Secret.validation_context.trusted_ca
FILE_CERT_PREFIX = "file-cert:"      # file-cert:<cert path>~<key path>
FILE_ROOT_PREFIX = "file-root:"      # file-root:<path>


class SecretUnavailable(Exception):
    """The named secret cannot be produced now (CA down with nothing cached,
    unreadable or mismatched files, unknown resource name). The message is
    for logs and for SDS error details; it never holds key material."""


@dataclass(frozen=True)
class SecretItem:
    name: str
    version: str                     # changes whenever the content changes (e.g. leaf serial / file digest)
    certificate_chain: bytes = b""   # PEM, leaf first (tls certificates)
    private_key: bytes = field(default=b"", repr=False)   # PEM (tls certificates)
    trusted_ca: bytes = b""          # PEM bundle (roots)

    @property
    def is_root(self) -> bool:
        return bool(self.trusted_ca) and not self.certificate_chain


class SecretSource(Protocol):
    async def get(self, name: str) -> SecretItem:
        """The current secret, produced if needed (one CSR per resource even
        under concurrent calls). Raises SecretUnavailable."""

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """``listener(name)`` is called (on the event loop) whenever the
        secret ``name`` changes (rotation, root change, file change).
        Returns the function that unsubscribes."""

    def release(self, name: str) -> None:
        """No stream needs ``name`` any more (it may stop rotating it)."""
