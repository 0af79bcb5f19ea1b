"""Client-certificate authentication (docs/reliability.md, case 2)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from fastca.authn.mtls import MtlsAuthenticator
from fastca.errors import AuthenticationFailed
from tests.authn._pki import NOW, der, make_intermediate, make_leaf, make_root, uri
from tests.authn._support import request

ID = "spiffe://cluster.local/ns/vm/sa/app"
MESH = make_root("mesh")


def authenticate(authenticator: MtlsAuthenticator, *certificates: x509.Certificate):
    return asyncio.run(authenticator.authenticate(request(certificates=tuple(der(c) for c in certificates))))


def test_leaf_san_values_are_the_identities_in_order():
    leaf, _ = make_leaf(MESH, [uri(ID), x509.DNSName("app.vm.example"),
                               x509.IPAddress(ipaddress.ip_address("10.0.0.7"))])
    caller = authenticate(MtlsAuthenticator([MESH.certificate]), leaf)
    assert caller.identities == (ID, "app.vm.example", "10.0.0.7")
    assert caller.credential_type == "mtls"
    assert caller.kubernetes is None            # a certificate caller cannot impersonate


def test_leaf_alone_completed_by_the_cas_own_intermediates():
    """grpcio passes only the peer's leaf: the CA's chain completes the path."""
    intermediate = make_intermediate(MESH)
    leaf, _ = make_leaf(intermediate, [uri(ID)])
    authenticator = MtlsAuthenticator([MESH.certificate], intermediates=[intermediate.certificate])
    assert authenticate(authenticator, leaf).identities == (ID,)
    stranger, _ = make_leaf(make_intermediate(make_root("elsewhere")), [uri(ID)])
    with pytest.raises(AuthenticationFailed, match="does not verify"):
        authenticate(authenticator, stranger)


def test_chain_through_an_intermediate():
    intermediate = make_intermediate(MESH)
    leaf, _ = make_leaf(intermediate, [uri(ID)])
    assert authenticate(MtlsAuthenticator([MESH.certificate]), leaf, intermediate.certificate).identities == (ID,)
    # Without the intermediate the leaf chains to nothing we trust.
    with pytest.raises(AuthenticationFailed, match="does not verify"):
        authenticate(MtlsAuthenticator([MESH.certificate]), leaf)


def test_no_certificate_is_not_this_authenticators_business():
    assert asyncio.run(MtlsAuthenticator([MESH.certificate]).authenticate(request())) is None


@pytest.mark.parametrize("case", ["no_uri_san", "no_san", "two_uri_sans", "ca_true", "other_root", "expired"])
def test_certificates_that_must_not_authenticate(case):
    issuer = MESH
    sans: list[x509.GeneralName] | None = [uri(ID)]
    ca = False
    if case == "no_uri_san":
        sans = [x509.DNSName("app.vm.example")]
    elif case == "no_san":
        sans = None
    elif case == "two_uri_sans":
        sans = [uri(ID), uri("spiffe://cluster.local/ns/istio-system/sa/istiod")]
    elif case == "ca_true":
        ca = True
    elif case == "other_root":
        issuer = make_root("mesh")             # same name, another key
    leaf, key = make_leaf(issuer, sans, ca=ca)
    if case == "expired":
        leaf = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(leaf.issuer)
                .public_key(leaf.public_key()).serial_number(1)
                .not_valid_before(NOW - dt.timedelta(days=3)).not_valid_after(NOW - dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([uri(ID)]), critical=True)
                .sign(MESH.key, hashes.SHA256()))
    with pytest.raises(AuthenticationFailed) as info:
        authenticate(MtlsAuthenticator([MESH.certificate]), leaf)
    assert info.value.public_message == "request authenticate failure"


def test_garbage_der_is_a_failure():
    with pytest.raises(AuthenticationFailed, match="does not parse"):
        asyncio.run(MtlsAuthenticator([MESH.certificate]).authenticate(request(certificates=(b"\x30\x03junk",))))


def test_roots_callable_follows_rotation():
    new_root = make_root("mesh-2")
    current = [MESH.certificate]
    authenticator = MtlsAuthenticator(lambda: current)
    leaf, _ = make_leaf(new_root, [uri(ID)])
    with pytest.raises(AuthenticationFailed):
        authenticate(authenticator, leaf)
    current = [MESH.certificate, new_root.certificate]
    assert authenticate(authenticator, leaf).identities == (ID,)


def test_no_roots_configured_fails_closed():
    leaf, _ = make_leaf(MESH, [uri(ID)])
    with pytest.raises(AuthenticationFailed, match="no trusted roots"):
        authenticate(MtlsAuthenticator([]), leaf)
