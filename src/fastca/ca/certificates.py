"""CA certificates and CSRs signed by a Signer (whose key may sit in an HSM).

cryptography's builders need the private key in memory, so the CA's own
certificates are assembled with asn1crypto (already a python-pkcs11
dependency) and signed through the Signer protocol. This is lifecycle code:
it runs once per CA, never per workload certificate.
"""

from __future__ import annotations

import datetime as dt
import os

from asn1crypto import algos, keys
from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from fastca.errors import SigningFailed
from fastca.keys import spki_der
from fastca.signing.base import Signer

__all__ = ["self_signed_root", "ca_csr", "DEFAULT_ROOT_LIFETIME"]

DEFAULT_ROOT_LIFETIME = dt.timedelta(days=3650)
_BACKDATE = dt.timedelta(minutes=2)


def _signature_value(signer: Signer, data: bytes) -> bytes:
    signature = signer.sign(data)
    if signer.ecdsa_raw:
        half = len(signature) // 2
        signature = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                         int.from_bytes(signature[half:], "big"))
    return signature


def _ca_name(trust_domain: str, common_name: str | None) -> asn1_x509.Name:
    attributes = {"organization_name": trust_domain}
    if common_name:
        attributes["common_name"] = common_name
    return asn1_x509.Name.build(attributes, use_printable=True)


def _ca_extensions(signer: Signer) -> list[dict]:
    ski = x509.SubjectKeyIdentifier.from_public_key(signer.public_key).digest
    return [
        {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": True}},
        {"extn_id": "key_usage", "critical": True,
         "extn_value": {"digital_signature", "key_cert_sign", "crl_sign"}},
        {"extn_id": "key_identifier", "critical": False, "extn_value": ski},
    ]


def self_signed_root(signer: Signer, trust_domain: str, *, now: dt.datetime,
                     lifetime: dt.timedelta = DEFAULT_ROOT_LIFETIME,
                     common_name: str | None = None) -> x509.Certificate:
    """A root per docs/cert-profile.md: subject O=<trust domain>, CA:TRUE and
    keyCertSign/cRLSign critical, SKI; signed by the signer and checked."""
    name = _ca_name(trust_domain, common_name)
    algorithm = algos.SignedDigestAlgorithm.load(signer.algorithm_identifier)
    tbs = asn1_x509.TbsCertificate({
        "version": "v3",
        "serial_number": int.from_bytes(os.urandom(16), "big") >> 1 | (1 << 126),
        "signature": algorithm,
        "issuer": name,
        "validity": {"not_before": _time(now - _BACKDATE), "not_after": _time(now + lifetime)},
        "subject": name,
        "subject_public_key_info": keys.PublicKeyInfo.load(spki_der(signer.public_key)),
        "extensions": _ca_extensions(signer),
    })
    tbs_der = tbs.dump()
    cert_der = asn1_x509.Certificate({
        "tbs_certificate": tbs,
        "signature_algorithm": algorithm,
        "signature_value": _signature_value(signer, tbs_der),
    }).dump()
    certificate = x509.load_der_x509_certificate(cert_der)
    try:
        certificate.verify_directly_issued_by(certificate)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise SigningFailed("the new root certificate's signature does not verify") from exc
    return certificate


def _time(moment: dt.datetime) -> asn1_x509.Time:
    # RFC 5280: UTCTime through 2049, GeneralizedTime from 2050.
    if moment.year < 2050:
        return asn1_x509.Time({"utc_time": moment})
    return asn1_x509.Time({"general_time": moment})


def ca_csr(signer: Signer, trust_domain: str, common_name: str | None = None) -> x509.CertificateSigningRequest:
    """A CSR for an intermediate CA whose key is the signer's, for an
    upstream root to sign."""
    algorithm = algos.SignedDigestAlgorithm.load(signer.algorithm_identifier)
    extensions = asn1_x509.Extensions(_ca_extensions(signer))
    info = asn1_csr.CertificationRequestInfo({
        "version": "v1",
        "subject": _ca_name(trust_domain, common_name),
        "subject_pk_info": keys.PublicKeyInfo.load(spki_der(signer.public_key)),
        "attributes": [{"type": "extension_request", "values": [extensions]}],
    })
    request = asn1_csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": algorithm,
        "signature": _signature_value(signer, info.dump()),
    })
    loaded = x509.load_der_x509_csr(request.dump())
    if not loaded.is_signature_valid:
        raise SigningFailed("the CA CSR's signature does not verify")
    return loaded

