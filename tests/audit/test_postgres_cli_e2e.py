"""PostgreSQL through the real command line: `fastca audit list/show`, and
`fastca serve` replicas sharing one registry, one of them killed mid-load."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import tomli_w

from fastca.audit.postgres_log import PostgresAuditLog
from tests.audit._factory import make_record
from tests.audit.postgres import PostgresServer, TestDatabase
from tests.conftest import run_fastca
from tests.frontend.conftest import apiserver, init_state, start_server, tokenreview_config, write_config  # noqa: F401
from tests.frontend.test_server_lifecycle import _load, _wait_for

SECRET_MARK = "n0t-in-any-output"


def _audit_section(db: TestDatabase) -> dict[str, str]:
    return {"database": db.url, "password_file": str(db.password_file)}


def test_audit_list_and_show_read_postgresql(tmp_path: Path, pg_database: TestDatabase) -> None:
    records = [make_record(i) for i in range(12)]
    with PostgresAuditLog(pg_database.url, password_file=pg_database.password_file) as log:
        log.record_many_sync(records)
    state = tmp_path / "state"
    state.mkdir()
    (state / "fastca.toml").write_text(tomli_w.dumps({"trust_domain": "cluster.local",
                                                      "audit": _audit_section(pg_database)}))
    listed = json.loads(run_fastca("audit", "list", "--state", str(state), "--limit", "3", "--json").stdout)
    assert [r["serial"] for r in listed] == [r.serial for r in records[::-1][:3]]
    shown = json.loads(run_fastca("audit", "show", records[4].serial.upper(), "--state", str(state), "--json").stdout)
    assert shown == records[4].to_dict()
    missing = run_fastca("audit", "show", "abc123", "--state", str(state), check=False)
    assert missing.returncode == 1 and f"in postgresql://fastca@127.0.0.1" in missing.stderr

    # The same through the environment, with no [audit] in the file.
    bare = tmp_path / "bare"
    bare.mkdir()
    env = {"FASTCA_AUDIT__DATABASE": pg_database.url, "FASTCA_AUDIT__PASSWORD_FILE": str(pg_database.password_file)}
    listed = json.loads(run_fastca("audit", "list", "--state", str(bare), "--json", env=env).stdout)
    assert len(listed) == 12

    # A password in the URL: refused, and not repeated anywhere.
    url = pg_database.url.replace("fastca@", f"fastca:{SECRET_MARK}@")
    refused = run_fastca("audit", "list", "--state", str(bare), env={"FASTCA_AUDIT__DATABASE": url}, check=False)
    assert refused.returncode == 2 and "password" in refused.stderr
    assert SECRET_MARK not in refused.stdout + refused.stderr


def test_replicas_killed_mid_load_lose_no_returned_certificate(tmp_path: Path, apiserver,  # noqa: F811
                                                               postgres: PostgresServer,
                                                               pg_database: TestDatabase) -> None:
    """Two `fastca serve` processes on one registry; kill -9 one mid-load.
    Every certificate a client received is in PostgreSQL exactly once."""
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]},
                         "policy": {"rate_limit": {"per_identity_per_second": 0}},
                         "audit": _audit_section(pg_database)})
    servers = [start_server(state), start_server(state)]
    stop, results_a, results_b = threading.Event(), [], []
    threads = _load(servers[0], stop, results_a, workers=6) + _load(servers[1], stop, results_b, workers=6)
    try:
        _wait_for(results_a, 150)
        servers[0].process.kill()
        servers[0].process.wait(timeout=10)
        before = sum(1 for code, _ in results_b if code == "OK")
        _wait_for(results_b, before + 100)       # the other replica goes on
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for server in servers:
            server.stop()
    returned = [f"{serial:x}" for code, serial in results_a + results_b if code == "OK"]
    assert len(returned) >= 250 and len(set(returned)) == len(returned)
    counts = dict(postgres.query(pg_database.name, "SELECT serial, count(*) FROM fastca_issuance "
                                                   "WHERE serial = ANY(%s) GROUP BY serial", returned))
    assert [s for s in returned if counts.get(s) != 1] == []
    kinds = {row[0] for row in postgres.query(pg_database.name,
                                              "SELECT DISTINCT credential_type FROM fastca_issuance")}
    assert "self" in kinds                          # each replica's serving certificate, audited too
