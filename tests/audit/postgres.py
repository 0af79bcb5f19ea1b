"""A real PostgreSQL server for tests: Debian's postgresql (``initdb`` /
``pg_ctl``), run as the ``postgres`` OS user in a temporary directory, on a
free TCP port of 127.0.0.1.

    with PostgresServer.start_new() as pg:
        db = pg.new_database()          # its own database, owned by the test role
        AuditConfig(database=db.url, password_file=str(db.password_file))

Authentication is what a deployment would have: the admin connects over the
Unix socket (``local all postgres trust``); the test role ``fastca`` only over
TCP with a password (``host ... scram-sha-256``), so every test that connects
as it goes through ``password_file`` (or a libpq passfile).

Other test packages use it through the ``postgres`` fixture of
tests/audit/conftest.py, or ``from tests.audit.postgres import PostgresServer``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

__all__ = ["PostgresServer", "TestDatabase", "find_pg_bin", "ROLE"]

ROLE = "fastca"
_ADMIN = "postgres"


def find_pg_bin() -> Path:
    """Debian's versioned bin directory (newest first), or pg_ctl on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
                        reverse=True)
    if candidates:
        return candidates[0].parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise AssertionError("PostgreSQL is not installed: run dev/install (it installs Debian's `postgresql`)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    runner = [] if os.geteuid() != 0 else ["runuser", "-u", _ADMIN, "--"]
    proc = subprocess.run([*runner, *argv], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass(frozen=True)
class TestDatabase:
    __test__ = False      # not a pytest class

    name: str
    url: str              # postgresql://fastca@127.0.0.1:PORT/NAME: no password in it
    password_file: Path   # 0600, the role's password

    def admin_url(self, server: PostgresServer) -> str:
        return server.admin_url(self.name)


class PostgresServer:
    """One cluster; ``start``/``stop`` may be called again (a restart keeps
    the port and the data)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "run"
        self.bin = find_pg_bin()
        self.port = _free_port()
        self.role_password = secrets.token_urlsafe(18)
        self.password_file = base / "secrets" / "role-password"
        self._names = itertools.count()

    @classmethod
    def start_new(cls) -> PostgresServer:
        # A directory postgres owns, outside pytest's root-only tmp tree.
        base = Path(tempfile.mkdtemp(prefix="fastca-pg-"))
        server = cls(base)
        server.init()
        server.start()
        server.create_role()
        return server

    # -- the cluster -----------------------------------------------------------

    def init(self) -> None:
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.base, _ADMIN, _ADMIN)
            shutil.chown(self.socket_dir, _ADMIN, _ADMIN)
        _as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", _ADMIN, "--auth-local=trust",
                     "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8")
        conf = (f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\nmax_connections = 200\n"
                "shared_buffers = 32MB\nlog_min_messages = warning\n")
        hba = ("local all postgres trust\n"
               f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n")
        # Written as postgres, so the files stay its own.
        _as_postgres("sh", "-c", f"cat >> '{self.data}/postgresql.conf' <<'EOF'\n{conf}EOF\n"
                                 f"cat > '{self.data}/pg_hba.conf' <<'EOF'\n{hba}EOF\n")

    def start(self) -> None:
        _as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"),
                     "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        _as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                     check=False)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connections -------------------------------------------------------------

    def admin_url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{_ADMIN}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.admin_url(dbname), autocommit=True)

    def url(self, dbname: str) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{dbname}"

    def create_role(self) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(self.role_password)))
        self.password_file.parent.mkdir(mode=0o700)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.role_password + "\n")

    def new_database(self, prefix: str = "t") -> TestDatabase:
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(ROLE)))
        return TestDatabase(name, self.url(name), self.password_file)

    def query(self, dbname: str, text: str, *params: object) -> list[tuple]:
        with self.admin(dbname) as conn:
            return conn.execute(text, params or None).fetchall()
