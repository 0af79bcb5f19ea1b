"""Certificate chains: the layout agents expect, and verifying a path to a root."""

from fastca.chain.istio import istio_chain_tail
from fastca.chain.verify import ChainInvalid, verify_chain

__all__ = ["ChainInvalid", "istio_chain_tail", "verify_chain"]
