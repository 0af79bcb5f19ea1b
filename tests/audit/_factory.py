"""Records for tests."""

from __future__ import annotations

import datetime as dt
import os

from fastca.audit.record import IssuanceRecord

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def make_record(i: int = 0, *, serial: str | None = None, identity: str | None = None,
                issued_at: dt.datetime | None = None) -> IssuanceRecord:
    return IssuanceRecord(
        serial=serial or os.urandom(16).hex(),
        identity=identity or f"spiffe://cluster.local/ns/ns{i % 7}/sa/sa{i}",
        caller_identities=(f"spiffe://cluster.local/ns/ns{i % 7}/sa/sa{i}",),
        credential_type="k8s-tokenreview",
        key_type="ec-p256",
        not_before=T0,
        not_after=T0 + dt.timedelta(hours=24),
        signer="default",
        fingerprint_sha256=os.urandom(32).hex(),
        peer=f"ipv4:10.0.0.{i % 250}:5{i % 10000:04d}",
        request_id=os.urandom(8).hex(),
        issued_at=issued_at or T0 + dt.timedelta(seconds=i),
        impersonated=False,
        cluster_id="Kubernetes",
        spki_sha256=os.urandom(32).hex(),
        csr_sha256=os.urandom(32).hex(),
        node=f"node-{i % 3}",
    )
