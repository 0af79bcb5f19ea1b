"""Typed surface of fastca's private native core.

Nothing but ``fastca.authority`` imports this package (tests excepted);
entry points for tests and fuzz targets only are typed in testing.pyi.
Every function that works on many items returns, per item, either its result
or a ``NativeError`` instance, so one bad request never fails its batch-mates.
"""

from typing import Final, Sequence

# Error codes carried by NativeError.code. They are stable strings: the
# issuer maps them onto the public exception tree (fastca.errors).
E_CSR_ENCODING: Final[str]      # "csr.encoding": PEM/DER framing, size cap, trailing data
E_CSR_MALFORMED: Final[str]     # "csr.malformed": not a well-formed strict-DER CSR
E_CSR_ALGORITHM: Final[str]     # "csr.algorithm": signature algorithm not allowed
E_CSR_KEY: Final[str]           # "csr.key": key type/size/exponent/curve not allowed
E_CSR_SIGNATURE: Final[str]     # "csr.signature": proof of possession failed
E_IDENTITY: Final[str]          # "identity": SPIFFE ID / DNS / IP SAN invalid
E_SIGNATURE: Final[str]         # "signature": CA signature did not verify (faulty signer)
E_INTERNAL: Final[str]          # "internal": anything else


class NativeError(ValueError):
    code: str
    def __init__(self, code: str, message: str) -> None: ...

class CsrInfo:
    """What a CSR says about itself. Nothing in it is trusted for issuance
    except ``spki``, and only after ``verify_csr``."""
    der: bytes                      # the whole CertificationRequest DER
    info: bytes                     # CertificationRequestInfo DER (what was signed)
    subject: bytes                  # subject Name DER (never copied into a certificate)
    spki: bytes                     # SubjectPublicKeyInfo DER
    key_type: str                   # "rsa" | "ec"
    key_bits: int                   # RSA modulus bits, or 256/384 for EC
    curve: str | None               # "secp256r1" | "secp384r1" | None
    rsa_exponent: int | None
    signature_algorithm: str        # "sha256WithRSAEncryption", "ecdsa-with-SHA256", ...
    signature: bytes                # signature BIT STRING contents (no unused-bits octet)
    uris: list[str]                 # requested SANs (extensionRequest), informational only
    dns_names: list[str]
    ip_addresses: list[bytes]
    emails: list[str]
    requested_extensions: list[str] # dotted OIDs of every requested extension

class IssuerProfile:
    """Everything about the signing CA that is the same for every leaf,
    pre-encoded once."""
    def __init__(
        self,
        issuer_name: bytes,               # DER Name: the CA certificate's subject, byte for byte
        authority_key_id: bytes,          # the CA's SKI value (the OCTET STRING contents)
        signature_algorithm: bytes,       # DER AlgorithmIdentifier, used in TBS and outer cert
        ca_public_key: bytes,             # CA SubjectPublicKeyInfo DER, for post-sign verification
        *,
        istio_key_usage: bool = False,    # True: digitalSignature+keyEncipherment for every key type
    ) -> None: ...
    @property
    def signature_algorithm(self) -> bytes: ...
    @property
    def hash_name(self) -> str: ...       # "sha256" | "sha384" | "sha512", the hash the CA signs with

class LeafSpec:
    """One leaf to build. Fields are validated by prepare_batch."""
    def __init__(
        self,
        csr: bytes,                      # PEM or DER
        spiffe_id: str,                  # the authorised identity: the one URI SAN
        serial: bytes,                   # 16 random bytes; made positive with a fixed length
        not_before: int,                 # unix seconds
        not_after: int,                  # unix seconds, > not_before
        dns_names: Sequence[str] = (),   # extra DNS SANs, only where policy allows
        ip_addresses: Sequence[bytes] = (),  # IP SANs, 4 or 16 octets (the server's own certificate)
    ) -> None: ...

class PreparedLeaf:
    tbs: bytes                           # TBSCertificate DER, ready to sign
    csr: CsrInfo                         # the verified CSR

def prepare_batch(profile: IssuerProfile, specs: Sequence[LeafSpec]) -> list[PreparedLeaf | NativeError]:
    """Per spec: verify_csr + identity validation + TBS assembly. The heavy
    parts run without the GIL."""

def assemble_batch(
    profile: IssuerProfile,
    tbs: Sequence[bytes],
    signatures: Sequence[bytes],
    ecdsa_raw: bool,
) -> list[bytes | NativeError]:
    """Per item: signature (raw r||s converted to DER when ecdsa_raw) checked
    with the CA public key over the TBS, then Certificate DER built.
    A signature that does not verify yields NativeError(E_SIGNATURE)."""

def check_issued_batch(
    profile: IssuerProfile,
    certificates: Sequence[bytes],
    specs: Sequence[LeafSpec],
    csrs: Sequence[CsrInfo],
) -> list[NativeError | None]:
    """The post-issuance profile check: per certificate, None if the strict
    DER reader finds exactly what its spec asked for (the verified CSR's key,
    the authorised names, the drawn serial and window) under the profile,
    else NativeError(E_INTERNAL). Runs without the GIL."""

def pem_encode(der: bytes, label: str = "CERTIFICATE") -> str: ...
