"""Reading the audit log as the issuance monitor sees it: a cursor that
follows the log in id order without losing a record that commits late, and
the mapping from an audit record to an ``Observation``.

The monitor reads the log, not the request path, so every worker of a
server and every replica on a shared PostgreSQL log sees every certificate,
and the request path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

from fastca.audit.queries import RecordQueries, Summary
from fastca.audit.record import IssuanceRecord
from fastca.authn.caller import peer_host
from fastca.monitoring.tracker import Observation

__all__ = ["LogCursor", "LogSource", "Summaries", "observation_of", "bare_peer_ip", "monitored"]

# The server's own serving certificate is no workload's: every worker issues
# one at start and renews it, which says nothing about the mesh.
_UNMONITORED_CREDENTIALS = frozenset({"self"})


def monitored(record: IssuanceRecord | Summary) -> bool:
    return record.credential_type not in _UNMONITORED_CREDENTIALS


class LogSource(Protocol):
    """What the cursor reads: an audit reader (fastca.audit.queries.RecordQueries,
    records) or ``Summaries`` of one."""

    def after(self, last_id: int, limit: int = ...) -> list[tuple[int, Any]]: ...

    def with_ids(self, ids: list[int]) -> list[tuple[int, Any]]: ...


class LogCursor:
    """Records after ``start_id``, each exactly once, oldest id first.

    SQLite hands out ids in commit order. PostgreSQL does not: a transaction
    that took id 10 may commit after one that took id 11. So an id skipped
    on the way is remembered and looked up again on every read for
    ``gap_seconds`` (long enough for any audit transaction to commit; a gap
    still open then was a rolled-back insert, which never appears). At most
    ``max_gaps`` are remembered; beyond that the oldest are given up."""

    def __init__(self, source: LogSource, start_id: int, *, clock: Callable[[], float],
                 gap_seconds: float = 30.0, max_gaps: int = 10_000) -> None:
        self._source = source
        self.last_id = start_id
        self._clock = clock
        self._gap_seconds = gap_seconds
        self._max_gaps = max_gaps
        self._gaps: dict[int, float] = {}       # skipped id -> when it was first seen missing

    @property
    def open_gaps(self) -> int:
        return len(self._gaps)

    def read(self, limit: int = 2000, until_id: int | None = None) -> list[tuple[int, Any]]:
        """The records not returned yet, up to ``until_id`` if given (the
        rest stays for the next read)."""
        now = self._clock()
        # Both queries first: one that fails (the database went away) leaves
        # the cursor as it was, so nothing read is lost.
        late = self._source.with_ids(sorted(self._gaps)) if self._gaps else []
        rows = self._source.after(self.last_id, limit)
        found: list[tuple[int, Any]] = list(late)
        for key, _record in late:
            del self._gaps[key]
        for key in [key for key, since in self._gaps.items() if now - since > self._gap_seconds]:
            del self._gaps[key]
        for key, record in rows:
            if until_id is not None and key > until_id:
                break
            if key > self.last_id + 1:
                for missing in range(max(self.last_id + 1, key - self._max_gaps), key):
                    self._gaps[missing] = now
            self.last_id = key
            found.append((key, record))
        while len(self._gaps) > self._max_gaps:
            del self._gaps[next(iter(self._gaps))]
        return found


# An agent's connection records the same peer string certificate after certificate.
bare_peer_ip = lru_cache(maxsize=4096)(peer_host)


def observation_of(summary: Summary) -> Observation:
    """What the tracker is told of a recorded certificate."""
    return Observation(
        at=summary.issued_at,
        identity=summary.identity,
        caller=summary.caller,
        impersonated=bool(summary.impersonated),
        node=summary.node,
        peer_ip=bare_peer_ip(summary.peer),
        spki_sha256=bytes.fromhex(summary.spki_sha256),
        csr_sha256=bytes.fromhex(summary.csr_sha256),
        ttl_seconds=summary.ttl_seconds,
        serial=summary.serial,
    )


class Summaries:
    """An audit reader seen as the monitor reads it: Summaries, not records
    (the columns it needs, decoded by the database)."""

    def __init__(self, reader: RecordQueries) -> None:
        self.after = reader.summaries_after
        self.with_ids = reader.summaries_with_ids
