import datetime as dt

from cryptography import x509

from fastca.frontend.context import peer_ip
from fastca.frontend.serving_cert import ServingCertificate
from tests.authority._support import Issuing


def test_serving_certificate_names_and_renewal(ec_token_ca, tmp_path):
    issuing = Issuing(ec_token_ca.material, ec_token_ca.signer, tmp_path)
    serving = ServingCertificate(issuing.authority, trust_domain="cluster.local",
                                 dns_names=["localhost", "ca.example.internal"], ip_addresses=["127.0.0.1", "::1"],
                                 ttl_seconds=3600)
    first = serving.certificate
    cert = x509.load_der_x509_certificate(first.der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "ca.example.internal"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert (first.not_after - first.not_before) == dt.timedelta(seconds=3600 + 120)
    halfway = first.not_before.timestamp() + (first.not_after - first.not_before).total_seconds() / 2
    assert serving.renew_if_due(now=halfway - 5) is False
    assert serving.certificate is first
    assert serving.renew_if_due(now=halfway + 1) is True
    assert serving.certificate.serial != first.serial
    # Each one is an issued certificate like any other: recorded, as the server's own.
    records = [issuing.audit.get(c.serial) for c in (first, serving.certificate)]
    assert [r.credential_type for r in records] == ["self", "self"]


def test_peer_ip_parsing():
    assert str(peer_ip("ipv4:127.0.0.1:5000")) == "127.0.0.1"
    assert str(peer_ip("ipv6:[::1]:5000")) == "::1"
    assert str(peer_ip("ipv6:%5B::1%5D:5000")) == "::1"
    assert peer_ip("unix:/tmp/socket") is None
    assert peer_ip("ipv4:garbage") is None
