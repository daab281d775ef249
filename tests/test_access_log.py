"""The access log: one line per request, written in batches, nothing a client can forge."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from types import SimpleNamespace

import pytest

from proxy.access_log import AccessLog
from proxy.logs import JsonFormatter, TextFormatter

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
    # Every line of the batch carries the prefix of every other log line: time, level, logger.
    assert all(line.split(" ", 3)[1:3] == ["INFO", "llm_proxy.access"] for line in lines)
    assert lines[0].split(" ", 3)[3].startswith('127.0.0.1 "POST /v1/chat/completions" 200 ')
    assert lines[0].endswith("ms key=team-a rid=req_1")
    # The request started 12.3 ms before it was logged; a loaded machine adds to that, never less.
    assert float(lines[0].split(" 200 ", 1)[1].split("ms", 1)[0]) >= 12.3
    assert "\n" not in lines[1] and "\r" not in lines[1] and "\x1b" not in lines[1]
    assert '10.0.0.1? "GET /x?2026-01-01T00:00:00.000 evil "GET /" 200" 404' in lines[1]
    assert "key=k?[31m rid=req_2" in lines[1]


async def test_flush_writes_what_is_pending_at_once(caplog) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    log = AccessLog(interval_s=60)
    log.line(exchange("POST", "/v1/messages", 401, asyncio.get_running_loop().time()), "::1", "-", "req_3")  # type: ignore[arg-type]
    log.flush()
    # The duration is what the clock says (a loaded machine takes a tenth of a ms or more).
    lines = [re.sub(r" \d+\.\dms ", " Nms ", r.getMessage().split(" ", 3)[3]) for r in caplog.records]
    assert lines == ['::1 "POST /v1/messages" 401 Nms key=- rid=req_3']
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


async def test_text_lines_share_the_format_of_every_other_log_line() -> None:
    """The access log's batched lines and an ordinary record, through the configured
    text formatter: the same prefix shape (time to the ms, level, logger name)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("llm_proxy.test_access_text")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        log = AccessLog(logger=logger, interval_s=60)
        now = asyncio.get_running_loop().time()
        for rid in ("req_1", "req_2"):
            log.line(exchange("POST", "/v1/messages", 200, now), "::1", "team-a", rid)  # type: ignore[arg-type]
        log.flush()
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    shape = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (INFO|WARNING) llm_proxy\.test_access_text \S")
    assert all(shape.match(line) for line in lines), lines
    assert lines[0].endswith("key=team-a rid=req_1") and lines[2].endswith("WARNING llm_proxy.test_access_text something else")


async def test_json_lines_one_object_each_with_the_key_name() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("llm_proxy.test_access_json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        log = AccessLog(logger=logger, interval_s=60, fmt="json")
        now = asyncio.get_running_loop().time()
        log.line(exchange("POST", "/v1/chat/completions", 200, now - 0.002), "10.0.0.1", "team-a", "req_1")  # type: ignore[arg-type]
        log.line(exchange("GET", "/x\n{\"forged\": 1}", 404, now), "10.0.0.2", "k\x1b", "req_2")  # type: ignore[arg-type]
        log.flush()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(docs) == 3
    first, second, error = docs
    assert first["logger"] == "llm_proxy.test_access_json" and first["level"] == "INFO"
    assert first["key"] == "team-a" and first["status"] == 200 and first["path"] == "/v1/chat/completions"
    assert first["client"] == "10.0.0.1" and first["rid"] == "req_1" and first["duration_ms"] >= 2
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", first["ts"])
    assert second["path"] == '/x\n{"forged": 1}' and second["key"] == "k\x1b"  # escaped, not a new line
    assert error["level"] == "ERROR" and error["msg"] == "failed" and "RuntimeError: boom" in error["exc"]
