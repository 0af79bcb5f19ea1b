"""The audit log's reads, written once for every backend.

A backend's reader says how its database spells a parameter (``?``, ``%s``),
how it takes a time, how a row becomes a record, and runs the query.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from typing import Any, Sequence

from fastca.audit.record import IssuanceRecord, normalize_serial

__all__ = ["RecordQueries", "COLUMNS"]

COLUMNS = ("serial", "identity", "caller_identities", "credential_type", "key_type", "not_before",
           "not_after", "signer", "fingerprint_sha256", "peer", "request_id", "issued_at",
           "impersonated", "cluster_id")


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


class RecordQueries(ABC):
    table = "issuance"
    placeholder = "?"

    @abstractmethod
    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        ...

    def _time(self, value: dt.datetime) -> Any:
        return value

    @abstractmethod
    def _record(self, row: Sequence[Any]) -> IssuanceRecord:
        ...

    @property
    def _select(self) -> str:
        return f"SELECT {', '.join(COLUMNS)} FROM {self.table}"

    def list(self, limit: int = 50, identity: str | None = None, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> list[IssuanceRecord]:
        """Records, newest first; ``since`` inclusive, ``until`` exclusive."""
        where: list[str] = []
        parameters: list[Any] = []
        p = self.placeholder
        if identity is not None:
            where.append(f"identity = {p}")
            parameters.append(identity)
        if since is not None:
            where.append(f"issued_at >= {p}")
            parameters.append(self._time(_aware(since)))
        if until is not None:
            where.append(f"issued_at < {p}")
            parameters.append(self._time(_aware(until)))
        sql = self._select + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY issued_at DESC, id DESC LIMIT {p}"
        parameters.append(max(0, int(limit)))
        return [self._record(row) for row in self._query(sql, parameters)]

    def get(self, serial: str | int) -> IssuanceRecord | None:
        rows = self._query(f"{self._select} WHERE serial = {self.placeholder} ORDER BY id DESC LIMIT 1",
                           (normalize_serial(serial),))
        return self._record(rows[0]) if rows else None

    def count(self) -> int:
        return int(self._query(f"SELECT count(*) FROM {self.table}")[0][0])
