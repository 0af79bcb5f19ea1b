"""Typed surface of the native core's test-only entry points (and, through
the re-export, the product surface of __init__.pyi)."""

from typing import Final

from . import *  # noqa: F403
from . import CsrInfo

MAX_CSR_BYTES: Final[int]       # default input cap (65536)
MAX_DER_DEPTH: Final[int]       # nesting depth cap (32)

def load_csr_der(data: bytes, max_size: int = ...) -> bytes:
    """PEM (exactly one CERTIFICATE REQUEST block, nothing else but
    whitespace) or DER in; strict DER of one CertificationRequest out.
    Raises NativeError(E_CSR_ENCODING | E_CSR_MALFORMED)."""

def parse_csr(data: bytes, max_size: int = ...) -> CsrInfo:
    """Strict parse + key classification (RSA 2048..8192 with e=65537, EC
    P-256/P-384 by named-curve OID only; explicit parameters rejected).
    Does not verify the signature. Raises NativeError."""

def verify_csr(data: bytes, max_size: int = ...) -> CsrInfo:
    """parse_csr + proof of possession (the CSR self-signature verified with
    its own key via libcrypto; point-on-curve checked). Raises NativeError."""

def validate_spiffe_id(uri: str | bytes) -> None: ...
def validate_dns_name(name: str | bytes, allow_wildcard: bool = False) -> None: ...
def validate_ip(address: bytes) -> None: ...

def ecdsa_raw_to_der(raw: bytes) -> bytes: ...
class DerWriter:
    """The growable buffer with back-patched lengths, exposed for tests
    and the fuzz targets."""
    def __init__(self, initial_capacity: int = 256) -> None: ...
    def begin(self, tag: int) -> None: ...          # open a constructed element
    def end(self) -> None: ...                      # close it, back-patching its length
    def primitive(self, tag: int, content: bytes) -> None: ...
    def raw(self, encoded: bytes) -> None: ...      # pre-encoded TLV bytes
    def integer(self, value: bytes) -> None: ...    # unsigned big-endian magnitude -> minimal DER INTEGER
    def oid(self, dotted: str) -> None: ...
    def utc_or_generalized_time(self, unix_seconds: int) -> None: ...
    def getvalue(self) -> bytes: ...
    def __len__(self) -> int: ...

def walk_der(data: bytes) -> list[tuple[int, int, bytes | None]]:
    """The strict DER reader's view of one element: every TLV in pre-order as
    (depth, tag, content), content None for constructed elements. Raises
    NativeError(E_CSR_MALFORMED) on anything that is not strict DER
    (indefinite or non-minimal lengths, lengths past the data or >= 4 GiB,
    nesting deeper than MAX_DER_DEPTH, trailing data, non-DER BOOLEAN /
    INTEGER / NULL / BIT STRING / OID encodings). For tests and fuzzing."""
