"""The issuance pipeline: the issuer (and, with the server, the batcher)."""
