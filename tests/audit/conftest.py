"""PostgreSQL for the audit tests: one real server for the session
(tests/audit/postgres.py), and a database of its own for each test."""

from __future__ import annotations

import pytest

from tests.audit.postgres import PostgresServer, TestDatabase


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    server = PostgresServer.start_new()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_database(postgres: PostgresServer) -> TestDatabase:
    return postgres.new_database()
