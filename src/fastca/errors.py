"""The exception tree, and what each member means to a gRPC client.

Every error fastca raises on purpose is a ``FastcaError``. Each carries two
texts: ``public_message`` is safe to show to a client (it names the problem
and what to do about it); ``str(error)`` / ``__cause__`` hold the internal
detail for logs. Neither ever contains a PIN, key or token.

    FastcaError                  gRPC status
    ├── InvalidRequest           INVALID_ARGUMENT   bad CSR, bad identity, bad metadata
    │   └── InvalidTTL           INVALID_ARGUMENT   TTL above the maximum
    ├── AuthenticationFailed     UNAUTHENTICATED    no or bad credentials, impersonation denied
    │   └── FreshCredentialRequired (internal)      risk policy wants the token reviewed again: the
    │                                               front end re-authenticates without the cache
    ├── AuthenticatorUnavailable UNAVAILABLE        the credential could not be judged (API server or
                                                    issuer down, timed out): retried, never cached
    ├── PolicyDenied             PERMISSION_DENIED  authenticated, but policy forbids it now or from here
    ├── Overloaded               RESOURCE_EXHAUSTED queue full (agents retry it)
    ├── CANotReady               UNAVAILABLE        no usable CA material or HSM (retried)
    ├── CANotValid               FAILED_PRECONDITION the CA's certificates are not valid at this time
                                                    (not yet, or expired): nothing it signed would verify
    ├── SigningFailed            INTERNAL           signer error, signature did not verify,
    │                                               signing certificate expired
    └── ConfigurationError       (not an RPC error) bad config, state dir, PKCS#11 URI, import
"""

from __future__ import annotations

__all__ = [
    "FastcaError",
    "InvalidRequest",
    "InvalidTTL",
    "AuthenticationFailed",
    "FreshCredentialRequired",
    "AuthenticatorUnavailable",
    "PolicyDenied",
    "Overloaded",
    "CANotReady",
    "CANotValid",
    "SigningFailed",
    "ConfigurationError",
    "GRPC_STATUS",
    "grpc_status_of",
]


class FastcaError(Exception):
    """Base of every deliberate fastca error."""

    public_message = "internal error"

    def __init__(self, detail: str, public_message: str | None = None) -> None:
        super().__init__(detail)
        if public_message is not None:
            self.public_message = public_message


class InvalidRequest(FastcaError):
    public_message = "invalid certificate request"

    def __init__(self, detail: str, public_message: str | None = None) -> None:
        # Bad input is the client's own: the detail is what they need to fix it.
        super().__init__(detail, public_message if public_message is not None else detail)


class InvalidTTL(InvalidRequest):
    """Separate so metrics can count it as Istio's TTL_ERROR."""


class AuthenticationFailed(FastcaError):
    public_message = "request authenticate failure"


class FreshCredentialRequired(AuthenticationFailed):
    """Admission's answer for a high-risk identity whose signer's risk policy
    asks for a fresh token while its caller was judged by a cached
    TokenReview. The front end authenticates the call again without the
    cache and admits it again; only if that is impossible does a client see
    it (as the authentication failure it is a subclass of)."""


class AuthenticatorUnavailable(FastcaError):
    """The credential may be good, but what judges it did not answer (a
    TokenReview that timed out, an API server returning 5xx). Not a verdict
    on the caller: it does not count against its connection and is never
    remembered as a rejection."""

    public_message = "authentication is unavailable, retry later"


class PolicyDenied(FastcaError):
    public_message = "request denied by CA policy"


class Overloaded(FastcaError):
    public_message = "server overloaded, retry later"


class CANotReady(FastcaError):
    public_message = "CA is not ready"


class CANotValid(FastcaError):
    public_message = "the CA's signing certificate is not valid at this time"


class SigningFailed(FastcaError):
    public_message = "failed to sign the certificate"


class ConfigurationError(FastcaError):
    public_message = "configuration error"

    def __init__(self, detail: str, public_message: str | None = None) -> None:
        super().__init__(detail, public_message if public_message is not None else detail)


def grpc_status_of(error: FastcaError) -> str:
    """The status name for an error, by its nearest class in the tree."""
    for cls in type(error).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]
    return "INTERNAL"


# Status names as in grpc.StatusCode, kept as strings so this module does not
# import grpc.
GRPC_STATUS: dict[type[FastcaError], str] = {
    InvalidRequest: "INVALID_ARGUMENT",
    AuthenticationFailed: "UNAUTHENTICATED",
    AuthenticatorUnavailable: "UNAVAILABLE",
    PolicyDenied: "PERMISSION_DENIED",
    Overloaded: "RESOURCE_EXHAUSTED",
    CANotReady: "UNAVAILABLE",
    CANotValid: "FAILED_PRECONDITION",
    SigningFailed: "INTERNAL",
    ConfigurationError: "INTERNAL",
}
