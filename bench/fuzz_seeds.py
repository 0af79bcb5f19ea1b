"""Seed corpora of the parser fuzz targets (bench/fuzz.py --seed-corpus),
made from tests/vectors (agent CSRs, Istio certificates) and generated
inputs. Each file is small: the corpora are kept in the repository."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import Callable

__all__ = ["SEEDERS"]

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "vectors"
AGENT = ("ec256-0000", "ec384-0000", "rsa2048-0000")


def _pem_to_der(pem: bytes) -> bytes:
    import base64

    return base64.b64decode(b"".join(line for line in pem.splitlines() if not line.startswith(b"-----")))


def _agent_pem(name: str) -> bytes:
    return (VECTORS / "agent-csrs" / f"{name}.csr.pem").read_bytes()


def _istio_cert_der() -> bytes:
    return _pem_to_der((VECTORS / "istio" / "plugged-ca" / "workload-foo-cert.pem").read_bytes())


def _write(directory: Path, seeds: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (directory / f"seed-{name}.bin").write_bytes(data)


def _sequence(content: bytes) -> bytes:
    assert len(content) < 0x80  # noqa: S101 - short form only
    return b"\x30" + bytes([len(content)]) + content


def seed_der(directory: Path) -> None:
    nested = b""
    for _ in range(32):
        nested = _sequence(nested)
    _write(directory, {
        "csr-ec256": _pem_to_der(_agent_pem("ec256-0000")),
        "istio-workload-cert": _istio_cert_der(),
        "primitives": _sequence(bytes.fromhex("0101ff 020100 0202ff7f 03020680 0500 0603550403 040161 a003020102"
                                              .replace(" ", ""))),
        "long-length": b"\x04\x81\x80" + b"x" * 128,
        "deep": nested,
        "empty-constructed": bytes.fromhex("3006 3100 a000 3000".replace(" ", "")),
    })


def seed_pem(directory: Path) -> None:
    ec_pem, rsa_pem = _agent_pem("ec256-0000"), _agent_pem("rsa2048-0000")
    new = ec_pem.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
    _write(directory, {
        "ec": b"\x00" + ec_pem,
        "rsa-crlf": b"\x00" + rsa_pem.replace(b"\n", b"\r\n"),
        "new-indented": b"\x00" + b"  \n" + new + b"\n\n",
        "der": b"\x00" + _pem_to_der(ec_pem),
        "encode-1": b"\x01" + b"\x30",
        "encode-2": b"\x03" + b"\x30\x00",
        "encode-64": b"\x05" + bytes(range(64)),
        "encode-49": b"\x07" + bytes(range(49)),
    })


def seed_san(directory: Path) -> None:
    values = {
        "spiffe": b"\x00spiffe://cluster.local/ns/default/sa/web",
        "spiffe-text": b"\x01spiffe://example.org/a_b/c-d/e.f",
        "spiffe-dots": b"\x00spiffe://td/./..",
        "spiffe-upper": b"\x01SPIFFE://Td/x?y#z",
        "dns": b"\x02istiod.istio-system.svc",
        "dns-wildcard": b"\x03*.example.com",
        "dns-long-label": b"\x02" + b"a" * 63 + b".b",
        "dns-hyphen": b"\x02-a.b-.c",
        "ipv4": b"\x04\x7f\x00\x00\x01",
        "ipv6": b"\x04" + bytes(16),
    }
    _write(directory, values)


def seed_csr(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    from tests._native.fuzz_harness import fixed_keys

    seeds = {name: b"\x00" + _pem_to_der(_agent_pem(name)) for name in AGENT}
    seeds["ec256-pem"] = b"\x00" + _agent_pem("ec256-0001")
    keys = fixed_keys()
    subject_variants = {
        "istio": x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "")]),
        "multi-rdn": x509.Name([x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.COMMON_NAME, "b"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "a")])]),
        "empty": x509.Name([]),
    }
    sans = {
        "istio": [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/web")],
        "multi-rdn": [x509.DNSName("a.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                      x509.IPAddress(ipaddress.ip_address("::1")), x509.RFC822Name("a@b")],
        "empty": [],
    }
    for mode, (key, digest, _) in keys.items():
        for variant, subject in subject_variants.items():
            builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
            if sans[variant]:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans[variant]), critical=True)
            if variant == "multi-rdn":
                builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
            csr = builder.sign(key, digest)
            seeds[f"resign{mode}-{variant}"] = bytes([mode]) + csr.tbs_certrequest_bytes
            if mode == 1 and variant == "istio":
                seeds["p256-whole"] = b"\x00" + csr.public_bytes(serialization.Encoding.DER)
    _write(directory, seeds)


def _tbs_seed(choice: int, csr: int, spiffe_id: bytes, dns: list[bytes] = (), ips: list[bytes] = (), *,
              absolute: tuple[int, int] | None = None, offset: int = -2, lifetime: int = 1350) -> bytes:
    out = bytes([choice, csr]) + bytes(range(0x80, 0x90))
    if absolute is None:
        out += b"\x00" + struct.pack(">i", offset) + lifetime.to_bytes(3, "big", signed=True)
    else:
        out += b"\x01" + struct.pack(">qq", *absolute)
    out += bytes([len(spiffe_id)]) + spiffe_id
    out += bytes([len(dns)]) + b"".join(bytes([len(d)]) + d for d in dns)
    out += bytes([len(ips)]) + b"".join(bytes([len(i)]) + i for i in ips)
    return out


def seed_tbs(directory: Path) -> None:
    web = b"spiffe://cluster.local/ns/default/sa/web"
    _write(directory, {
        "p256-ec": _tbs_seed(0x00, 0, web),
        "rsa-ca-rsa": _tbs_seed(0x01, 4, web, [b"web.default.svc"]),
        "p384-ca-raw": _tbs_seed(0x22, 2, web, [b"a.example", b"b.example"], [b"\x0a\x00\x00\x01"]),
        "istio-ku": _tbs_seed(0x10, 1, web, ips=[bytes(15) + b"\x01", b"\x7f\x00\x00\x01"]),
        "edges": _tbs_seed(0x20, 3, web, absolute=(-62167219200, 253402300799)),
        "utc-switch": _tbs_seed(0x00, 5, web, absolute=(-631152001, 2524608000)),
        "bad-id": _tbs_seed(0x00, 0, b"spiffe://Cluster.local/ns/x"),
        "dup-dns": _tbs_seed(0x00, 0, web, [b"A.example", b"a.EXAMPLE"]),
        "backwards": _tbs_seed(0x00, 0, web, lifetime=-1),
    })


def seed_xfcc(directory: Path) -> None:
    client = "spiffe://cluster.local/ns/foo/sa/bar"
    _write(directory, {
        "envoy": (f'By=spiffe://cluster.local/ns/istio-system/sa/gateway;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6'
                  f'425303443c0748a02dd8de688;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";'
                  f'URI={client};DNS=app.vm.example').encode(),
        "two-hops": f"URI=spiffe://evil/ns/a/sa/b, By=x;URI={client}".encode(),
        "quoted": b'Subject="CN=a \\"quoted\\" name, O=x;y";URI=spiffe://td/ns/a/sa/b',
        "cert": b'Cert="-----BEGIN%20CERTIFICATE-----%0AMIIB-----END%20CERTIFICATE-----%0A";Chain="";DNS=a;DNS=b',
        "no-identity": b"By=spiffe://td/x;Hash=00",
        "empty-values": b"URI=;DNS= \t",
    })


SEEDERS: dict[str, Callable[[Path], None]] = {
    "der": seed_der, "pem": seed_pem, "san": seed_san, "csr": seed_csr, "tbs": seed_tbs, "xfcc": seed_xfcc}
