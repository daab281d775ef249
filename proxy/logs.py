"""Log lines: one format for every line the process writes, on stderr.

text (the default): `2026-12-07T03:10:00.123 INFO llm_proxy.access <message>`: local time
to the millisecond, level, logger name, message. Every line has the prefix, the access
log's batched lines too (proxy/access_log.py writes them with `text_prefix`).
json: one object per line, `{"ts": "2026-12-07T03:10:00.123Z", "level", "logger", "msg",
...}` (UTC), with a traceback as `"exc"`, for log shippers.

A record that carries `preformatted=True` (`extra=`) is a batch of finished lines in the
configured format (the access log's): it is written as it is.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

TEXT = "text"
JSON = "json"
PREFORMATTED = {"preformatted": True}

_DATE = "%Y-%m-%dT%H:%M:%S"


def utc_stamp(now: float) -> str:
    return f"{time.strftime(_DATE, time.gmtime(now))}.{int(now % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s", datefmt=_DATE)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "preformatted", False):
            return record.getMessage()
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "preformatted", False):
            return record.getMessage()
        doc: dict[str, Any] = {
            "ts": utc_stamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class Outage:
    """The log of one dependency's outages: a line when one starts, a line when it ends,
    and nothing in between but DEBUG lines (a store that is down for an hour fails every
    request and every retry: a line, let alone a traceback, for each buries the rest).

    One event loop calls it; `failed` and `ended` are cheap enough for a request path
    (`ended` is one attribute test while nothing is wrong)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self.since: float | None = None  # monotonic start of the current outage
        self.failures = 0

    def failed(self, exc: BaseException, consequence: str) -> None:
        """An attempt failed. Only the exception's type is logged: a driver's message can
        quote a URL with its password."""
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            self._log.warning("%s unavailable (%s): %s", self._what, type(exc).__name__, consequence)
        else:
            self._log.debug("%s still unavailable (%s)", self._what, type(exc).__name__)

    def ended(self) -> None:
        """An attempt succeeded."""
        if self.since is not None:
            self._log.warning(
                "%s available again after %.1fs (%d failed attempts)",
                self._what, time.monotonic() - self.since, self.failures,
            )
            self.since = None
            self.failures = 0


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Logging to stderr in `fmt` (`text` or `json`; default `$LLM_PROXY_LOG_FORMAT`, else
    text) at `level` (default `$LLM_PROXY_LOG_LEVEL`, else INFO). Called again once the
    config is read, with its `server.log_format`: the later call replaces the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "llm_proxy", False)]:
        root.removeHandler(old)
    if root.handlers:
        return  # configured by someone else (a test harness, an embedding program): theirs
    fmt = fmt or os.environ.get("LLM_PROXY_LOG_FORMAT") or TEXT
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == JSON else TextFormatter())
    handler.llm_proxy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("LLM_PROXY_LOG_LEVEL", "INFO")).upper())


__all__ = ["JSON", "Outage", "PREFORMATTED", "TEXT", "configure_logging", "utc_stamp"]
