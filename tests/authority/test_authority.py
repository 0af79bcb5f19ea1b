"""The Authority as a whole: its stages in order, "recorded before returned",
audit faults, local principals, the probe that is never recorded, and the
one key-match check. A real SQLite log, the real native core and signers."""

import asyncio
import datetime as dt
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fastca.audit.sqlite_log import SqliteAuditLog, _connect_writer
from fastca.authn.caller import Caller, RequestInfo
from fastca.authority import SERVER_PRINCIPAL, Authority, IssuedCertificate, IssueRequest, LocalPrincipal
from fastca.ca.certificates import self_signed_root
from fastca.ca.material import validate_material
from fastca.clock import SYSTEM_CLOCK
from fastca.config import IssuanceConfig
from fastca.errors import AuthenticationFailed, CANotReady, ConfigurationError, InvalidRequest, Overloaded
from fastca.signing.software import SoftwareSigner
from tests.authority._support import Issuing, admission, context
from tests.conftest import agent_csrs

ID = "spiffe://cluster.local/ns/authority/sa/test"
OPERATOR = LocalPrincipal("cli", "unix:tester(uid=1000)")


@pytest.fixture
def parts():
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    now = dt.datetime.now(dt.timezone.utc)
    root = self_signed_root(signer, "cluster.local", now=now)
    return validate_material(root, [], [root], now), signer


@pytest.fixture
def audit(tmp_path: Path):
    log = SqliteAuditLog(tmp_path / "audit.db")
    yield log
    log.close()


def _authority(parts, audit, **settings) -> Authority:
    material, signer = parts
    return Authority("default", material, signer, issuance=IssuanceConfig(), admission=admission(), audit=audit,
                     clock=SYSTEM_CLOCK, **settings)


def test_the_stages_are_listed_once_in_order(parts, audit):
    assert _authority(parts, audit).stage_names == (
        "admission", "validity", "prepare", "sign", "assemble", "profile-check", "record")


def test_certificates_are_recorded_before_they_are_returned(parts, audit):
    observed: list[list] = []
    authority = _authority(parts, audit, on_recorded=observed.append)

    async def main():
        async def one(i):
            issued = await authority.issue_admitted(IssueRequest(agent_csrs()[i % 12].pem, ID), context(i))
            # Committed before the caller sees it: readable at once, by another connection.
            assert audit.get(issued.serial) is not None
            return issued

        return await asyncio.gather(*(one(i) for i in range(20)))

    results = asyncio.run(main())
    assert audit.count() == 20
    for i, issued in enumerate(results):
        record = audit.get(issued.serial)
        assert record.request_id == f"req-{i}" and record.peer == f"ipv4:127.0.0.1:{40000 + i}"
        assert record.identity == ID and record.credential_type == "k8s-jwt"
        assert record.fingerprint_sha256 == issued.fingerprint_sha256 and record.not_after == issued.not_after
    assert sorted(r.serial for batch in observed for r in batch) == sorted(f"{r.serial:x}" for r in results)


class _CommitFails:
    """The real writer connection, whose COMMIT fails while ``fail`` is set (a full disk)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail = False

    def execute(self, sql, *args):
        if self.fail and sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def executemany(self, sql, rows):
        return self._conn.executemany(sql, rows)

    def close(self):
        self._conn.close()


def test_failed_commit_returns_no_certificate_and_the_log_recovers(parts, tmp_path):
    connections: list[_CommitFails] = []

    def connect(path):
        connections.append(_CommitFails(_connect_writer(path)))
        return connections[-1]

    audit = SqliteAuditLog(tmp_path / "audit.db", connect=connect)
    observed: list[list] = []
    try:
        issuing = Issuing(*parts, tmp_path, audit=audit, on_recorded=observed.append)
        connections[0].fail = True
        refused = issuing.issue_many([IssueRequest(agent_csrs()[i % 12].pem, ID) for i in range(6)])
        assert all(isinstance(r, CANotReady) for r in refused), refused
        assert "audit log unavailable" in str(refused[0])
        assert audit.count() == 0 and observed == []
        connections[0].fail = False
        recovered = issuing.issue_many([IssueRequest(agent_csrs()[i].pem, ID) for i in range(3)])
        assert all(isinstance(r, IssuedCertificate) for r in recovered)
        assert audit.count() == 3
        # The local path answers the same way: no record, no certificate.
        connections[0].fail = True
        with pytest.raises(CANotReady, match="audit log unavailable"):
            issuing.authority.issue_local(OPERATOR, identity=ID, csr=agent_csrs()[0].pem, ttl_seconds=0,
                                          request_id="cli-1")
        assert audit.count() == 3
    finally:
        audit.close()


def test_full_audit_queue_is_overloaded(parts, tmp_path):
    audit = SqliteAuditLog(tmp_path / "audit.db", queue_limit=2)
    try:
        issuing = Issuing(*parts, tmp_path, audit=audit, batch_max=8)
        assert isinstance(issuing.issue_many([IssueRequest(agent_csrs()[0].pem, ID)])[0], IssuedCertificate)
        # Four records of one batch cannot fit an audit queue of two: refused whole, retryable.
        refused = issuing.issue_many([IssueRequest(agent_csrs()[i].pem, ID) for i in range(4)])
        assert all(isinstance(r, Overloaded) for r in refused), refused
        fits = issuing.issue_many([IssueRequest(agent_csrs()[i].pem, ID) for i in range(2)])
        assert all(isinstance(r, IssuedCertificate) for r in fits)
        assert audit.count() == 3
    finally:
        audit.close()


def test_a_failing_observer_does_not_withhold_certificates(parts, audit):
    def broken(records):
        raise ValueError("observer bug")

    authority = _authority(parts, audit, on_recorded=broken)
    issued = asyncio.run(authority.issue_admitted(IssueRequest(agent_csrs()[0].pem, ID), context()))
    assert x509.load_der_x509_certificate(issued.der).serial_number == issued.serial
    assert audit.get(issued.serial) is not None


def test_local_principals_are_recorded_as_themselves(parts, audit):
    authority = _authority(parts, audit)
    issued = authority.issue_local(OPERATOR, identity=ID, csr=agent_csrs()[0].pem, ttl_seconds=600,
                                   request_id="cli-7")
    record = audit.get(issued.serial)
    assert record.credential_type == "cli" and record.caller_identities == ("unix:tester(uid=1000)",)
    assert record.peer == "local" and record.request_id == "cli-7"
    served = authority.issue_local(SERVER_PRINCIPAL, identity="spiffe://cluster.local/ns/istio-system/sa/fastca",
                                   csr=agent_csrs()[1].pem, ttl_seconds=600, request_id="serving-1",
                                   dns_names=("localhost",), ip_addresses=(bytes([127, 0, 0, 1]),))
    assert audit.get(served.serial).credential_type == "self"
    sans = x509.load_der_x509_certificate(served.der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_local_admission_keeps_to_the_trust_domain_and_names_to_the_server(parts, audit):
    authority = _authority(parts, audit)
    with pytest.raises(InvalidRequest, match="trust domain"):
        authority.issue_local(OPERATOR, identity="spiffe://other.domain/ns/a/sa/b", csr=agent_csrs()[0].pem,
                              ttl_seconds=0, request_id="x")
    with pytest.raises(InvalidRequest, match="only the server"):
        authority.issue_local(OPERATOR, identity=ID, csr=agent_csrs()[0].pem, ttl_seconds=0, request_id="x",
                              dns_names=("evil.example",))
    assert audit.count() == 0


def test_the_probe_signs_but_is_never_recorded(parts, audit):
    authority = _authority(parts, audit)
    for _ in range(3):
        authority.probe()
    assert audit.count() == 0


def test_the_probe_reports_a_signer_that_cannot_sign(parts, audit):
    material, signer = parts

    class Broken:
        def __getattr__(self, name):
            return getattr(signer, name)

        def sign_many(self, data):
            raise CANotReady("HSM unavailable while signing: DeviceError")

    authority = Authority("default", material, Broken(), issuance=IssuanceConfig(), admission=admission(),
                          audit=audit, clock=SYSTEM_CLOCK)
    with pytest.raises(CANotReady, match="DeviceError"):
        authority.probe()


def test_admission_comes_before_the_csr_is_looked_at(parts, audit):
    authority = _authority(parts, audit)
    info = RequestInfo(metadata={}, peer="ipv4:127.0.0.1:1", peer_ip=None)
    caller = Caller(("spiffe://cluster.local/ns/a/sa/b",), "k8s-jwt")

    async def attempt(**kwargs):
        return await authority.issue(caller, info, csr=b"not even a CSR", ttl_seconds=0, request_id="r", **kwargs)

    with pytest.raises(AuthenticationFailed, match="impersonation"):
        asyncio.run(attempt(impersonate="spiffe://cluster.local/ns/x/sa/y"))
    foreign = Caller(("spiffe://other.domain/ns/a/sa/b",), "k8s-jwt")
    with pytest.raises(AuthenticationFailed):
        asyncio.run(authority.issue(foreign, info, csr=b"junk", ttl_seconds=0, impersonate="", request_id="r"))
    with pytest.raises(InvalidRequest):           # admitted: now the CSR is parsed, and refused
        asyncio.run(attempt(impersonate=""))
    assert audit.count() == 0


def test_a_signer_whose_key_is_not_the_certificates_is_refused(parts, audit):
    material, _ = parts
    other = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CANotReady, match="does not match the signing certificate"):
        Authority("default", material, other, issuance=IssuanceConfig(), admission=admission(), audit=audit,
                  clock=SYSTEM_CLOCK)


def test_switch_ca_signs_with_the_new_key_from_the_next_batch_and_keeps_the_bundle(parts, audit, tmp_path):
    """A rotation's activation: the stages are rebuilt for the new CA between
    batches; the root bundle handed out (old + new roots) is kept."""
    material, signer = parts
    issuing = Issuing(material, signer, tmp_path, audit=audit)
    authority = issuing.authority
    new_signer = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    now = dt.datetime.now(dt.timezone.utc)
    new_root = self_signed_root(new_signer, "cluster.local", now=now, common_name="second")
    new_material = validate_material(new_root, [], [new_root], now)
    both = material.root_bundle_pem + new_material.root_bundle_pem
    authority.set_root_bundle(both)
    csr = agent_csrs()[0].pem
    before = issuing.issue(IssueRequest(csr, ID, ttl_seconds=600))
    assert x509.load_pem_x509_certificate(before.chain[0].encode()).issuer == material.signing_cert.subject

    # A signer that does not match the certificate is refused; nothing changes.
    with pytest.raises(CANotReady, match="does not match the signing certificate"):
        authority.switch_ca(new_material, signer)
    assert authority.material is material

    authority.switch_ca(new_material, new_signer)
    after = issuing.issue(IssueRequest(csr, ID, ttl_seconds=600))
    leaf = x509.load_pem_x509_certificate(after.chain[0].encode())
    assert leaf.issuer == new_root.subject
    leaf.verify_directly_issued_by(new_root)
    assert after.chain[-1] == both and authority.root_bundle_pem == both
    authority.probe()                                  # the health probe signs with the new key too
    issuing.close()
    authority.close()


def test_switch_ca_refuses_a_signer_on_another_thread(parts, audit):
    authority = _authority(parts, audit)

    class Elsewhere(SoftwareSigner):
        @property
        def home_executor(self):
            return object()

    other = Elsewhere(ec.generate_private_key(ec.SECP256R1()))
    now = dt.datetime.now(dt.timezone.utc)
    root = self_signed_root(other, "cluster.local", now=now)
    with pytest.raises(ConfigurationError, match="another thread"):
        authority.switch_ca(validate_material(root, [], [root], now), other)
    authority.close()
