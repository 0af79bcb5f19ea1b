"""Authenticators from other packages: the ``fastca.authenticators`` entry
point group. Each entry point is a factory

    factory(options: dict, trust_domain: str) -> Authenticator

enabled by name in ``[[authn.plugins]]`` with its ``options`` table."""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any

from fastca.authn.caller import Authenticator
from fastca.errors import ConfigurationError

__all__ = ["ENTRY_POINT_GROUP", "available_plugins", "load_plugin"]

ENTRY_POINT_GROUP = "fastca.authenticators"


def available_plugins() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_plugin(name: str, options: dict[str, Any], trust_domain: str) -> Authenticator:
    found = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
    if not found:
        raise ConfigurationError(f"no authenticator plug-in {name!r} installed (entry point group "
                                 f"{ENTRY_POINT_GROUP}; installed: {available_plugins()})")
    if len({ep.value for ep in found}) > 1:
        raise ConfigurationError(f"authenticator plug-in {name!r} is provided by several packages: "
                                 f"{sorted(ep.value for ep in found)}")
    try:
        factory = found[0].load()
        authenticator = factory(dict(options), trust_domain)
    except ConfigurationError:
        raise
    except Exception as exc:
        # The plug-in's own message may quote its options: it stays in the cause only.
        raise ConfigurationError(f"authenticator plug-in {name!r} failed to load: {type(exc).__name__}") from exc
    if not isinstance(authenticator, Authenticator) or not inspect.iscoroutinefunction(authenticator.authenticate):
        raise ConfigurationError(f"authenticator plug-in {name!r} did not return an Authenticator "
                                 "(a `name` and an `async authenticate(request)`)")
    return authenticator
