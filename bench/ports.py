"""A free TCP port on 127.0.0.1, for servers that must be told a fixed port
(``cfssl serve``; ``fastca serve --workers``, whose processes share one).
Another process could take it between this check and the server's bind; on
a benchmark machine that is rare, and the server's start then fails loudly."""

from __future__ import annotations

import socket

__all__ = ["free_loopback_port"]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
