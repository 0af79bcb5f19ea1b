"""The Authority's issuance stages through the real native core, a real
SoftHSM key and a real audit log: profile, TTL, bad input, faulty signers."""

import datetime as dt
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastca.ca.certificates import self_signed_root
from fastca.ca.material import validate_material
from fastca.config import IssuanceConfig
from fastca.authority import IssueRequest
from fastca.clock import ManualClock
from fastca.errors import CANotValid, InvalidRequest, SigningFailed
from fastca.signing.software import SoftwareSigner
from tests.authority._support import Issuing
from tests.conftest import agent_csrs

IDENTITY = "spiffe://cluster.local/ns/payments/sa/api"


def _verify_with_ca(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    public = ca_cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    else:
        public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)


class CountingSigner:
    """Wraps a real signer to count calls (fault injection wraps the real thing)."""

    def __init__(self, inner, corrupt=None):
        self._inner = inner
        self._corrupt = corrupt
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def sign_many(self, data):
        self.calls += 1
        signatures = self._inner.sign_many(data)
        return self._corrupt(data, signatures) if self._corrupt else signatures


@pytest.fixture
def issuer(any_token_ca, tmp_path):
    issuing = Issuing(any_token_ca.material, any_token_ca.signer, tmp_path)
    yield issuing
    issuing.close()


def _issuing(ca, tmp_path, signer=None, **kwargs) -> Issuing:
    return Issuing(ca.material, signer or ca.signer, tmp_path, **kwargs)


def _csr_with(key, *, cn=None, sans=(), ca=False, key_cert_sign=False, hash_alg=hashes.SHA256()):
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if key_cert_sign:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    return builder.sign(key, hash_alg).public_bytes(serialization.Encoding.PEM)


def test_identity_comes_from_the_caller_never_the_csr(issuer, any_token_ca):
    csr = agent_csrs("rsa2048")[0]
    assert csr.spiffe_id != IDENTITY
    issued = issuer.issue(IssueRequest(csr.pem, IDENTITY))
    cert = x509.load_der_x509_certificate(issued.der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(IDENTITY)]
    assert cert.subject == x509.Name([])
    _verify_with_ca(cert, any_token_ca.material.signing_cert)
    assert issued.identity == IDENTITY and issued.key_type == "rsa-2048"
    assert issued.chain[0] == issued.pem and issued.chain[-1] == any_token_ca.material.root_bundle_pem


def test_csr_requests_for_more_are_ignored(issuer):
    """docs/reliability.md case 10: CN, DNS/IP/email SANs, a second URI, CA:TRUE, keyCertSign."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    pem = _csr_with(key, cn="admin", ca=True, key_cert_sign=True, sans=[
        x509.DNSName("evil.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        x509.RFC822Name("a@b.c"), x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin"),
        x509.UniformResourceIdentifier("spiffe://other/ns/x/sa/y")])
    cert = x509.load_der_x509_certificate(issuer.issue(IssueRequest(pem, IDENTITY)).der)
    assert cert.subject == x509.Name([])
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == \
        [x509.UniformResourceIdentifier(IDENTITY)]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not ku.key_cert_sign and ku.digital_signature
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize("ttl,expected", [(None, 86400), (0, 86400), (-5, 86400), (3600, 3600)])
def test_ttl_rules(issuer, ttl, expected):
    issued = issuer.issue(IssueRequest(agent_csrs("ec256")[0].pem, IDENTITY, ttl_seconds=ttl))
    assert issued.not_after - issued.not_before == dt.timedelta(seconds=expected + 120)
    cert = x509.load_der_x509_certificate(issued.der)
    assert cert.not_valid_after_utc == issued.not_after and cert.not_valid_before_utc == issued.not_before


@pytest.mark.parametrize("ttl", [90 * 86400 + 1, 2**63 - 1])
def test_ttl_above_max_is_invalid(issuer, ttl):
    with pytest.raises(InvalidRequest, match="max allowed TTL"):
        issuer.issue(IssueRequest(agent_csrs("ec256")[0].pem, IDENTITY, ttl_seconds=ttl))


def test_not_after_clamped_to_signing_cert(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    signer = SoftwareSigner(key)
    now = dt.datetime.now(dt.timezone.utc)
    root = self_signed_root(signer, "cluster.local", now=now, lifetime=dt.timedelta(hours=1))
    issuing = Issuing(validate_material(root, [], [root], now), signer, tmp_path)
    issued = issuing.issue(IssueRequest(agent_csrs("ec256")[0].pem, IDENTITY))
    assert issued.not_after == root.not_valid_after_utc


@pytest.mark.parametrize("moment", ["before", "after"])
def test_ca_outside_its_validity_refuses_with_the_reason(tmp_path, moment):
    """An injected clock a day before the CA's NotBefore (or past its NotAfter)
    gets CANotValid (FAILED_PRECONDITION), never a certificate that cannot verify."""
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    made = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    root = self_signed_root(signer, "cluster.local", now=made, lifetime=dt.timedelta(days=30))
    clock = ManualClock(made + dt.timedelta(days=1))
    issuing = Issuing(validate_material(root, [], [root], clock.utcnow()), signer, tmp_path, clock=clock)
    assert issuing.issue(IssueRequest(agent_csrs("ec256")[0].pem, IDENTITY)).not_after <= root.not_valid_after_utc
    clock.set(root.not_valid_before_utc - dt.timedelta(days=1) if moment == "before"
              else root.not_valid_after_utc + dt.timedelta(seconds=1))
    with pytest.raises(CANotValid, match="not valid until" if moment == "before" else "expired at"):
        issuing.issue(IssueRequest(agent_csrs("ec256")[0].pem, IDENTITY))
    assert issuing.audit.count() == 1


def test_not_before_is_never_before_the_ca(tmp_path):
    """Backdating stops at the CA's own NotBefore: a leaf the CA could not have signed then is not claimed."""
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    made = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    root = self_signed_root(signer, "cluster.local", now=made, lifetime=dt.timedelta(days=30))
    clock = ManualClock(root.not_valid_before_utc + dt.timedelta(seconds=30))
    issuing = Issuing(validate_material(root, [], [root], clock.utcnow()), signer, tmp_path, clock=clock)
    issued = issuing.issue(IssueRequest(agent_csrs("ec256")[0].pem, IDENTITY, ttl_seconds=600))
    assert issued.not_before == root.not_valid_before_utc
    assert issued.not_after == clock.utcnow() + dt.timedelta(seconds=600)


def _flip_signature_bit(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    return bytes(der)


def test_bad_csr_never_reaches_the_hsm(any_token_ca, tmp_path):
    """docs/reliability.md case 8: flipped signature bit; key A signing a CSR carrying key B."""
    counting = CountingSigner(any_token_ca.signer)
    issuer = _issuing(any_token_ca, tmp_path, counting)
    flipped = _flip_signature_bit(agent_csrs("rsa2048")[1].pem)
    key_a, key_b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    good_b = x509.load_pem_x509_csr(_csr_with(key_b)).public_bytes(serialization.Encoding.DER)
    good_a = x509.load_pem_x509_csr(_csr_with(key_a)).public_bytes(serialization.Encoding.DER)
    # Swap B's SPKI into A's signed request: A's signature no longer matches the key.
    spki_a = key_a.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spki_b = key_b.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    swapped = good_a.replace(spki_a, spki_b)
    assert swapped != good_a and good_b
    for bad in (flipped, swapped):
        with pytest.raises(InvalidRequest):
            issuer.issue(IssueRequest(bad, IDENTITY))
    assert counting.calls == 0


@pytest.mark.parametrize("identity", [
    "spiffe://Cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a%2Fb/sa/c", "spiffe://cluster.local/ns/../sa/b",
    "spiffe://cluster.local/ns/a/sa/b/", "spiffe://cluster.local/ns/a\x00/sa/b", "spiffe://cluster.local/ns/a\n/sa/b",
    "spiffe://cluster.local/ns/é/sa/b", "spiffe://cluster.local/" + "a" * 2048, "https://cluster.local/ns/a/sa/b",
    "spiffe://cluster.local", "",
])
def test_bad_identities_rejected_before_signing(any_token_ca, identity, tmp_path):
    counting = CountingSigner(any_token_ca.signer)
    issuer = _issuing(any_token_ca, tmp_path, counting)
    with pytest.raises(InvalidRequest):
        issuer.issue(IssueRequest(agent_csrs("ec256")[0].pem, identity))
    assert counting.calls == 0


@pytest.mark.parametrize("fault", ["garbage", "other-bytes", "short"])
def test_faulty_signer_yields_an_error_never_a_certificate(any_token_ca, fault, tmp_path):
    """docs/reliability.md case 16: a broken signer (garbage, or a valid signature over other bytes)."""
    def corrupt(data, signatures):
        if fault == "garbage":
            return [os.urandom(len(s)) for s in signatures]
        if fault == "other-bytes":
            return any_token_ca.signer.sign_many([d + b"x" for d in data])
        return signatures[:-1]

    issuer = _issuing(any_token_ca, tmp_path, CountingSigner(any_token_ca.signer, corrupt))
    results = issuer.issue_many([IssueRequest(c.pem, IDENTITY) for c in agent_csrs()[:3]])
    assert all(isinstance(r, SigningFailed) for r in results), results
    assert issuer.audit.count() == 0


def test_one_bad_request_does_not_fail_its_batch(issuer):
    requests = [IssueRequest(c.pem, IDENTITY) for c in agent_csrs()]
    requests.insert(3, IssueRequest(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                                    IDENTITY))
    requests.insert(5, IssueRequest(agent_csrs()[0].pem, IDENTITY, ttl_seconds=10**12))
    results = issuer.issue_many(requests)
    assert sum(isinstance(r, InvalidRequest) for r in results) == 2
    assert isinstance(results[3], InvalidRequest) and isinstance(results[5], InvalidRequest)
    assert sum(1 for r in results if not isinstance(r, Exception)) == len(agent_csrs())


def test_serials_unique_positive_fixed_length(issuer):
    pem = agent_csrs("ec256")[0].pem
    serials = set()
    for _ in range(10):
        for issued in issuer.issue_many([IssueRequest(pem, IDENTITY)] * 100):
            cert = x509.load_der_x509_certificate(issued.der)
            assert cert.serial_number == issued.serial
            assert 2**126 <= issued.serial < 2**127
            serials.add(issued.serial)
    assert len(serials) == 1000


def test_concurrent_authorities_through_pkcs11(ec_token_ca, tmp_path):
    """Several Authorities on several threads share one SoftHSM key: thousands
    of signatures, zero errors, every certificate verified independently."""
    csrs = agent_csrs()
    issuers = [_issuing(ec_token_ca, tmp_path) for _ in range(8)]
    threads_seen = set()

    def work(n):
        threads_seen.add(threading.get_ident())
        out = []
        for round_ in range(20):
            batch = [IssueRequest(csrs[(n + i) % len(csrs)].pem, f"spiffe://cluster.local/ns/t{n}/sa/r{round_}")
                     for i in range(32)]
            out.extend(issuers[n].issue_many(batch))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for chunk in pool.map(work, range(8)) for r in chunk]
    assert len(threads_seen) > 1
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    assert len(results) == 8 * 20 * 32
    assert sum(issuer.audit.count() for issuer in issuers) == len(results)
    ca_cert = ec_token_ca.material.signing_cert
    for issued in results:
        _verify_with_ca(x509.load_der_x509_certificate(issued.der), ca_cert)


def test_oversized_csr_rejected_before_parsing(any_token_ca, tmp_path):
    """docs/reliability.md case 12 (the CSR half; gRPC message limits belong to the server)."""
    counting = CountingSigner(any_token_ca.signer)
    issuer = _issuing(any_token_ca, tmp_path, counting)
    pem = agent_csrs("ec256")[0].pem
    oversized = pem + b"\n" * (70 * 1024)
    with pytest.raises(InvalidRequest, match="65536"):
        issuer.issue(IssueRequest(oversized, IDENTITY))
    assert counting.calls == 0
