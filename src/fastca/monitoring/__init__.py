"""Issuance monitoring: anomaly signals over what the CA issues and
refuses, and a decaying, explainable risk score per identity that policy can
act on (docs/monitoring.md). Depends on nothing above ``fastca.clock``."""

from fastca.monitoring.config import DEFAULT_WEIGHTS, SCORED_SIGNALS, SIGNALS, MonitoringConfig
from fastca.monitoring.tracker import Alert, IssuanceMonitor, Observation, caller_subject, network_of

__all__ = ["MonitoringConfig", "SIGNALS", "SCORED_SIGNALS", "DEFAULT_WEIGHTS", "IssuanceMonitor", "Observation",
           "Alert", "caller_subject", "network_of"]
