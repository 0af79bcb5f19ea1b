"""istiod's authentication order: try each authenticator in turn; the first
that yields a caller wins. Authenticators that can decide without I/O
(``authenticate_now``) are asked that way first, so the front end needs no
coroutine for a caller it can judge at once.

Work before authentication is bounded per peer address: at most
``max_pending_per_peer`` calls from one IP may be waiting on an
authenticator that goes to the network; past that a call is refused
(``Overloaded``, RESOURCE_EXHAUSTED) before any request is made. An
authenticator that could not judge the credential (``AuthenticatorUnavailable``:
its API server or issuer did not answer) makes the whole verdict
UNAVAILABLE unless another authenticator accepts the caller."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastca.authn.caller import PENDING, Authenticator, Caller, RequestInfo
from fastca.errors import AuthenticationFailed, AuthenticatorUnavailable, Overloaded

__all__ = ["AuthenticatorChain"]

log = logging.getLogger(__name__)


class AuthenticatorChain:
    """Authenticators tried in order. One that returns None (no credential of
    its kind) or raises AuthenticationFailed is skipped and its reason kept;
    if none yields a caller the chain raises AuthenticationFailed whose
    detail joins the reasons and whose public message stays istiod's
    "request authenticate failure"."""

    def __init__(self, authenticators: Sequence[Authenticator], *, max_pending_per_peer: int = 64) -> None:
        self.authenticators: tuple[Authenticator, ...] = tuple(authenticators)
        self.max_pending_per_peer = max_pending_per_peer
        # peer address -> calls from it awaiting a slow authenticator; an
        # entry exists only while its count is above zero.
        self._pending: dict[str, int] = {}

    def pending(self, peer: str) -> int:
        return self._pending.get(peer, 0)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.authenticators)

    def authenticate_now(self, request: RequestInfo) -> Caller | None:
        """The verdict without awaiting, when every authenticator that has to
        be asked can answer at once (a client certificate, a cached
        TokenReview, XFCC); None when one of them must wait for I/O, and
        ``authenticate`` must be awaited instead. Raises as it does."""
        outcome, _, reasons = self._run_now(request, 0, _Reasons())
        if outcome is PENDING:
            return None
        return self._verdict(outcome, reasons)

    async def authenticate(self, request: RequestInfo, *, fresh: bool = False) -> Caller:
        """``fresh``: no remembered verdict is used (an authenticator that
        caches one, ``caches_verdicts``, is asked the slow way): risk policy's
        fresh_token."""
        outcome, index, reasons = self._run_now(request, 0, _Reasons(), fresh)
        if outcome is not PENDING:
            return self._verdict(outcome, reasons)
        # Some authenticator has to go to the network: the caller's address
        # takes a place among its pending calls for as long as that lasts.
        peer = str(request.peer_ip) if request.peer_ip is not None else request.peer
        pending = self._pending.get(peer, 0)
        if pending >= self.max_pending_per_peer:
            raise Overloaded(f"{pending} calls from {peer} already awaiting authentication",
                             public_message=f"too many calls from this address awaiting authentication "
                             f"(at most {self.max_pending_per_peer} at once): wait for them to finish, retry with "
                             f"backoff, or raise [authn] max_pending_per_peer")
        self._pending[peer] = pending + 1
        try:
            return await self._slowly(request, outcome, index, reasons, fresh)
        finally:
            left = self._pending[peer] - 1
            if left:
                self._pending[peer] = left
            else:
                del self._pending[peer]

    async def _slowly(self, request: RequestInfo, outcome: object, index: int, reasons: _Reasons,
                      fresh: bool) -> Caller:
        while True:
            if outcome is not PENDING:
                return self._verdict(outcome, reasons)
            # This authenticator has to wait: ask it the slow way, then go on.
            authenticator = self.authenticators[index]
            try:
                if fresh and getattr(authenticator, "caches_verdicts", False):
                    caller = await authenticator.authenticate(request, fresh=True)
                else:
                    caller = await authenticator.authenticate(request)
            except (AuthenticationFailed, AuthenticatorUnavailable) as exc:
                reasons.refused(authenticator.name, exc)
                caller = None
            except Exception as exc:
                log.exception("authenticator %s raised unexpectedly", authenticator.name)
                reasons.append(f"{authenticator.name}: unexpected {type(exc).__name__}")
                caller = None
            if caller is not None:
                accepted = self._accept(authenticator, caller, reasons)
                if accepted is not None:
                    return accepted
            outcome, index, reasons = self._run_now(request, index + 1, reasons, fresh)

    def _run_now(self, request: RequestInfo, start: int, reasons: _Reasons,
                 fresh: bool = False) -> tuple[Caller | object | None, int, _Reasons]:
        """Ask authenticators from ``start`` on without awaiting: (a caller,
        or None when all declined, or PENDING; the index reached; reasons)."""
        for index in range(start, len(self.authenticators)):
            authenticator = self.authenticators[index]
            now = getattr(authenticator, "authenticate_now", None)
            if now is None or (fresh and getattr(authenticator, "caches_verdicts", False)):
                return PENDING, index, reasons
            try:
                caller = now(request)
            except (AuthenticationFailed, AuthenticatorUnavailable) as exc:
                reasons.refused(authenticator.name, exc)
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
    def _accept(authenticator: Authenticator, caller: object, reasons: _Reasons) -> Caller | None:
        if not isinstance(caller, Caller) or not caller.identities:
            reasons.append(f"{authenticator.name}: returned no identities")
            return None
        return caller

    @staticmethod
    def _verdict(outcome: Caller | object | None, reasons: _Reasons) -> Caller:
        if isinstance(outcome, Caller):
            return outcome
        detail = "; ".join(reasons or ["no credentials"])
        if reasons.unavailable:
            # One of them might have accepted the caller had it answered.
            raise AuthenticatorUnavailable(detail)
        raise AuthenticationFailed(detail)

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


class _Reasons(list[str]):
    """Why each authenticator declined, for the verdict's detail; and whether
    one of them could not judge at all (its check went unanswered), which
    makes the verdict UNAVAILABLE rather than UNAUTHENTICATED."""

    unavailable = False

    def refused(self, name: str, error: Exception) -> None:
        if isinstance(error, AuthenticatorUnavailable):
            self.unavailable = True
            self.append(f"unavailable {name}: {error}")
        else:
            self.append(f"{name}: {error}")
