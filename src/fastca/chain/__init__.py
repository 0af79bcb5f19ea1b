"""Response chains in the layout agents expect."""

from fastca.chain.istio import istio_chain_tail

__all__ = ["istio_chain_tail"]
