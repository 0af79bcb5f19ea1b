"""Micro-benchmarks of the native core, with pyca as the baseline.

Disabled by default (pyproject passes --benchmark-disable); run with
``dev/test tests/_native/test_benchmarks.py --benchmark-enable``. Batch benchmarks
record their per-item median in extra_info["per_item_us"].
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastca._native.testing import IssuerProfile, LeafSpec, assemble_batch, parse_csr, prepare_batch, verify_csr

AGENT_CSRS = Path(__file__).parent.parent / "vectors" / "agent-csrs"
BATCH = 256
NOW = 1_764_000_000


def agent(name: str) -> tuple[bytes, str]:
    return ((AGENT_CSRS / f"{name}.csr.pem").read_bytes(), (AGENT_CSRS / f"{name}.id").read_text().strip())


@pytest.fixture(scope="module")
def ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    profile = IssuerProfile(name.public_bytes(), x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest,
                            bytes.fromhex("300a06082a8648ce3d040302"), spki)
    return key, name, profile


def record_per_item(benchmark, items: int) -> None:
    if benchmark.stats is not None:         # None under --benchmark-disable
        benchmark.extra_info["per_item_us"] = round(benchmark.stats.stats.median / items * 1e6, 2)


@pytest.mark.parametrize("name", ["rsa2048-0000", "ec256-0000"])
def test_parse_csr(benchmark, name):
    pem, _ = agent(name)
    benchmark(parse_csr, pem)


@pytest.mark.parametrize("name", ["rsa2048-0000", "ec256-0000"])
def test_verify_csr(benchmark, name):
    pem, _ = agent(name)
    benchmark(verify_csr, pem)


def specs(name: str) -> list[LeafSpec]:
    pem, spiffe_id = agent(name)
    return [LeafSpec(pem, spiffe_id, os.urandom(16), NOW - 120, NOW + 86_400) for _ in range(BATCH)]


@pytest.mark.parametrize("name", ["rsa2048-0000", "ec256-0000"])
def test_prepare_batch(benchmark, ca, name):
    batch = specs(name)
    benchmark(prepare_batch, ca[2], batch)
    record_per_item(benchmark, BATCH)


def test_assemble_batch(benchmark, ca):
    key, _, profile = ca
    tbs = [leaf.tbs for leaf in prepare_batch(profile, specs("rsa2048-0000"))]
    signatures = [key.sign(t, ec.ECDSA(hashes.SHA256())) for t in tbs]
    benchmark(assemble_batch, profile, tbs, signatures, False)
    record_per_item(benchmark, BATCH)


def pyca_issue(pem: bytes, spiffe_id: str, key, name: x509.Name) -> bytes:
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    now = dt.datetime.fromtimestamp(NOW, dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    return (x509.CertificateBuilder()
            .serial_number(int.from_bytes(os.urandom(16), "big") >> 2 | 1 << 126)
            .issuer_name(name).subject_name(x509.Name([])).public_key(csr.public_key())
            .not_valid_before(now - dt.timedelta(minutes=2)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier(ski, None, None), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize("name", ["rsa2048-0000", "ec256-0000"])
def test_pyca_baseline_issue(benchmark, ca, name):
    key, ca_name, _ = ca
    pem, spiffe_id = agent(name)
    benchmark(pyca_issue, pem, spiffe_id, key, ca_name)


@pytest.mark.parametrize("name", ["rsa2048-0000", "ec256-0000"])
def test_native_issue_with_software_p256_signing(benchmark, ca, name):
    """The native path end to end for one batch, with the CA signature made by
    pyca in between: the comparable number to the pyca baseline."""
    key, _, profile = ca
    batch = specs(name)

    def issue() -> list:
        tbs = [leaf.tbs for leaf in prepare_batch(profile, batch)]
        return assemble_batch(profile, tbs, [key.sign(t, ec.ECDSA(hashes.SHA256())) for t in tbs], False)

    benchmark(issue)
    record_per_item(benchmark, BATCH)
