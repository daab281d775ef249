"""A real PostgreSQL for tests: initdb into a temp dir, served on a free loopback port.

Fixtures (star-imported by conftest.py):
  pg_session_server  session   the shared `PostgresServer`
  pg_url             session   URL of a database on it, shared by the whole session
  pg_store_url       function  URL of a fresh, empty database (dropped afterwards)
  pg_server          function  a private server the test may stop/start (outage tests)

URLs look like postgresql://llm_proxy_test:<password>@127.0.0.1:<port>/<db>. TCP auth is
scram-sha-256 with a random password, so code that leaks DSNs has a password to leak.

When running as root the server runs as `postgres` (or `nobody`): initdb refuses root.
Missing binaries fail loudly; a silently skipped database suite proves nothing.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator

import asyncpg
import pytest

__all__ = ["PostgresServer", "pg_session_server", "pg_url", "pg_store_url", "pg_server"]

USER = "llm_proxy_test"
SESSION_DB = "llm_proxy"
START_ATTEMPTS = 3  # a free port can be taken between probing and binding
TIMEOUT_S = 60

# Test-cluster settings: no fsync (speed; commits still survive a server crash, only not an
# OS crash, so `stop("immediate")` keeps them), loopback TCP only, the unix socket kept
# inside the temp dir, and a non-UTC time zone with a half-hour offset so code that
# forgets to pin UTC for "days" fails here rather than in production.
_SETTINGS = """
listen_addresses = '127.0.0.1'
fsync = off
full_page_writes = off
max_connections = 200
timezone = 'Asia/Kolkata'
log_timezone = 'UTC'
"""


class PostgresServer:
    """One throwaway cluster. Use as a context manager: started on enter, removed on exit."""

    def __init__(self) -> None:
        self._bin = _binaries()
        self.password = secrets.token_hex(16)
        self.port = 0
        self._uid, self._gid = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="llmproxy-pg-"))
        self._data = self.root / "data"
        self._log = self.root / "server.log"
        if self._uid is not None:
            os.chown(self.root, self._uid, self._gid)

    def __enter__(self) -> PostgresServer:
        try:
            self._initdb()
            self.start()
            self.create_database(SESSION_DB)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()

    def url(self, database: str = SESSION_DB) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start (or restart after `stop`) and wait until it accepts connections."""
        for _ in range(START_ATTEMPTS):
            self.port = self.port or _free_port()
            result = self._run(self._bin["pg_ctl"], "start", "-w", "-t", str(TIMEOUT_S), "-D", str(self._data),
                               "-l", str(self._log), "-o", f"-p {self.port}")
            if result.returncode == 0:
                return
            self.port = 0  # most likely lost the port race: probe another
        pytest.fail(f"PostgreSQL did not start:\n{self._log_tail()}", pytrace=False)

    def stop(self, mode: str = "fast") -> None:
        """`mode="immediate"` is a crash: no shutdown checkpoint, clients cut off."""
        result = self._run(self._bin["pg_ctl"], "stop", "-w", "-m", mode, "-D", str(self._data))
        if result.returncode != 0:
            pytest.fail(f"PostgreSQL did not stop: {result.stderr.strip()}", pytrace=False)

    def remove(self) -> None:
        if (self._data / "postmaster.pid").exists():
            self._run(self._bin["pg_ctl"], "stop", "-w", "-m", "immediate", "-D", str(self._data))
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str | None = None) -> str:
        name = name or "t_" + secrets.token_hex(6)
        self._admin("SELECT format('CREATE DATABASE %I', $1::text)", name)
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a test that leaked connections must not leak the database too.
        self._admin("SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', $1::text)", name)

    # -- internals ---------------------------------------------------------------------

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._uid is not None:
            os.chown(pwfile, self._uid, self._gid)
        result = self._run(
            self._bin["initdb"], "-D", str(self._data), "-U", USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
        )
        pwfile.unlink()
        if result.returncode != 0:
            pytest.fail(f"initdb failed:\n{result.stdout}\n{result.stderr}", pytrace=False)
        with open(self._data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(_SETTINGS)
            conf.write(f"unix_socket_directories = '{self.root}'\n")

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # cwd inside the temp dir: the server user may not be able to read ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
        switch: dict[str, Any] = {"user": self._uid, "group": self._gid, "extra_groups": []} if self._uid is not None else {}
        return subprocess.run(
            args, cwd=self.root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, **switch
        )

    def _admin(self, build_sql: str, name: str) -> None:
        """Run DDL that names a database. PostgreSQL quotes the identifier (format %I).

        asyncpg runs on a private thread with its own loop: fixtures may be set up while
        the test's event loop is already running.
        """
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(lambda: asyncio.run(self._admin_async(build_sql, name))).result()

    async def _admin_async(self, build_sql: str, name: str) -> None:
        conn = await asyncpg.connect(self.url("postgres"))
        try:
            await conn.execute(await conn.fetchval(build_sql, name))
        finally:
            await conn.close()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no server log)"


def _binaries() -> dict[str, str]:
    found = {name: shutil.which(name) for name in ("initdb", "pg_ctl")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.fail(
            f"PostgreSQL server binaries not on PATH: {', '.join(missing)}. Install PostgreSQL 15 "
            "(e.g. apt-get install postgresql-15) and put its bin directory on PATH.",
            pytrace=False,
        )
    return {name: path for name, path in found.items() if path is not None}


def _server_user() -> tuple[int | None, int | None]:
    """(uid, gid) to run the server as, or (None, None) to run as ourselves."""
    if os.geteuid() != 0:
        return None, None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    pytest.fail("running as root and no unprivileged 'postgres' or 'nobody' user exists", pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pg_session_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def pg_url(pg_session_server: PostgresServer) -> str:
    return pg_session_server.url(SESSION_DB)


@pytest.fixture
def pg_store_url(pg_session_server: PostgresServer) -> Iterator[str]:
    name = pg_session_server.create_database()
    yield pg_session_server.url(name)
    pg_session_server.drop_database(name)


@pytest.fixture
def pg_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server
