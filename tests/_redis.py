"""Real redis-server processes for tests (127.0.0.1 only, no persistence).

`redis_url`: one server for the whole session. `redis_server`: a dedicated server per
test that the test may kill and start again on the same port (outage tests).
Star-imported by conftest.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "redis_url", "redis_server"]

_START_TIMEOUT_S = 5.0


def _redis_server_binary() -> str:
    path = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if path is None:
        pytest.fail("redis-server not found on PATH: install it (e.g. apt-get install redis-server; .ci/run does)")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))   # (the latter: --requirepass)
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed 127.0.0.1 port; start() again after kill()."""

    def __init__(self, workdir: Path, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = port or _free_port()
        self.args = args   # more redis-server options (e.g. --requirepass)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self._proc is None, "already running"
        log = self.workdir / f"redis-{self.port}.log"
        self._proc = subprocess.Popen(
            [
                _redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--logfile", str(log), "--daemonize", "no", *self.args,
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _answers_ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                pytest.fail(f"redis-server did not start on 127.0.0.1:{self.port}:\n{text}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port is free again when this returns."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            self._proc = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
