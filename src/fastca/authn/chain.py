"""istiod's authentication order: try each authenticator in turn; the first
that yields a caller wins."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastca.authn.caller import Authenticator, Caller, RequestInfo
from fastca.errors import AuthenticationFailed

__all__ = ["AuthenticatorChain"]

log = logging.getLogger(__name__)


class AuthenticatorChain:
    """Authenticators tried in order. One that returns None (no credential of
    its kind) or raises AuthenticationFailed is skipped and its reason kept;
    if none yields a caller the chain raises AuthenticationFailed whose
    detail joins the reasons and whose public message stays istiod's
    "request authenticate failure"."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators: tuple[Authenticator, ...] = tuple(authenticators)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.authenticators)

    async def authenticate(self, request: RequestInfo) -> Caller:
        reasons: list[str] = []
        for authenticator in self.authenticators:
            try:
                caller = await authenticator.authenticate(request)
            except AuthenticationFailed as exc:
                reasons.append(f"{authenticator.name}: {exc}")
                continue
            except Exception as exc:
                # A bug or an outage in one authenticator is that
                # authenticator's failure, never an escaped error: the next
                # one may still authenticate the caller. The message may come
                # from third-party code, so only its type goes in the reason.
                log.exception("authenticator %s raised unexpectedly", authenticator.name)
                reasons.append(f"{authenticator.name}: unexpected {type(exc).__name__}")
                continue
            if caller is None:
                continue
            if not isinstance(caller, Caller) or not caller.identities:
                reasons.append(f"{authenticator.name}: returned no identities")
                continue
            return caller
        if not reasons:
            reasons.append("no credentials")
        raise AuthenticationFailed("; ".join(reasons))

    async def aclose(self) -> None:
        """Release what the authenticators hold (HTTP connection pools)."""
        for authenticator in self.authenticators:
            close = getattr(authenticator, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing authenticator %s failed", authenticator.name)

    def __repr__(self) -> str:
        return f"AuthenticatorChain({list(self.names)})"
