"""x-forwarded-client-cert (docs/reliability.md, case 5)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastca.authn.xfcc import XfccAuthenticator, parse_xfcc
from fastca.errors import AuthenticationFailed
from tests.authn._support import request

PROXY = "spiffe://cluster.local/ns/istio-system/sa/gateway"
CLIENT = "spiffe://cluster.local/ns/vm/sa/app"
ENVOY = (f'By={PROXY};Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;'
         f'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI={CLIENT};DNS=app.vm.example')


def authenticate(header: str | None, peer_ip: str | None = "10.0.0.5", cidrs=("10.0.0.0/8",)):
    headers = {} if header is None else {"x_forwarded_client_cert": header}
    return asyncio.run(XfccAuthenticator(list(cidrs)).authenticate(request(peer_ip=peer_ip, **headers)))


def test_envoy_header_from_a_trusted_proxy():
    caller = authenticate(ENVOY)
    assert caller.identities == (CLIENT, "app.vm.example")
    assert caller.credential_type == "xfcc" and caller.kubernetes is None


def test_no_header_is_none():
    assert authenticate(None) is None


@pytest.mark.parametrize("peer_ip,cidrs", [("192.168.1.9", ("10.0.0.0/8",)), ("127.0.0.1", ("10.0.0.0/8",)),
                                           ("::1", ("10.0.0.0/8",)), (None, ("10.0.0.0/8",)),
                                           ("10.0.0.5", ())])
def test_untrusted_peers_are_refused(peer_ip, cidrs):
    with pytest.raises(AuthenticationFailed, match="untrusted peer"):
        authenticate(ENVOY, peer_ip=peer_ip, cidrs=cidrs)


def test_loopback_only_when_configured_and_v4_mapped_peers_match():
    assert authenticate(ENVOY, peer_ip="127.0.0.1", cidrs=("127.0.0.0/8",)).identities[0] == CLIENT
    assert authenticate(ENVOY, peer_ip="::ffff:10.1.1.1", cidrs=("10.0.0.0/8",)).identities[0] == CLIENT


def test_multi_hop_only_the_last_element_counts():
    forged_first_hop = "URI=spiffe://cluster.local/ns/istio-system/sa/istiod;DNS=istiod"
    caller = authenticate(f"{forged_first_hop},{ENVOY}")
    assert caller.identities == (CLIENT, "app.vm.example")
    # And if the trusted proxy's own element has no identity, earlier hops do not fill in.
    with pytest.raises(AuthenticationFailed, match="no URI or DNS"):
        authenticate(f"{forged_first_hop},By={PROXY};Hash=abcd")


def test_quoted_values_with_escaped_quotes_and_separators():
    [element] = parse_xfcc('Subject="CN=a \\"quoted\\" name, O=x;y";URI=spiffe://td/ns/a/sa/b')
    assert element.values("Subject") == ['CN=a "quoted" name, O=x;y']
    assert element.values("URI") == ["spiffe://td/ns/a/sa/b"]
    elements = parse_xfcc('uri=spiffe://td/ns/a/sa/b, By=x;Uri="spiffe://td/ns/c/sa/d"')
    assert [e.values("URI") for e in elements] == [["spiffe://td/ns/a/sa/b"], ["spiffe://td/ns/c/sa/d"]]


@pytest.mark.parametrize("junk", [
    "", "URI", "URI=x;", "URI=x,", ",URI=x", "URI=x;;DNS=y", 'Subject="unterminated;URI=x',
    'URI="a"b', 'URI=a"b', "Unknown=x", "=x", "URI=x\nDNS=y", "URI=spiffe://é", "URI=x,,URI=y",
    "URI=" + "a" * 17_000,
])
def test_junk_is_refused_never_raised(junk):
    with pytest.raises(AuthenticationFailed):
        authenticate(junk)


def test_oversized_header_is_refused_before_parsing():
    header = ",".join([ENVOY] * 200)
    assert len(header) > 16 * 1024
    with pytest.raises(AuthenticationFailed, match="longer than"):
        parse_xfcc(header)


XFCC_ALPHABET = st.sampled_from(list('=;,"\\ \tURIDNSBySubjectHashCertChainuridns:/.-_%\x00\x7féa'))


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(max_size=300), st.text(alphabet=XFCC_ALPHABET, max_size=300)))
def test_parser_never_raises_anything_but_authentication_failed(text):
    try:
        elements = parse_xfcc(text)
    except AuthenticationFailed:
        return
    assert elements and all(e.pairs for e in elements)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=XFCC_ALPHABET, max_size=200))
def test_authenticator_returns_a_caller_or_fails_cleanly(text):
    try:
        caller = authenticate(text)
    except AuthenticationFailed:
        return
    assert caller is not None and caller.identities


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["By", "URI", "DNS", "Subject", "Hash"]),
                          st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=30)),
                min_size=1, max_size=6))
def test_quoting_round_trips(pairs):
    # What Envoy writes (quote, escape quotes) parses back to what it meant.
    def quote(value: str) -> str:
        return '"' + value.replace('"', '\\"') + '"'
    header = ";".join(f"{k}={quote(v)}" for k, v in pairs)
    if any(v.endswith("\\") for _, v in pairs):
        return  # Envoy does not escape backslashes, so a trailing one is ambiguous
    [element] = parse_xfcc(header)
    assert list(element.pairs) == list(pairs)
