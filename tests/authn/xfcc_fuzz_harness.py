"""One input of the XFCC fuzz target (bench/fuzz.py runs it under atheris;
tests/authn/test_xfcc_fuzz_corpus.py replays tests/vectors/fuzz/xfcc/).

The header is the input's bytes as Latin-1 text (what a gRPC metadata value
can hold). parse_xfcc may refuse it only with AuthenticationFailed; what it
accepts must survive a round trip: the elements written back in the
grammar (quoting every value) parse to the same elements. The authenticator
on top either names the last element's identities or refuses with
AuthenticationFailed. Anything else is a finding.
"""

from __future__ import annotations

import ipaddress

from fastca.authn.caller import RequestInfo
from fastca.authn.xfcc import XFCC_HEADER, XfccAuthenticator, XfccElement, parse_xfcc
from fastca.errors import AuthenticationFailed

__all__ = ["Mismatch", "one_input", "write_xfcc"]

_AUTHENTICATOR = XfccAuthenticator(["127.0.0.0/8"])
_PEER = ipaddress.ip_address("127.0.0.1")
_CANONICAL = {"By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"}


class Mismatch(AssertionError):
    """parse_xfcc reads the same elements two ways."""


def write_xfcc(elements: list[XfccElement]) -> str:
    def quoted(value: str) -> str:
        return '"' + value.replace('"', '\\"') + '"'

    return ",".join(";".join(f"{key}={quoted(value)}" for key, value in element.pairs) for element in elements)


def one_input(data: bytes) -> None:
    header = data.decode("latin-1")
    try:
        elements = parse_xfcc(header)
    except AuthenticationFailed:
        elements = None
    if elements is not None:
        if not elements or any(not e.pairs for e in elements):
            raise Mismatch("an accepted header with an empty element")
        if any(key not in _CANONICAL or not all(" " <= c <= "~" for c in value)
               for e in elements for key, value in e.pairs):
            raise Mismatch("a key not canonical, or a value not printable ASCII")
        written = write_xfcc(elements)
        # A value ending in a backslash written quoted reads back as an escaped quote.
        if not any(value.endswith("\\") for e in elements for _, value in e.pairs) and len(written) <= 16 * 1024:
            if parse_xfcc(written) != elements:
                raise Mismatch(f"round trip: {written!r} reads as other elements")
    request = RequestInfo(metadata={XFCC_HEADER: header}, peer="ipv4:127.0.0.1:1", peer_ip=_PEER)
    try:
        caller = _AUTHENTICATOR.authenticate_now(request)
    except AuthenticationFailed:
        if elements is not None:
            last = elements[-1]
            if any(last.values("URI") + last.values("DNS")):
                raise Mismatch("an identity in the last element was refused") from None
        return
    if elements is None or caller is None:
        raise Mismatch("the authenticator accepted a header parse_xfcc refuses")
    last = elements[-1]
    if list(caller.identities) != [v for v in last.values("URI") + last.values("DNS") if v]:
        raise Mismatch("the caller's identities are not the last element's URI and DNS values")
