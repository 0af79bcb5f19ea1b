"""The native core's entry points for tests and fuzz targets only: the
strict DER reader and writer exposed on their own, the CSR parser without
issuance, the identity validators, the ECDSA signature converter. The
product goes through ``fastca._native`` (the Authority's surface), which
this module re-exports so that a test imports from one place."""

from . import *  # noqa: F403 - the product surface, re-exported
from . import __all__ as _product
from .asn1 import MAX_DER_DEPTH, walk_der
from .csr import MAX_CSR_BYTES, load_csr_der, parse_csr, verify_csr
from .der import DerWriter
from .san import validate_dns_name, validate_ip, validate_spiffe_id
from .tbs import ecdsa_raw_to_der

__all__ = [*_product, "MAX_CSR_BYTES", "MAX_DER_DEPTH", "DerWriter", "ecdsa_raw_to_der", "load_csr_der",
           "parse_csr", "validate_dns_name", "validate_ip", "validate_spiffe_id", "verify_csr", "walk_der"]
