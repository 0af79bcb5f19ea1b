"""An example authenticator plug-in: static API keys.

Options: ``keys``, a table mapping the hex SHA-256 of each key to the
identity it stands for. Only hashes are configured, so the configuration
holds no usable secret. Registered in a package's metadata as

    [project.entry-points."fastca.authenticators"]
    apikey = "tests.authn.apikey_plugin:factory"
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from fastca.authn.caller import Caller, RequestInfo
from fastca.errors import AuthenticationFailed, ConfigurationError

HEADER = "x-api-key"


class ApiKeyAuthenticator:
    name = "apikey"

    def __init__(self, key_hashes: dict[str, str]) -> None:
        self._entries = [(bytes.fromhex(digest), identity) for digest, identity in key_hashes.items()]

    def __repr__(self) -> str:
        return f"ApiKeyAuthenticator({len(self._entries)} keys)"

    async def authenticate(self, request: RequestInfo) -> Caller | None:
        presented = request.metadata.get(HEADER)
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for expected, identity in self._entries:
            # Every entry is compared, in constant time, whatever matched.
            if hmac.compare_digest(digest, expected) and found is None:
                found = identity
        if found is None:
            raise AuthenticationFailed("unknown API key")
        return Caller(identities=(found,), credential_type=self.name)


def factory(options: dict[str, Any], trust_domain: str) -> ApiKeyAuthenticator:
    keys = options.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise ConfigurationError("apikey plug-in: options.keys must map sha256 hex digests to identities")
    for digest, identity in keys.items():
        if len(digest) != 64 or not isinstance(identity, str) or not identity.startswith(f"spiffe://{trust_domain}/"):
            raise ConfigurationError(f"apikey plug-in: bad entry for identity {identity!r}")
    return ApiKeyAuthenticator(keys)


def not_an_authenticator(options: dict[str, Any], trust_domain: str) -> object:
    return object()


def broken_factory(options: dict[str, Any], trust_domain: str) -> ApiKeyAuthenticator:
    raise RuntimeError(f"cannot use {options}")
