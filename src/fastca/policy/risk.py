"""Risk policy: what one signer does with a caller whose identity the
issuance monitor scores high-risk (``[monitoring.policy.<signer>]``).

Checked in admission, after the identity is known and static policy passed:
a dict lookup for an identity with no score, so an ordinary request pays
nothing it would notice. The actions, strongest first:

    refuse        PERMISSION_DENIED, with a message saying why and what to do
    fresh_token   a caller judged by a cached TokenReview is reviewed again
                  (FreshCredentialRequired: the front end re-authenticates)
    shorten_ttl   the certificate lives at most shortened_ttl_seconds
"""

from __future__ import annotations

from typing import Protocol

from fastca.authn.caller import Caller
from fastca.errors import FreshCredentialRequired, PolicyDenied
from fastca.monitoring.tracker import caller_subject

__all__ = ["RiskPolicy", "RiskScores", "CACHED_CREDENTIALS"]

# Credentials whose verdict is remembered between calls (the TokenReview cache).
CACHED_CREDENTIALS = frozenset({"k8s-tokenreview"})

class RiskScores(Protocol):
    """Where scores are read (fastca.monitoring.tracker.IssuanceMonitor)."""

    def score(self, identity: str, at: float | None = None) -> float: ...


class RiskPolicy:
    def __init__(self, scores: RiskScores, *, threshold: float, actions: tuple[str, ...] | list[str],
                 shortened_ttl_seconds: int) -> None:
        self._scores = scores
        self.threshold = threshold
        self.refuse = "refuse" in actions
        self.fresh_token = "fresh_token" in actions
        self.shortened_ttl_seconds = shortened_ttl_seconds if "shorten_ttl" in actions else None

    def check(self, identity: str, caller: Caller, *, fresh_credential: bool,
              impersonated: bool = False, node: str = "") -> int | None:
        """None when the identity is not high-risk or nothing applies; else
        the TTL cap to issue under, or raise what the policy says. A node
        agent asking on a workload's behalf is judged by the higher of the
        two scores: a node agent fanning out is the risk, not the workloads."""
        score = self._scores.score(identity)
        if impersonated and caller.identities:
            score = max(score, self._scores.score(caller_subject(caller.identities[0], node)))
        if score < self.threshold:
            return None
        if self.refuse:
            raise PolicyDenied(
                f"{identity} has risk score {score:.0f} (threshold {self.threshold:g}): refused by risk policy",
                public_message=(f"request denied by CA policy: recent certificate requests for this identity look "
                                f"anomalous (risk score {score:.0f}, threshold {self.threshold:g}). An operator can "
                                f"see why with `fastca risk`; the score decays on its own once the requests look "
                                f"normal again"))
        if self.fresh_token and not (fresh_credential or caller.judged_now) \
                and caller.credential_type in CACHED_CREDENTIALS:
            raise FreshCredentialRequired(f"{identity} has risk score {score:.0f}: its token is reviewed again")
        return self.shortened_ttl_seconds
