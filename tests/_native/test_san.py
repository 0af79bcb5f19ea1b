"""SPIFFE ID / DNS / IP rules of docs/cert-profile.md (RELIABILITY.md case 14)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastca._native.testing import E_IDENTITY, NativeError, validate_dns_name, validate_ip, validate_spiffe_id


def refused(validate, value, *args) -> str:
    with pytest.raises(NativeError) as caught:
        validate(value, *args)
    assert caught.value.code == E_IDENTITY
    return str(caught.value)


@pytest.mark.parametrize("uri", [
    "spiffe://cluster.local/ns/default/sa/web",
    "spiffe://a/b",
    "spiffe://example.org/Workload_1.v2-x",
    "spiffe://td-1.example_2/a/.../b",
    "spiffe://" + "d" * 255 + "/w",
    "spiffe://cluster.local/" + "/".join(["s"] * 1000),
])
def test_valid_spiffe_ids_are_accepted(uri):
    validate_spiffe_id(uri)
    validate_spiffe_id(uri.encode())


@pytest.mark.parametrize("uri, says", [
    ("", "empty"),
    ("spiffe://Cluster.local/ns/a/sa/b", "lower-case"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "scheme must be lower-case"),
    ("Spiffe://cluster.local/ns/a/sa/b", "scheme must be lower-case"),
    ("https://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
    ("spiffe:/cluster.local/ns/a", "must start with 'spiffe://'"),
    ("spiffe://cluster.local/ns%2Fa/sa/b", "percent-encoding"),
    ("spiffe://cluster%2Elocal/ns/a", "percent-encoding"),
    ("spiffe://cluster.local/ns/../sa/b", "'..'"),
    ("spiffe://cluster.local/ns/./sa/b", "'.'"),
    ("spiffe://cluster.local/ns/a/sa/b/", "trailing '/'"),
    ("spiffe://cluster.local/", "trailing '/'"),
    ("spiffe://cluster.local", "no path"),
    ("spiffe://cluster.local//ns/a", "empty path segment"),
    ("spiffe:///ns/a", "trust domain is empty"),
    ("spiffe://cluster.local/ns/a\x00/sa/b", "NUL"),
    ("spiffe://cluster.local/ns/a\n/sa/b", "control character 0x0a"),
    ("spiffe://cluster.local/ns/a\x7f", "control character 0x7f"),
    ("spiffe://cluster.local/ns/a\tb", "control character 0x09"),
    ("spiffe://user@cluster.local/ns/a", "userinfo"),
    ("spiffe://cluster.local:8443/ns/a", "port"),
    ("spiffe://cluster.local/ns/a?x=1", "query"),
    ("spiffe://cluster.local/ns/a#frag", "fragment"),
    ("spiffe://cluster.local/ns/a b", "' '"),
    ("spiffe://cluster.local/ns/a:b", "':'"),
    ("spiffe://clus*ter/ns/a", "'*'"),
    ("spiffe://" + "d" * 256 + "/w", "longer than 255"),
    ("spiffe://cluster.local/" + "a" * 2030, "at most 2048"),
])
def test_invalid_spiffe_ids_are_refused_with_the_reason(uri, says):
    assert says in refused(validate_spiffe_id, uri)


def test_non_ascii_identity_is_refused_as_str_and_as_bytes():
    assert "non-ASCII" in refused(validate_spiffe_id, "spiffe://cluster.local/ns/é/sa/b")
    assert "non-ASCII" in refused(validate_spiffe_id, "spiffe://cluster.local/ns/é/sa/b".encode())
    assert "non-ASCII" in refused(validate_dns_name, "bücher.example")


def test_exactly_2048_bytes_is_the_limit():
    uri = "spiffe://cluster.local/" + "a" * (2048 - len("spiffe://cluster.local/"))
    validate_spiffe_id(uri)
    refused(validate_spiffe_id, uri + "a")


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError):
        validate_spiffe_id(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        validate_ip("10.0.0.1")  # type: ignore[arg-type]


# --- property tests ------------------------------------------------------------

SEGMENT_ALPHABET = string.ascii_letters + string.digits + "._-"
TRUST_DOMAIN_ALPHABET = string.ascii_lowercase + string.digits + "._-"
segments = st.text(SEGMENT_ALPHABET, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
trust_domains = st.text(TRUST_DOMAIN_ALPHABET, min_size=1, max_size=40)
spiffe_ids = st.builds(lambda td, path: f"spiffe://{td}/" + "/".join(path),
                       trust_domains, st.lists(segments, min_size=1, max_size=8))


@given(spiffe_ids)
def test_generated_valid_spiffe_ids_are_accepted(uri):
    validate_spiffe_id(uri)


FORBIDDEN = [chr(c) for c in range(0x20)] + ["\x7f", "%", "?", "#", "@", ":", " ", "\\", "é", "\u2028", "*"]


@given(spiffe_ids, st.sampled_from(FORBIDDEN), st.data())
def test_any_forbidden_character_anywhere_after_the_scheme_is_refused(uri, bad, data):
    at = data.draw(st.integers(len("spiffe://"), len(uri)))
    refused(validate_spiffe_id, uri[:at] + bad + uri[at:])


@given(spiffe_ids, st.sampled_from(["/", "/.", "/..", "//x"]))
def test_structural_faults_are_refused(uri, suffix):
    refused(validate_spiffe_id, uri + suffix)


@given(trust_domains.filter(lambda td: td != td.upper()), segments)
def test_upper_case_trust_domain_is_refused(trust_domain, segment):
    assert "lower-case" in refused(validate_spiffe_id, f"spiffe://{trust_domain.upper()}/{segment}")


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_spiffe_validator_raises_nothing_but_native_error(value):
    try:
        validate_spiffe_id(value)
    except NativeError as error:
        assert error.code == E_IDENTITY


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)), st.booleans())
def test_dns_validator_raises_nothing_but_native_error(value, wildcard):
    try:
        validate_dns_name(value, wildcard)
    except NativeError as error:
        assert error.code == E_IDENTITY


# --- DNS and IP -------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "a", "web.default.svc.cluster.local", "xn--bcher-kva.example", "A-1.b-2.C3",
    "a" * 63 + ".example", ".".join(["a" * 63] * 3) + "." + "b" * 61,
])
def test_valid_dns_names_are_accepted(name):
    assert len(name) <= 253
    validate_dns_name(name)


@pytest.mark.parametrize("name, says", [
    ("", "empty"),
    ("-a.example", "'-'"),
    ("a-.example", "'-'"),
    ("a..example", "empty label"),
    (".example", "empty label"),
    ("example.", "trailing '.'"),
    ("a" * 64 + ".example", "longer than 63"),
    (".".join(["a" * 63] * 4), "at most 253"),
    ("under_score.example", "'_'"),
    ("sp ace.example", "' '"),
    ("a*.example", "'*'"),
    ("a.*.example", "'*'"),
    ("*", "'*'"),
    ("*.example", "wildcards are not allowed"),
    ("nul\x00.example", "NUL"),
])
def test_invalid_dns_names_are_refused_with_the_reason(name, says):
    assert says in refused(validate_dns_name, name)


def test_wildcard_only_as_whole_leftmost_label_and_only_when_allowed():
    validate_dns_name("*.example.com", True)
    validate_dns_name("*.a", True)
    assert "'*'" in refused(validate_dns_name, "*.*.example.com", True)
    assert "'*'" in refused(validate_dns_name, "w*.example.com", True)
    assert "needs a domain" in refused(validate_dns_name, "*.", True)


@pytest.mark.parametrize("size", [4, 16])
def test_ip_sizes_accepted(size):
    validate_ip(bytes(size))


@pytest.mark.parametrize("size", [0, 3, 5, 8, 15, 17, 32])
def test_other_ip_sizes_refused(size):
    assert "4 (IPv4) or 16 (IPv6)" in refused(validate_ip, bytes(size))
