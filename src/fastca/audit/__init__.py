"""The issuance audit log: every certificate recorded durably before it is returned.

    log = open_audit_log(AuditConfig(), state_dir)
    await log.record(IssuanceRecord.from_issued(issued, caller_identities=..., ...))
    # only now send the certificate; CANotReady / Overloaded mean: do not.

The server's pipeline records a whole batch at once, from its worker thread:
``log.record_many_then(records, on_done)``. ``[audit] database`` puts the log
in PostgreSQL (``fastca.audit.postgres_log``) instead of the SQLite file.
"""

from fastca.audit.config import AuditConfig, audit_path, open_audit_log, open_audit_reader
from fastca.audit.group_commit import GroupCommitLog
from fastca.audit.record import IssuanceContext, IssuanceRecord, normalize_serial
from fastca.audit.sqlite_log import AuditReader, SqliteAuditLog

__all__ = ["AuditConfig", "AuditReader", "GroupCommitLog", "IssuanceContext", "IssuanceRecord", "SqliteAuditLog",
           "audit_path", "normalize_serial", "open_audit_log", "open_audit_reader"]
