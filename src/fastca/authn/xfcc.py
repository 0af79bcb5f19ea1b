"""``x-forwarded-client-cert``: the client certificate a trusted proxy in
front of fastca terminated (Envoy's XFCC header).

Istio believes the header from loopback and merges every hop's identities;
fastca believes it only from configured networks and only the element the
trusted proxy appended — the last one. Every earlier element was written by
someone the proxy did not vouch for.

Grammar (Envoy): elements separated by ``,``; an element is ``key=value``
pairs separated by ``;``; keys (case-insensitive) By, Hash, Cert, Chain,
Subject, URI, DNS; a value containing ``,``, ``;`` or ``=`` is double-quoted
with ``"`` escaped as ``\\"``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from fastca.authn.caller import Caller, RequestInfo
from fastca.errors import AuthenticationFailed

__all__ = ["XFCC_HEADER", "XfccAuthenticator", "XfccElement", "parse_xfcc"]

XFCC_HEADER = "x-forwarded-client-cert"
KEYS = {"by": "By", "hash": "Hash", "cert": "Cert", "chain": "Chain", "subject": "Subject", "uri": "URI", "dns": "DNS"}
DEFAULT_MAX_BYTES = 16 * 1024


@dataclass(frozen=True)
class XfccElement:
    """One proxy's record: (canonical key, value) pairs in header order."""

    pairs: tuple[tuple[str, str], ...]

    def values(self, key: str) -> list[str]:
        return [v for k, v in self.pairs if k == key]


def _bad(why: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"malformed x-forwarded-client-cert: {why}")


def _printable(text: str) -> bool:
    return all(" " <= ch <= "~" for ch in text)


def parse_xfcc(header: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[XfccElement]:
    """Every element of the header, in order. Anything that does not follow
    the grammar raises AuthenticationFailed; nothing else escapes."""
    if len(header) > max_bytes:
        raise _bad(f"longer than {max_bytes} bytes")
    if not _printable(header):
        raise _bad("non-printable or non-ASCII characters")
    elements: list[XfccElement] = []
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(header)
    while True:
        # Lists joined by a proxy may carry optional whitespace after a separator.
        while i < n and header[i] in " \t":
            i += 1
        equals = header.find("=", i)
        if equals < 0:
            raise _bad("key without value")
        key = header[i:equals].strip(" \t")
        canonical = KEYS.get(key.lower())
        if canonical is None:
            raise _bad("unknown key")
        i = equals + 1
        if i < n and header[i] == '"':
            i += 1
            chars: list[str] = []
            while True:
                if i >= n:
                    raise _bad("unterminated quoted value")
                ch = header[i]
                if ch == "\\" and i + 1 < n and header[i + 1] == '"':
                    chars.append('"')
                    i += 2
                elif ch == '"':
                    i += 1
                    break
                else:
                    chars.append(ch)
                    i += 1
            value = "".join(chars)
            while i < n and header[i] in " \t":
                i += 1
            if i < n and header[i] not in ";,":
                raise _bad("text after a quoted value")
        else:
            start = i
            while i < n and header[i] not in ";,":
                if header[i] == '"':
                    raise _bad("quote inside an unquoted value")
                i += 1
            value = header[start:i].strip(" \t")
        pairs.append((canonical, value))
        if i >= n:
            elements.append(XfccElement(tuple(pairs)))
            return elements
        if header[i] == ",":
            elements.append(XfccElement(tuple(pairs)))
            pairs = []
        i += 1
        if i >= n:
            raise _bad("trailing separator")


def _mapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class XfccAuthenticator:
    """Identities from the ``URI=`` then ``DNS=`` values of the last XFCC
    element, if the TCP peer lies in a trusted network."""

    name = "xfcc"

    def __init__(self, trusted_cidrs: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network | str], *,
                 max_header_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) if isinstance(c, str) else c for c in trusted_cidrs)
        self.max_header_bytes = max_header_bytes

    def __repr__(self) -> str:
        return f"XfccAuthenticator(trusted={[str(n) for n in self.trusted]})"

    def _trusted_peer(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        if ip is None:
            return False
        ip = _mapped(ip)
        return any(ip.version == net.version and ip in net for net in self.trusted)

    async def authenticate(self, request: RequestInfo) -> Caller | None:
        return self.authenticate_now(request)

    def authenticate_now(self, request: RequestInfo) -> Caller | None:
        header = request.metadata.get(XFCC_HEADER)
        if header is None:
            return None
        if not self._trusted_peer(request.peer_ip):
            raise AuthenticationFailed(f"x-forwarded-client-cert from untrusted peer {request.peer}")
        elements = parse_xfcc(header, max_bytes=self.max_header_bytes)
        last = elements[-1]
        identities = [v for v in last.values("URI") + last.values("DNS") if v]
        if not identities:
            raise AuthenticationFailed("x-forwarded-client-cert names no URI or DNS identity")
        return Caller(identities=tuple(identities), credential_type="xfcc")
