"""What every audit backend must do, written once; test_sqlite_log.py and
test_postgres_log.py run it against their own log."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

import pytest

from fastca.audit import GroupCommitLog, IssuanceRecord
from fastca.audit.queries import RecordQueries
from fastca.errors import CANotReady, Overloaded
import datetime as dt

from tests.audit._factory import T0, make_record


def check_round_trip(log: GroupCommitLog) -> None:
    """Twenty records written, then read back every way the reader offers."""
    records = [make_record(i) for i in range(20)]
    log.record_many_sync(records)
    assert log.count() == 20
    assert log.get(records[3].serial) == records[3]
    assert log.get(records[3].serial.upper()) == records[3]
    assert log.get("ff" * 16 if records[0].serial != "ff" * 16 else "1") is None
    assert log.list(limit=5) == records[::-1][:5]
    assert log.list(identity=records[4].identity) == [records[4]]
    window = log.list(since=T0 + dt.timedelta(seconds=5), until=T0 + dt.timedelta(seconds=8))
    assert [r.serial for r in window] == [records[i].serial for i in (7, 6, 5)]


def check_group_commit(make_log: Callable[..., GroupCommitLog]) -> None:
    """Concurrent records from threads and tasks: all committed, in far fewer transactions."""
    commits: list[int] = []
    log = make_log(on_commit=lambda n, s: commits.append(n))
    thread_records = [[make_record(100_000 + t * 1000 + i) for i in range(50)] for t in range(4)]
    async_records = [make_record(i) for i in range(2000)]

    def thread_work(records: list[IssuanceRecord]) -> None:
        for record in records:
            log.record_many_sync([record])

    async def main() -> None:
        await asyncio.gather(*(log.record(r) for r in async_records))

    threads = [threading.Thread(target=thread_work, args=(recs,)) for recs in thread_records]
    for thread in threads:
        thread.start()
    asyncio.run(main())
    for thread in threads:
        thread.join()
    total = 2000 + 4 * 50
    try:
        assert log.count() == total == log.recorded == sum(commits)
        expected = {r.serial for r in async_records} | {r.serial for recs in thread_records for r in recs}
        assert {r.serial for r in log.list(limit=total + 10)} == expected
        assert log.commits == len(commits)
        assert log.commits <= total // 10, f"{log.commits} transactions for {total} records"
        assert max(commits) <= log.max_batch
    finally:
        log.close()


def check_queue_full_is_overloaded(log: GroupCommitLog, release: Callable[[], None]) -> None:
    """``log`` (queue_limit 10) has a writer that stalls until ``release()``."""
    async def main() -> None:
        first = asyncio.ensure_future(log.record(make_record(0)))   # taken by the stalled writer
        for _ in range(500):
            await asyncio.sleep(0.01)
            if log.pending == 0:
                break
        waiting = [asyncio.ensure_future(log.record(make_record(i))) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        assert log.pending == 10
        with pytest.raises(Overloaded):
            await log.record(make_record(99))
        with pytest.raises(Overloaded):
            log.record_many_sync([make_record(98)])
        release()
        await asyncio.gather(first, *waiting)

    asyncio.run(main())
    assert log.count() == 11


def check_close_flushes_queued_records(make_log: Callable[..., GroupCommitLog]) -> None:
    async def main() -> int:
        log = make_log()
        tasks = [asyncio.ensure_future(log.record(make_record(i))) for i in range(300)]
        await asyncio.sleep(0)          # all queued
        await log.aclose()
        await asyncio.gather(*tasks)
        await log.aclose()
        with pytest.raises(CANotReady):
            await log.record(make_record(999))
        return log.count()

    assert asyncio.run(main()) == 300


def check_monitor_columns_tail_and_flags(log: GroupCommitLog, reader: RecordQueries) -> None:
    """Schema version 2: the key and CSR hashes round-trip; the monitor's
    tail reads records after an id in commit order; a flag is added once
    (a second replica flagging the same certificate changes nothing) and
    ``flagged`` lists only flagged records."""
    records = [make_record(i) for i in range(6)]
    log.record_many_sync(records[:4])
    tail = reader.after(0)
    assert [r for _, r in tail] == records[:4] and [i for i, _ in tail] == sorted(i for i, _ in tail)
    assert reader.last_id() == tail[-1][0]
    log.record_many_sync(records[4:])
    assert [r.serial for _, r in reader.after(tail[-1][0])] == [r.serial for r in records[4:]]
    assert reader.after(reader.last_id()) == []
    assert reader.get(records[2].serial).spki_sha256 == records[2].spki_sha256
    assert reader.flag(records[2].serial, "burst") is True
    assert reader.flag(records[2].serial, "burst") is False
    assert reader.flag(records[2].serial, "key_reuse") is True
    assert reader.flag("ab" * 16, "burst") is False                      # no such certificate
    assert reader.get(records[2].serial).flags == ("burst", "key_reuse")
    assert [r.serial for r in reader.list(flagged=True)] == [records[2].serial]
    assert reader.list(flagged=True, identity=records[3].identity) == []
    # A follower's second look at ids it saw skipped; unknown ids are absent.
    ids = [i for i, _ in tail]
    assert [(i, r.serial) for i, r in reader.with_ids([ids[3], ids[1], 10**9])] == \
        [(ids[1], records[1].serial), (ids[3], records[3].serial)]
    assert reader.with_ids([]) == []
    # Where to follow from to read everything issued since a time.
    assert reader.id_before(records[0].issued_at) == ids[0] - 1
    assert reader.id_before(records[1].issued_at) == ids[1] - 1
    assert reader.id_before(records[-1].issued_at + dt.timedelta(days=1)) == reader.last_id()
