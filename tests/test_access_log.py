"""The access log: one line per request, written in batches, nothing a client can forge."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from proxy.access_log import AccessLog

pytestmark = pytest.mark.fast  # pure units: no sockets (see README, "Run the tests")


def exchange(method: str, path: str, status: int, started: float) -> SimpleNamespace:
    return SimpleNamespace(request=SimpleNamespace(method=method, path=path, started=started), status=status)


async def test_lines_are_batched_and_control_characters_cannot_forge_a_line(caplog) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    log = AccessLog(interval_s=0.05)
    now = asyncio.get_running_loop().time()
    log.line(exchange("POST", "/v1/chat/completions", 200, now - 0.0123), "127.0.0.1", "team-a", "req_1")  # type: ignore[arg-type]
    log.line(exchange("GET", "/x\n2026-01-01T00:00:00.000 evil \"GET /\" 200", 404, now), "10.0.0.1\r", "k\x1b[31m", "req_2")  # type: ignore[arg-type]
    assert caplog.records == []  # nothing until the batch goes out
    await asyncio.sleep(0.15)
    assert len(caplog.records) == 1
    lines = caplog.records[0].getMessage().split("\n")
    assert len(lines) == 2
    assert lines[0].split(" ", 1)[1].startswith('127.0.0.1 "POST /v1/chat/completions" 200 12.')
    assert lines[0].endswith("ms key=team-a rid=req_1")
    assert "\n" not in lines[1] and "\r" not in lines[1] and "\x1b" not in lines[1]
    assert '10.0.0.1? "GET /x?2026-01-01T00:00:00.000 evil "GET /" 200" 404' in lines[1]
    assert "key=k?[31m rid=req_2" in lines[1]


async def test_flush_writes_what_is_pending_at_once(caplog) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    log = AccessLog(interval_s=60)
    log.line(exchange("POST", "/v1/messages", 401, asyncio.get_running_loop().time()), "::1", "-", "req_3")  # type: ignore[arg-type]
    log.flush()
    assert [r.getMessage().split(" ", 1)[1] for r in caplog.records] == ['::1 "POST /v1/messages" 401 0.0ms key=- rid=req_3']
    log.flush()  # nothing pending: no empty record
    assert len(caplog.records) == 1


async def test_each_line_has_its_own_second_and_long_paths_are_cut(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    log = AccessLog(interval_s=60)
    started = asyncio.get_running_loop().time()
    # The two lines' clock readings straddle a second; later readers (logging) get the last.
    clock = iter([1_700_000_000.999, 1_700_000_001.002])
    monkeypatch.setattr("proxy.access_log.time.time", lambda: next(clock, 1_700_000_001.002))
    log.line(exchange("POST", "/a", 200, started), "::1", "k", "req_1")  # type: ignore[arg-type]
    log.line(exchange("POST", "/" + "p" * 300, 200, started), "::1", "k", "req_2")  # type: ignore[arg-type]
    log.flush()
    first, second = caplog.records[0].getMessage().split("\n")
    assert first.split(" ", 1)[0].endswith(":20.999") and second.split(" ", 1)[0].endswith(":21.002")
    assert f'"POST /{"p" * 199}" 200' in second and "p" * 200 not in second
