"""Access log lines without secrets: no query string (it can hold `?key=`), no headers.

A line names the caller by its key's name, never the key. Requests the HTTP layer
refuses before they are parsed are answered without quoting them (proxy/http1/server.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from proxy.http1.server import Exchange
from proxy.logs import JSON, PREFORMATTED, TEXT, utc_stamp
from proxy.pipeline import Call, Next


def _printable(text: str, limit: int = 200) -> str:
    # Control characters from the request line must not forge log lines.
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


# %-formatting: one C call per line, where an f-string with format specs makes one
# call per field. The first field is proxy.logs' text prefix (time, level, logger name)
# without its milliseconds, so that every line of a batch reads like any other log line.
_LINE = '%s.%03d INFO %s %s "%s %s" %d %.1fms key=%s rid=%s'


class AccessLog:
    """The front server's access log: one line per request, written in batches.

    A `logging` call per request (LogRecord, formatter, a flush) costs more than the
    rest of the line. Here a request only appends its fields; every `interval_s` the
    lines are formatted together (the formatting code stays hot in the CPU's caches
    across the batch) and go out as one record on `llm_proxy.access`, each line with
    its own time.
    """

    def __init__(self, logger: logging.Logger | None = None, interval_s: float = 0.2, fmt: str = TEXT) -> None:
        self._logger = logger or logging.getLogger("llm_proxy.access")
        self._interval = interval_s
        self._json = fmt == JSON
        # (unix time, client, method, path, status, duration s, key name, request id)
        self._pending: list[tuple[float, str, str, str, int, float, str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def line(self, ex: Exchange, client: str, key_name: str, rid: str) -> None:
        request = ex.request
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._pending.append(
            (time.time(), client, request.method, request.path, ex.status, loop.time() - request.started, key_name, rid)
        )
        if self._timer is None:
            self._timer = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self._json:
            self._logger.info("%s", self._json_lines(pending), extra=PREFORMATTED)
            return
        name = self._logger.name
        # The date part once per second of the batch (usually one or two), then every
        # line by one comprehension. Paths are cut at 200 characters (a no-op slice for
        # shorter ones).
        stamps = {
            second: time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            for second in {int(entry[0]) for entry in pending}
        }
        lines = [
            _LINE % (stamps[int(now)], now % 1 * 1000, name, client, method, path[:200], status, took_s * 1000, key_name, rid)
            for now, client, method, path, status, took_s, key_name, rid in pending
        ]
        # One check for the whole batch: the fields a client can choose (address, path,
        # key name; the method is a token the parser accepted, request ids are generated
        # or checked) must not carry control characters that would forge log lines.
        if not "".join(lines).isprintable():
            lines = [
                _LINE % (
                    stamps[int(now)], now % 1 * 1000, name, _printable(client, 64), _printable(method, 32), _printable(path),
                    status, took_s * 1000, _printable(key_name, 128), rid,
                )
                for now, client, method, path, status, took_s, key_name, rid in pending
            ]
        self._logger.info("%s", "\n".join(lines), extra=PREFORMATTED)

    def _json_lines(self, pending: list[tuple[float, str, str, str, int, float, str, str]]) -> str:
        """One JSON object per line (control characters are escaped by the encoder)."""
        name = self._logger.name
        return "\n".join(
            orjson.dumps(
                {
                    "ts": utc_stamp(now), "level": "INFO", "logger": name,
                    "msg": f"{method} {path[:200]} {status}", "client": client, "method": method, "path": path[:200],
                    "status": status, "duration_ms": round(took_s * 1000, 1), "key": key_name, "rid": rid,
                }
            ).decode()
            for now, client, method, path, status, took_s, key_name, rid in pending
        )


class LogAccess:
    """The outermost stage: one access-log line per request, whatever happened."""

    def __init__(self, access_log: AccessLog) -> None:
        self._log = access_log

    async def __call__(self, call: Call, call_next: Next) -> None:
        try:
            await call_next(call)
        finally:
            key = call.key
            self._log.line(call.ex, call.client, key.name if key is not None else "-", call.request_id)
