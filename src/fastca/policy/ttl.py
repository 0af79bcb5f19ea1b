"""Certificate lifetime, as istiod decides it (docs/istio-contract.md)."""

from __future__ import annotations

from fastca.errors import InvalidTTL, SigningFailed

__all__ = ["validity_window"]


def validity_window(requested_ttl: int | None, *, now: int, default_ttl: int, max_ttl: int,
                    backdate: int, signer_not_after: int, clamp_to_max: bool = False) -> tuple[int, int]:
    """(not_before, not_after) in unix seconds.

    ``requested_ttl`` <= 0 or None means the default; above ``max_ttl`` is
    rejected (agents do not retry InvalidArgument, so the message says what
    the limit is) unless ``clamp_to_max``, istio-csr's behaviour. NotAfter
    never passes the signing certificate's NotAfter.
    """
    ttl = default_ttl if requested_ttl is None or requested_ttl <= 0 else requested_ttl
    if ttl > max_ttl:
        if not clamp_to_max:
            raise InvalidTTL(f"requested TTL {requested_ttl}s is greater than the max allowed TTL {max_ttl}s")
        ttl = max_ttl
    if signer_not_after <= now:
        raise SigningFailed("the signing certificate has expired",
                            public_message="failed to sign: the CA signing certificate has expired")
    return now - backdate, min(now + ttl, signer_not_after)
