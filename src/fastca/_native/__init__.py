"""fastca's private native core: what the Authority uses. The typed surface
is __init__.pyi; entry points only tests and fuzz targets use are in
``fastca._native.testing``."""

from .csr import CsrInfo
from .errors import (
    E_CSR_ALGORITHM,
    E_CSR_ENCODING,
    E_CSR_KEY,
    E_CSR_MALFORMED,
    E_CSR_SIGNATURE,
    E_IDENTITY,
    E_INTERNAL,
    E_SIGNATURE,
    NativeError,
)
from .leafcheck import check_issued_batch
from .pem import pem_encode
from .tbs import IssuerProfile, LeafSpec, PreparedLeaf, assemble_batch, prepare_batch

__all__ = [
    "E_CSR_ALGORITHM",
    "E_CSR_ENCODING",
    "E_CSR_KEY",
    "E_CSR_MALFORMED",
    "E_CSR_SIGNATURE",
    "E_IDENTITY",
    "E_INTERNAL",
    "E_SIGNATURE",
    "CsrInfo",
    "IssuerProfile",
    "LeafSpec",
    "NativeError",
    "PreparedLeaf",
    "assemble_batch",
    "check_issued_batch",
    "pem_encode",
    "prepare_batch",
]
