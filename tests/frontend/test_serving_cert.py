import datetime as dt

from cryptography import x509

from fastca.config import IssuanceConfig
from fastca.frontend.context import peer_ip
from fastca.frontend.serving_cert import ServingCertificate
from fastca.pipeline.issuer import Issuer


def test_serving_certificate_names_and_renewal(ec_token_ca):
    issuer = Issuer(ec_token_ca.material, ec_token_ca.signer, IssuanceConfig())
    serving = ServingCertificate(issuer, trust_domain="cluster.local", dns_names=["localhost", "ca.example.internal"],
                                 ttl_seconds=3600)
    first = serving.certificate
    cert = x509.load_der_x509_certificate(first.der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "ca.example.internal"]
    assert (first.not_after - first.not_before) == dt.timedelta(seconds=3600 + 120)
    halfway = first.not_before.timestamp() + (first.not_after - first.not_before).total_seconds() / 2
    assert serving.renew_if_due(now=halfway - 5) is False
    assert serving.certificate is first
    assert serving.renew_if_due(now=halfway + 1) is True
    assert serving.certificate.serial != first.serial


def test_peer_ip_parsing():
    assert str(peer_ip("ipv4:127.0.0.1:5000")) == "127.0.0.1"
    assert str(peer_ip("ipv6:[::1]:5000")) == "::1"
    assert str(peer_ip("ipv6:%5B::1%5D:5000")) == "::1"
    assert peer_ip("unix:/tmp/socket") is None
    assert peer_ip("ipv4:garbage") is None
