"""`fastca inspect`: a person's view of a certificate or CSR.

Uses cryptography's parser (not fastca's own): an inspection tool should be
a second opinion on what fastca wrote.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from rich.console import Console
from rich.table import Table

from fastca.errors import ConfigurationError

__all__ = ["describe", "render"]


def _key(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size} (e={public_key.public_numbers().e})"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public_key).__name__


def _sans(extensions: x509.Extensions) -> list[str]:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for name in san:
        kind = {x509.UniformResourceIdentifier: "URI", x509.DNSName: "DNS", x509.IPAddress: "IP",
                x509.RFC822Name: "email"}.get(type(name), type(name).__name__)
        out.append(f"{kind}:{name.value}")
    return out


def _extensions(extensions: x509.Extensions) -> list[dict[str, Any]]:
    return [{"oid": e.oid.dotted_string, "name": getattr(e.oid, "_name", e.oid.dotted_string),
             "critical": e.critical, "value": _extension_text(e.value)} for e in extensions]


def _extension_text(value: Any) -> str:
    if isinstance(value, x509.KeyUsage):
        names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign"]
        return ", ".join(n for n in names if getattr(value, n))
    if isinstance(value, x509.ExtendedKeyUsage):
        return ", ".join(getattr(u, "_name", u.dotted_string) for u in value)
    if isinstance(value, x509.BasicConstraints):
        return f"CA:{str(value.ca).upper()}" + (f", pathlen:{value.path_length}" if value.path_length is not None else "")
    if isinstance(value, (x509.SubjectKeyIdentifier,)):
        return value.digest.hex(":")
    if isinstance(value, x509.AuthorityKeyIdentifier):
        return (value.key_identifier or b"").hex(":")
    if isinstance(value, x509.SubjectAlternativeName):
        return ", ".join(str(n.value) for n in value)
    return repr(value)


def _describe_certificate(cert: x509.Certificate) -> dict[str, Any]:
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "kind": "certificate",
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key": _key(cert.public_key()),
        "signature_algorithm": getattr(cert.signature_algorithm_oid, "_name", cert.signature_algorithm_oid.dotted_string),
        "sans": _sans(cert.extensions),
        "extensions": _extensions(cert.extensions),
        "sha256": hashlib.sha256(der).hexdigest(),
        "sha1": hashlib.sha1(der).hexdigest(),
    }


def _describe_csr(csr: x509.CertificateSigningRequest) -> dict[str, Any]:
    der = csr.public_bytes(serialization.Encoding.DER)
    return {
        "kind": "csr",
        "subject": csr.subject.rfc4514_string(),
        "key": _key(csr.public_key()),
        "signature_algorithm": getattr(csr.signature_algorithm_oid, "_name", csr.signature_algorithm_oid.dotted_string),
        "signature_valid": csr.is_signature_valid,
        "sans": _sans(csr.extensions),
        "extensions": _extensions(csr.extensions),
        "sha256": hashlib.sha256(der).hexdigest(),
    }


def describe(data: bytes) -> list[dict[str, Any]]:
    """Every certificate in the file, or the CSR."""
    if b"CERTIFICATE REQUEST" in data:
        return [_describe_csr(x509.load_pem_x509_csr(data))]
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return [_describe_certificate(c) for c in x509.load_pem_x509_certificates(data)]
        except ValueError:
            raise ConfigurationError("the file holds a PEM block that is not a readable certificate") from None
    for loader, describer in ((x509.load_der_x509_certificate, _describe_certificate),
                              (x509.load_der_x509_csr, _describe_csr)):
        try:
            return [describer(loader(data))]
        except ValueError:
            continue
    raise ConfigurationError("not a certificate or CSR (PEM or DER)")


def render(described: list[dict[str, Any]], console: Console) -> None:
    for item in described:
        table = Table(title=item["kind"], show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key in ("subject", "issuer", "serial", "not_before", "not_after", "key", "signature_algorithm",
                    "signature_valid"):
            if key in item:
                table.add_row(key.replace("_", " "), str(item[key]) or "(empty)")
        table.add_row("SANs", "\n".join(item["sans"]) or "(none)")
        for ext in item["extensions"]:
            table.add_row(f"ext {ext['name']}" + (" (critical)" if ext["critical"] else ""), ext["value"])
        for key in ("sha256", "sha1"):
            if key in item:
                table.add_row(f"{key} fingerprint", item[key])
        console.print(table)
