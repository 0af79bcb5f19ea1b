"""Events the agent's parts report to their observer (metrics, logs)."""

from __future__ import annotations

from typing import Any, Callable

from fastca.observability.logging import get_logger

__all__ = ["EventSink", "emit"]

EventSink = Callable[..., None]
log = get_logger("fastca.agent.events")


def emit(on_event: EventSink | None, kind: str, name: str, **details: Any) -> None:
    """Report an event. An observer that fails must never break serving
    certificates, so its error is logged and swallowed here, in one place."""
    if on_event is None:
        return
    try:
        on_event(kind, name, **details)
    except Exception as error:  # noqa: BLE001 - see docstring
        log.error("agent event observer failed", kind=kind, resource=name, error=repr(error))
