"""Istio's response layout: leaf first, then each intermediate as its own
element, then the whole root bundle (possibly several roots) as the last
element; every element ends with a newline. Agents reject fewer than two
elements, which the root bundle guarantees even for a self-signed CA."""

from __future__ import annotations

from typing import Sequence

__all__ = ["istio_chain_tail"]


def istio_chain_tail(intermediate_pems: Sequence[str], root_bundle_pem: str) -> tuple[str, ...]:
    """The elements that follow every leaf; computed once per CA and root
    bundle (the Authority swaps it when the bundle changes)."""
    def terminated(pem: str) -> str:
        return pem if pem.endswith("\n") else pem + "\n"

    if not root_bundle_pem.strip():
        raise ValueError("the root bundle is empty")
    return (*(terminated(p) for p in intermediate_pems), terminated(root_bundle_pem))
