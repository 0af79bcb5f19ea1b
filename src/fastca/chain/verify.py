"""Chain verification, by cryptography's path builder (never by hand).

Used wherever fastca must know that a certificate chains to a root: the CA's
own material when it is loaded, and the node agent checking what a CA
returned. The policy is deliberately permissive about extensions (Istio's
own sample CAs predate RFC 5280's strictness: no critical BasicConstraints,
no AKI); what it does require is a real path of signatures to a root in the
bundle, every certificate in date at ``at``, and BasicConstraints CA:TRUE on
every issuer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

__all__ = ["ChainInvalid", "verify_chain"]

_MAX_DEPTH = 8


class ChainInvalid(ValueError):
    """No path from the certificate to a root in the bundle."""


def _issuer_policy() -> ExtensionPolicy:
    # The path builder itself checks CA:TRUE on every issuer it uses.
    return ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)


def verify_chain(certificate: x509.Certificate, untrusted: Sequence[x509.Certificate],
                 roots: Sequence[x509.Certificate], *, at: dt.datetime) -> list[x509.Certificate]:
    """The verified path, ``certificate`` first and a root of ``roots`` last;
    ``untrusted`` may hold intermediates in any order (extra ones are ignored).
    Raises ChainInvalid with the verifier's reason."""
    if not roots:
        raise ChainInvalid("the root bundle is empty")
    verifier = (PolicyBuilder().store(Store(list(roots))).time(at.astimezone(dt.timezone.utc))
                .max_chain_depth(_MAX_DEPTH)
                .extension_policies(ca_policy=_issuer_policy(), ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier())
    if certificate in roots:
        if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
            raise ChainInvalid(f"the root {certificate.subject.rfc4514_string()!r} is not valid at {at:%Y-%m-%d %H:%M}Z")
        return [certificate]
    try:
        return list(verifier.verify(certificate, list(untrusted)).chain)
    except VerificationError as error:
        raise ChainInvalid(str(error)) from None
