"""istiod's authentication order: try each authenticator in turn; the first
that yields a caller wins. Authenticators that can decide without I/O
(``authenticate_now``) are asked that way first, so the front end needs no
coroutine for a caller it can judge at once."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastca.authn.caller import PENDING, Authenticator, Caller, RequestInfo
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

    def authenticate_now(self, request: RequestInfo) -> Caller | None:
        """The verdict without awaiting, when every authenticator that has to
        be asked can answer at once (a client certificate, a cached
        TokenReview, XFCC); None when one of them must wait for I/O, and
        ``authenticate`` must be awaited instead. Raises as it does."""
        outcome, _, reasons = self._run_now(request, 0, [])
        if outcome is PENDING:
            return None
        return self._verdict(outcome, reasons)

    async def authenticate(self, request: RequestInfo) -> Caller:
        reasons: list[str] = []
        start = 0
        while True:
            outcome, index, reasons = self._run_now(request, start, reasons)
            if outcome is not PENDING:
                return self._verdict(outcome, reasons)
            # This authenticator has to wait: ask it the slow way, then go on.
            authenticator = self.authenticators[index]
            try:
                caller = await authenticator.authenticate(request)
            except AuthenticationFailed as exc:
                reasons.append(f"{authenticator.name}: {exc}")
                caller = None
            except Exception as exc:
                log.exception("authenticator %s raised unexpectedly", authenticator.name)
                reasons.append(f"{authenticator.name}: unexpected {type(exc).__name__}")
                caller = None
            if caller is not None:
                accepted = self._accept(authenticator, caller, reasons)
                if accepted is not None:
                    return accepted
            start = index + 1

    def _run_now(self, request: RequestInfo, start: int,
                 reasons: list[str]) -> tuple[Caller | object | None, int, list[str]]:
        """Ask authenticators from ``start`` on without awaiting: (a caller,
        or None when all declined, or PENDING; the index reached; reasons)."""
        for index in range(start, len(self.authenticators)):
            authenticator = self.authenticators[index]
            now = getattr(authenticator, "authenticate_now", None)
            if now is None:
                return PENDING, index, reasons
            try:
                caller = now(request)
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
            if caller is PENDING:
                return PENDING, index, reasons
            if caller is None:
                continue
            accepted = self._accept(authenticator, caller, reasons)
            if accepted is not None:
                return accepted, index, reasons
        return None, len(self.authenticators), reasons

    @staticmethod
    def _accept(authenticator: Authenticator, caller: object, reasons: list[str]) -> Caller | None:
        if not isinstance(caller, Caller) or not caller.identities:
            reasons.append(f"{authenticator.name}: returned no identities")
            return None
        return caller

    @staticmethod
    def _verdict(outcome: Caller | object | None, reasons: list[str]) -> Caller:
        if isinstance(outcome, Caller):
            return outcome
        raise AuthenticationFailed("; ".join(reasons or ["no credentials"]))

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
