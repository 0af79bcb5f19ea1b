"""The audit log's reads, written once for every backend.

A backend's reader says how its database spells a parameter (``?``, ``%s``),
how it takes a time, how a row becomes a record, and runs the query.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

from fastca.audit.record import IssuanceRecord, normalize_serial

__all__ = ["RecordQueries", "COLUMNS", "Summary"]

COLUMNS = ("serial", "identity", "caller_identities", "credential_type", "key_type", "not_before",
           "not_after", "signer", "fingerprint_sha256", "peer", "request_id", "issued_at",
           "impersonated", "cluster_id", "spki_sha256", "csr_sha256", "flags", "node")
# Added by a schema version (2: the monitor's hashes and flags; 3: the node):
# a reader of an older log sees them empty.
_ADDED_IN = {"spki_sha256": 2, "csr_sha256": 2, "flags": 2, "node": 3}


class Summary(NamedTuple):
    """What a follower of the log (the issuance monitor) needs of a record,
    decoded by the database: no datetime or JSON is parsed in Python."""

    serial: str
    identity: str
    caller: str                 # the first of caller_identities ("" if none)
    credential_type: str
    impersonated: bool
    peer: str
    node: str                   # the caller's Kubernetes node; "" if unknown (or a log before version 3)
    spki_sha256: str            # "" in a version 1 log
    csr_sha256: str
    ttl_seconds: int            # not_after - not_before
    issued_at: float            # epoch seconds


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


class RecordQueries(ABC):
    table = "issuance"
    placeholder = "?"
    schema_version = 3          # the version of the database read: set by the backend when it opens
    # How the backend's SQL spells a Summary's decoded columns.
    _first_caller_sql = "json_extract(caller_identities, '$[0]')"
    _epoch_sql = "((julianday({column}) - 2440587.5) * 86400.0)"

    @abstractmethod
    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        ...

    def _time(self, value: dt.datetime) -> Any:
        return value

    @abstractmethod
    def _record(self, row: Sequence[Any]) -> IssuanceRecord:
        ...

    @property
    def _columns(self) -> str:
        return ", ".join(self._column(c) for c in COLUMNS)

    def _column(self, name: str) -> str:
        """``name``, or an empty text for a column this log's version lacks."""
        return name if self.schema_version >= _ADDED_IN.get(name, 1) else f"'' AS {name}"

    @property
    def _select(self) -> str:
        return f"SELECT {self._columns} FROM {self.table}"

    def list(self, limit: int = 50, identity: str | None = None, since: dt.datetime | None = None,
             until: dt.datetime | None = None, flagged: bool = False) -> list[IssuanceRecord]:
        """Records, newest first; ``since`` inclusive, ``until`` exclusive;
        ``flagged``: only those the issuance monitor flagged."""
        where: list[str] = []
        parameters: list[Any] = []
        p = self.placeholder
        if flagged:
            if self.schema_version < _ADDED_IN["flags"]:
                return []           # a log from before flags: nothing in it was flagged
            where.append("flags <> ''")
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

    # -- following the log: by id, as records or as Summaries

    def after(self, last_id: int, limit: int = 2000) -> list[tuple[int, IssuanceRecord]]:
        """Records committed after the one with id ``last_id``, oldest first,
        with their ids: how a follower reads the log."""
        return self._after(f"id, {self._columns}", self._record, last_id, limit)

    def with_ids(self, ids: Sequence[int]) -> list[tuple[int, IssuanceRecord]]:
        """The records among ``ids`` that exist, by id: a follower's second
        look at ids it saw skipped (on PostgreSQL a transaction that took an
        id earlier can commit later)."""
        return self._with_ids(f"id, {self._columns}", self._record, ids)

    def summaries_after(self, last_id: int, limit: int = 2000) -> list[tuple[int, Summary]]:
        """``after``, as Summaries: the columns the monitor reads, decoded in SQL."""
        return self._after(self._summary_columns, Summary._make, last_id, limit)

    def summaries_with_ids(self, ids: Sequence[int]) -> list[tuple[int, Summary]]:
        """``with_ids``, as Summaries."""
        return self._with_ids(self._summary_columns, Summary._make, ids)

    @property
    def _summary_columns(self) -> str:
        column = self._column
        epoch = self._epoch_sql
        ttl = f"CAST(round({epoch.format(column='not_after')} - {epoch.format(column='not_before')}) AS integer)"
        return (f"id, serial, identity, coalesce({self._first_caller_sql}, ''), credential_type, impersonated, "
                f"peer, {column('node')}, {column('spki_sha256')}, {column('csr_sha256')}, {ttl}, "
                f"{epoch.format(column='issued_at')}")

    def _after(self, columns: str, decode: Any, last_id: int, limit: int) -> list[tuple[int, Any]]:
        p = self.placeholder
        rows = self._query(f"SELECT {columns} FROM {self.table} WHERE id > {p} ORDER BY id LIMIT {p}",
                           (int(last_id), max(1, int(limit))))
        return [(int(row[0]), decode(row[1:])) for row in rows]

    def _with_ids(self, columns: str, decode: Any, ids: Sequence[int]) -> list[tuple[int, Any]]:
        if not ids:
            return []
        marks = ", ".join([self.placeholder] * len(ids))
        rows = self._query(f"SELECT {columns} FROM {self.table} WHERE id IN ({marks}) ORDER BY id",
                           [int(i) for i in ids])
        return [(int(row[0]), decode(row[1:])) for row in rows]

    def id_before(self, since: dt.datetime) -> int:
        """The id to follow from (``after``) to read every record issued at
        or after ``since``; 0 if that is all of them."""
        rows = self._query(f"SELECT min(id) FROM {self.table} WHERE issued_at >= {self.placeholder}",
                           (self._time(_aware(since)),))
        first = rows[0][0] if rows else None
        return int(first) - 1 if first is not None else self.last_id()

    def flag(self, serial: str, signal: str) -> bool:
        """Add ``signal`` to the flags of the certificate ``serial`` (once:
        a replica that flags it again changes nothing); True if it was added."""
        p = self.placeholder
        changed = self._execute(
            f"UPDATE {self.table} SET flags = CASE WHEN flags = '' THEN {p} ELSE flags || ',' || {p} END "
            f"WHERE serial = {p} AND ',' || flags || ',' NOT LIKE {p}",
            (signal, signal, normalize_serial(serial), f"%,{signal},%"))
        return changed > 0

    def _execute(self, sql: str, parameters: Sequence[Any]) -> int:
        """Run a change; the rows it changed. A read-only reader refuses."""
        raise NotImplementedError(f"{type(self).__name__} is read-only")

    def last_id(self) -> int:
        return int(self._query(f"SELECT coalesce(max(id), 0) FROM {self.table}")[0][0])
