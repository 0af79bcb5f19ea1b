"""fastca's private native core; the typed surface is __init__.pyi."""

from .asn1 import MAX_DER_DEPTH, walk_der
from .csr import MAX_CSR_BYTES, CsrInfo, load_csr_der, parse_csr, verify_csr
from .der import DerWriter
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
from .pem import pem_encode
from .san import validate_dns_name, validate_ip, validate_spiffe_id
from .tbs import (
    IssuerProfile,
    LeafSpec,
    PreparedLeaf,
    assemble_batch,
    ecdsa_raw_to_der,
    prepare_batch,
)

__all__ = [
    "E_CSR_ALGORITHM",
    "E_CSR_ENCODING",
    "E_CSR_KEY",
    "E_CSR_MALFORMED",
    "E_CSR_SIGNATURE",
    "E_IDENTITY",
    "E_INTERNAL",
    "E_SIGNATURE",
    "MAX_CSR_BYTES",
    "MAX_DER_DEPTH",
    "CsrInfo",
    "DerWriter",
    "IssuerProfile",
    "LeafSpec",
    "NativeError",
    "PreparedLeaf",
    "assemble_batch",
    "ecdsa_raw_to_der",
    "load_csr_der",
    "parse_csr",
    "pem_encode",
    "prepare_batch",
    "validate_dns_name",
    "validate_ip",
    "validate_spiffe_id",
    "verify_csr",
    "walk_der",
]
