"""An Authority as tests drive it: the real stages, signer and native core,
over a real SQLite audit log in a temporary directory."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from fastca.audit.record import IssuanceContext
from fastca.audit.sqlite_log import SqliteAuditLog
from fastca.authority import Admission, Authority, IssuedCertificate, IssueRequest, Outcome
from fastca.ca.material import CAMaterial
from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.config import IssuanceConfig, PolicyConfig
from fastca.policy.request import RequestPolicy

_databases = itertools.count()


def context(i: int = 0, caller: str = "spiffe://cluster.local/ns/test/sa/caller") -> IssuanceContext:
    return IssuanceContext(caller_identities=(caller,), credential_type="k8s-jwt", signer="default",
                           peer=f"ipv4:127.0.0.1:{40000 + i}", request_id=f"req-{i}", cluster_id="Kubernetes")


def admission(trust_domain: str = "cluster.local", policy: PolicyConfig | None = None,
              clock: Clock = SYSTEM_CLOCK) -> Admission:
    return Admission(signer="default", trust_domain=trust_domain,
                     policy=RequestPolicy(policy or PolicyConfig(), clock=clock), node_authorizer=None)


class Issuing:
    """``issue`` / ``issue_many`` submit already-admitted requests (each with
    its own IssuanceContext) and wait on a private event loop. One loop for
    the Authority's whole life, as in the server: the batcher hands the end
    of a batch back to the loop it ran on (``call_soon_threadsafe``), and a
    loop per call (``asyncio.run``) could be closed before that hand-back
    ran, leaving the batcher's thread counted busy and the next call hung."""

    def __init__(self, material: CAMaterial, signer, directory: Path, *, issuance: IssuanceConfig | None = None,
                 clock: Clock = SYSTEM_CLOCK, audit: SqliteAuditLog | None = None, **settings) -> None:
        self.audit = audit or SqliteAuditLog(directory / f"audit-{next(_databases)}.db")
        self.authority = Authority("default", material, signer, issuance=issuance or IssuanceConfig(),
                                   admission=admission(clock=clock), audit=self.audit, clock=clock, **settings)
        self._loop = asyncio.new_event_loop()

    def issue_many(self, requests: list[IssueRequest]) -> list[Outcome]:
        admitted = [(request, context(i)) for i, request in enumerate(requests)]
        return self._loop.run_until_complete(self.authority.issue_many_admitted(admitted))

    def issue(self, request: IssueRequest) -> IssuedCertificate:
        outcome = self.issue_many([request])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def close(self) -> None:
        self._loop.close()
        self.audit.close()
