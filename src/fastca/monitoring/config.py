"""The ``[monitoring]`` section of fastca.toml: what the issuance monitor
watches, how hard each signal counts, and how much memory it may use.

    [monitoring]
    enabled = true
    learning_seconds = 86400          # quiet for a day after start: every workload renews once first
    half_life_seconds = 3600
    alert_threshold = 50
    [monitoring.policy.default]       # opt-in, per signer: what to do with a high-risk identity
    actions = ["fresh_token", "shorten_ttl"]
    [monitoring.weights]              # only the ones you change; 0 switches a signal off
    new_node = 5
    fan_out = 40

docs/monitoring.md explains every signal, its rule, its weight and the decay.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["MonitoringConfig", "RiskPolicyConfig", "RISK_ACTIONS", "SIGNALS", "SCORED_SIGNALS", "DEFAULT_WEIGHTS"]

# The signals, in the order they are checked. They are metric label values:
# this tuple is the whole, bounded set.
SIGNALS = ("new_identity", "key_reuse", "csr_replay", "burst", "new_node", "new_network", "ttl_outlier",
           "fan_out", "node_impersonation", "auth_failures")
# auth_failures is about a peer address, which is no identity: it is reported
# (alert, metric, log) but scores nothing, so it has no weight.
SCORED_SIGNALS = SIGNALS[:-1]

# What one alert adds to its subject's risk score (before decay). The default
# alert_threshold is 50: one strong signal (node_impersonation) is enough,
# a weak one (new_identity, new_node, new_network) never is alone.
DEFAULT_WEIGHTS: dict[str, float] = {
    "new_identity": 5.0,        # every new workload does this once: a hint, not evidence
    "key_reuse": 40.0,          # one private key behind two identities: a copied key or a broken agent
    "csr_replay": 30.0,         # agents sign a fresh CSR each time: the same bytes twice is a replay
    "burst": 30.0,              # many certificates fast: a stolen token being spent, or a crash loop
    "new_node": 10.0,           # rescheduling does this legitimately; weak on its own
    "new_network": 15.0,        # a source network the identity never used (same node)
    "ttl_outlier": 20.0,        # asking for much longer certificates than usual: persistence
    "fan_out": 30.0,            # a node agent suddenly asking for many identities it never served
    "node_impersonation": 50.0, # the node authorizer refused a node asking for a pod not on it
}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


RISK_ACTIONS = ("shorten_ttl", "fresh_token", "refuse")


class RiskPolicyConfig(_Section):
    """What a signer does for an identity whose risk score is at or above
    ``threshold`` (``[monitoring.policy.<signer>]``; "default" is the state
    directory's own CA). Without a table for a signer, monitoring only
    watches that signer's certificates."""

    # Any of: "shorten_ttl" (certificates of at most shortened_ttl_seconds),
    # "fresh_token" (a Kubernetes token is reviewed again, never taken from the
    # TokenReview cache), "refuse" (PERMISSION_DENIED; the others are moot then).
    actions: list[Literal["shorten_ttl", "fresh_token", "refuse"]] = Field(min_length=1)
    # Unset: [monitoring] alert_threshold.
    threshold: float | None = Field(None, gt=0)
    shortened_ttl_seconds: int = Field(3600, ge=60)

    @field_validator("actions")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return sorted(set(value), key=RISK_ACTIONS.index)


class MonitoringConfig(_Section):
    # Off by default: the tracker costs memory (bounded below) and a few µs
    # per issued certificate, and it changes nothing unless policy reads it.
    enabled: bool = False

    # --- following the audit log
    # How often each server process reads what was recorded since its last
    # read: an alert (and a policy action) follows its certificate within
    # about this long.
    poll_seconds: float = Field(1.0, gt=0, le=60)
    # At start, the recent log is read again (scored, not reported) so a
    # restarted process knows the mesh: this far back (0: not at all)...
    replay_seconds: float = Field(86_400.0, ge=0)
    # ...and never more records than this (a start-up cost: ~20 µs each).
    replay_max_records: int = Field(1_000_000, ge=0)

    # --- acting on the score, per signer name
    policy: dict[str, RiskPolicyConfig] = {}

    # --- memory bounds (every map is an LRU; an entry evicted and seen again counts as new)
    # Per-identity history (baselines, networks, nodes, TTL norm); also bounds the
    # table of risk scores. About 1.9 KB per tracked identity at the worst (scored,
    # with its key and CSR entries): ~190 MiB at the default bounds (bench/RESULTS.md).
    max_identities: int = Field(100_000, ge=1)
    # Per (caller, node) fan-out state; only impersonating callers (node agents,
    # ztunnel) have one, so this is about the number of nodes.
    max_callers: int = Field(20_000, ge=1)
    # Each of the two indexes, public-key hash -> identity and CSR hash: large
    # enough to hold two renewals of every tracked identity's pods.
    max_keys: int = Field(200_000, ge=1)
    # Peers with recent authentication failures.
    max_peers: int = Field(20_000, ge=1)

    # --- learning
    # History-based signals (new_identity, burst, new_network, new_node,
    # ttl_outlier, fan_out) stay quiet until the tracker has run this long. A
    # day covers one renewal of every workload at Istio's default 24 h TTL
    # (agents renew at half TTL); shorter, and identities that simply have not
    # renewed yet since the start look new. Tests set 0.
    learning_seconds: float = Field(86_400.0, ge=0)
    # An identity has history (new_network/new_node/ttl_outlier/burst apply to it)
    # once it has been tracked for this fraction of its usual TTL: past one
    # renewal of each of its pods (renewal at 0.5 of the TTL, plus jitter).
    identity_history_ttl_fraction: float = Field(0.6, ge=0)
    # ...but never longer than this (a 90-day certificate must not mean 54 days blind).
    identity_history_max_seconds: float = Field(86_400.0, ge=0)

    # --- the score
    # Each alert's weight halves every half_life_seconds; an identity that
    # behaves again is forgiven in a few hours.
    half_life_seconds: float = Field(3600.0, gt=0)
    # A score never exceeds this, so one noisy hour cannot keep an identity
    # high-risk for days.
    score_cap: float = Field(100.0, gt=0)
    # At or above this an identity is high-risk (what policy acts on).
    alert_threshold: float = Field(50.0, gt=0)
    # Per-signal weights; a partial table is completed from DEFAULT_WEIGHTS.
    # 0 switches the signal off (no alert, no score).
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    # How many recent signals explain() keeps per scored subject.
    recent_signals: int = Field(8, ge=1, le=64)

    # --- burst: short-term rate against the identity's own long-term rate
    # The short window: a burst is this many seconds of traffic.
    burst_window_seconds: float = Field(600.0, gt=0)
    # The baseline window: the identity's usual rate, over about a day (two
    # renewals of each pod at the default TTL).
    burst_baseline_seconds: float = Field(86_400.0, gt=0)
    # Absolute floor: fewer certificates than this in the short window never
    # alert, whatever the ratio (an identity renewing twice a day has a tiny
    # baseline). 20 in 10 minutes is far above any steady renewal of a
    # deployment under ~1,400 replicas.
    burst_min_count: float = Field(20.0, gt=0)
    # The short-term rate must be this many times the baseline.
    burst_factor: float = Field(10.0, gt=1)

    # --- ttl_outlier
    # A granted TTL above ttl_factor x the identity's usual TTL...
    ttl_factor: float = Field(4.0, gt=1)
    # ...and at least this much longer (minutes-long certificates stretching to
    # an hour are not worth an alert).
    ttl_min_excess_seconds: float = Field(3600.0, ge=0)
    # After this many outliers in a row the new TTL becomes the norm (a
    # deliberate configuration change alerts once, then is learned).
    ttl_adopt_after: int = Field(5, ge=1)

    # --- new_network / new_node: bounded sets per identity
    # An identity seen from more networks (nodes) than this is too spread out
    # for the signal to mean anything (a DaemonSet); it stops alerting on it.
    max_networks_per_identity: int = Field(8, ge=1, le=256)
    max_nodes_per_identity: int = Field(16, ge=1, le=1024)

    # --- fan_out: a (caller, node) asking for identities it never asked for before
    # The window the new identities are counted over (a decaying count).
    fan_out_window_seconds: float = Field(3600.0, gt=0)
    # Absolute floor: fewer new identities than this never alert (a node
    # gaining a few pods is routine).
    fan_out_min_identities: float = Field(20.0, gt=0)
    # ...and the new ones must be this many times the identities the caller
    # served before (a node receiving a drained node's pods is routine).
    fan_out_factor: float = Field(2.0, gt=0)
    # How long a caller remembers the identities it asked for (between half of
    # this and all of it): an identity renewed at least every half of it is
    # never new to its node. Two days covers renewal at half of a 24 h TTL
    # with margin. The memory is a fixed 512-byte filter per (caller, node),
    # so a node serving hundreds of identities costs no more than one serving
    # three; a filter answers "seen" wrongly ~1 % of the time at 110
    # identities, which only makes fan_out slightly less sensitive.
    fan_out_memory_seconds: float = Field(172_800.0, gt=0)

    # --- node_impersonation
    # One alert per caller per episode: refusals less than this apart belong
    # to the same episode.
    impersonation_quiet_seconds: float = Field(3600.0, gt=0)

    # --- auth_failures (global, by peer)
    auth_failure_window_seconds: float = Field(60.0, gt=0)
    # Failures from one peer within about the window; a misconfigured agent
    # retrying with backoff stays far below. 0 switches the signal off.
    auth_failure_threshold: float = Field(20.0, ge=0)

    @field_validator("weights")
    @classmethod
    def _known_non_negative_weights(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(SCORED_SIGNALS))
        if unknown:
            raise ValueError(f"no weight for {', '.join(unknown)}: the scored signals are "
                             f"{', '.join(SCORED_SIGNALS)} (auth_failures scores no identity)")
        negative = sorted(name for name, weight in value.items() if not weight >= 0)
        if negative:
            raise ValueError(f"weights must be >= 0 (0 switches a signal off): {', '.join(negative)}")
        return {**DEFAULT_WEIGHTS, **value}

    @model_validator(mode="after")
    def _threshold_reachable(self) -> MonitoringConfig:
        if self.alert_threshold > self.score_cap:
            raise ValueError(f"alert_threshold ({self.alert_threshold}) is above score_cap ({self.score_cap}): "
                             "no identity could ever be high-risk")
        for signer, rule in self.policy.items():
            if rule.threshold is not None and rule.threshold > self.score_cap:
                raise ValueError(f"policy.{signer}.threshold ({rule.threshold}) is above score_cap "
                                 f"({self.score_cap}): it could never act")
        if self.policy and not self.enabled:
            raise ValueError("[monitoring.policy] acts on risk scores: set [monitoring] enabled = true")
        return self

    def threshold_for(self, signer: str) -> float | None:
        """The score at which ``signer``'s policy acts; None: it has none."""
        rule = self.policy.get(signer)
        if rule is None:
            return None
        return rule.threshold if rule.threshold is not None else self.alert_threshold
