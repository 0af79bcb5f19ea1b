"""The Authority: every certificate, whatever asked for it, through one
ordered, audited path (see authority.py for the stages)."""

from fastca.authority.admission import SERVER_PRINCIPAL, Admission, LocalPrincipal
from fastca.authority.authority import Authorities, Authority, Outcome
from fastca.authority.loading import load_authority
from fastca.authority.request import IssuedCertificate, IssueRequest

__all__ = ["SERVER_PRINCIPAL", "Admission", "Authorities", "Authority", "IssueRequest", "IssuedCertificate",
           "LocalPrincipal", "Outcome", "load_authority"]
