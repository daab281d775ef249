"""Access log lines without secrets: no query string (it can hold `?key=`), no headers.

A line names the caller by its key's name, never the key. Requests the HTTP layer
refuses before they are parsed are answered without quoting them (proxy/http1/server.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.http1.server import Exchange


def _printable(text: str, limit: int = 200) -> str:
    # Control characters from the request line must not forge log lines.
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class AccessLog:
    """The front server's access log: one line per request, written in batches.

    A `logging` call per request (LogRecord, formatter, a flush) costs more than the
    rest of the line; here a request costs one f-string, and every `interval_s` the
    lines go out as one record on `llm_proxy.access` (each line has its own time).
    """

    def __init__(self, logger: logging.Logger | None = None, interval_s: float = 0.2) -> None:
        self._logger = logger or logging.getLogger("llm_proxy.access")
        self._interval = interval_s
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._second = -1
        self._stamp = ""

    def line(self, ex: Exchange, client: str, key_name: str, rid: str) -> None:
        request = ex.request
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        path = request.path if request.path.isprintable() and len(request.path) <= 200 else _printable(request.path)
        method = request.method if request.method.isalpha() else _printable(request.method, 32)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        took_ms = (loop.time() - request.started) * 1000
        self._lines.append(
            f'{self._stamp}.{int(now % 1 * 1000):03d} {client if client.isprintable() else _printable(client, 64)} "{method} {path}" {ex.status} '
            f"{took_ms:.1f}ms key={key_name if key_name.isprintable() else _printable(key_name, 128)} rid={rid}"
        )
        if self._timer is None:
            self._timer = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines = self._lines, []
        if lines:
            self._logger.info("%s", "\n".join(lines))
