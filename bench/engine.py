"""fastca's issuance engine without RPC, authentication or audit: an
Authority's batch stages (validity, prepare, sign, assemble, profile check)
run directly on batches of CSRs, for the offline and raw-limit benchmarks.

The Authority is the product's own (its stages as listed there); only the
record stage is left out, so what is measured is the native core plus the
signer. Its audit log is a throwaway SQLite file that is never written.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

from fastca.audit.sqlite_log import SqliteAuditLog
from fastca.authority import Admission, Authority, IssuedCertificate, IssueRequest
from fastca.authority.stages import Work
from fastca.ca.certificates import self_signed_root
from fastca.ca.material import validate_material
from fastca.clock import SYSTEM_CLOCK
from fastca.config import IssuanceConfig, PolicyConfig
from fastca.policy.request import RequestPolicy

__all__ = ["Engine"]

IDENTITY = "spiffe://cluster.local/ns/bench/sa/workload"


class Engine:
    """A self-signed CA on ``signer`` and its Authority's batch stages."""

    def __init__(self, signer) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        root = self_signed_root(signer, "cluster.local", now=now)
        self.root = root
        self._directory = tempfile.TemporaryDirectory(prefix="fastca-engine-")
        self._audit = SqliteAuditLog(Path(self._directory.name) / "unused.db")
        admission = Admission(signer="default", trust_domain="cluster.local",
                              policy=RequestPolicy(PolicyConfig()), node_authorizer=None)
        self.authority = Authority("default", validate_material(root, [], [root], now), signer,
                                   issuance=IssuanceConfig(), admission=admission, audit=self._audit,
                                   clock=SYSTEM_CLOCK)
        self._stages = [stage for stage in self.authority.stages if stage.name not in ("admission", "record")]

    def issue_batch(self, csrs: list[bytes], identity: str = IDENTITY) -> list[IssuedCertificate]:
        works = [Work(IssueRequest(csr, identity), None, record=False) for csr in csrs]
        for stage in self._stages:
            stage.run(works)
        failed = [work.outcome for work in works if not isinstance(work.outcome, IssuedCertificate)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(works)} failed: {failed[0]!r}")
        return [work.outcome for work in works]  # type: ignore[misc]

    def close(self) -> None:
        self._audit.close()
        self._directory.cleanup()
