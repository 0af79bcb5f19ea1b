"""A process that records and prints each serial once its record is committed.

    python -m tests.audit._writer DB async|sync
The parent SIGKILLs it mid-stream and checks every printed serial is in DB.
"""

from __future__ import annotations

import asyncio
import sys
import threading

from fastca.audit.sqlite_log import SqliteAuditLog
from tests.audit._factory import make_record


def _say(serials: list[str], lock: threading.Lock) -> None:
    text = "".join(f"{s}\n" for s in serials)
    with lock:
        sys.stdout.write(text)
        sys.stdout.flush()


async def _async(log: SqliteAuditLog, lock: threading.Lock) -> None:
    async def worker(w: int) -> None:
        i = 0
        while True:
            record = make_record(w * 1_000_000 + i)
            await log.record(record)
            _say([record.serial], lock)
            i += 1

    await asyncio.gather(*(worker(w) for w in range(64)))


def _sync(log: SqliteAuditLog, lock: threading.Lock) -> None:
    def worker(w: int) -> None:
        i = 0
        while True:
            records = [make_record(w * 1_000_000 + i + k) for k in range(3)]
            log.record_many_sync(records)
            _say([r.serial for r in records], lock)
            i += 3

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    log = SqliteAuditLog(path, max_delay_s=0.001)
    lock = threading.Lock()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if mode == "async":
        asyncio.run(_async(log, lock))
    else:
        _sync(log, lock)


if __name__ == "__main__":
    main()
