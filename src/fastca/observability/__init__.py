"""Metrics (Prometheus, with Istio's names) and structured logs (structlog JSON)."""

from fastca.observability.logging import (
                                          bind_request,
                                          configure_logging,
                                          current_request_id,
                                          get_logger,
                                          new_request_id,
                                          redact,
)
from fastca.observability.metrics import SIGN_ERROR_KINDS, Metrics

__all__ = ["Metrics", "SIGN_ERROR_KINDS", "bind_request", "configure_logging", "current_request_id",
           "get_logger", "new_request_id", "redact"]
