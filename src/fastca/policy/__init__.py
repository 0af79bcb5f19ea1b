"""Issuance policy: what a caller may get (TTL, identity, CSR rules)."""
