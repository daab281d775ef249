"""Access log lines without secrets: no query string (it can hold `?key=`), no headers.

A line names the caller by its key's name (set by the auth middleware), never the key.

Requests that aiohttp's HTTP parser rejects (a NUL or CR in a header, a header line over
the size limit, a broken request line) never reach the application's middlewares.
aiohttp answers them itself with the parser's message as the body and logs that message
with its traceback, and that message quotes the offending header line: for an
`Authorization` or `x-api-key` header, the key. `redact_parse_errors()` (installed when
this module is imported, which every runner using `AccessLogger` does) replaces those
answers with a fixed JSON body and logs only the error's class name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

from proxy.middleware.auth import KEY
from proxy.middleware.context import REQUEST_ID

if TYPE_CHECKING:
    from proxy.http1.server import Exchange

_log = logging.getLogger("llm_proxy.http")


def _printable(text: str, limit: int = 200) -> str:
    # Control characters from the request line must not forge log lines.
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        key = request.get(KEY)
        self.logger.info(
            '%s "%s %s" %d %.1fms key=%s rid=%s',
            request.remote,
            _printable(request.method, 32),
            _printable(request.path),
            response.status,
            time * 1000,
            _printable(key.name, 128) if key is not None else "-",
            request.get(REQUEST_ID, "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(20)


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
        self._second = -1
        self._stamp = ""

    def line(self, ex: Exchange, key_name: str, rid: str) -> None:
        request = ex.request
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        path = request.path if request.path.isprintable() and len(request.path) <= 200 else _printable(request.path)
        method = request.method if request.method.isalpha() else _printable(request.method, 32)
        took_ms = (asyncio.get_running_loop().time() - request.started) * 1000
        self._lines.append(
            f'{self._stamp}.{int(now % 1 * 1000):03d} {request.remote} "{method} {path}" {ex.status} '
            f"{took_ms:.1f}ms key={_printable(key_name, 128)} rid={rid}"
        )
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines = self._lines, []
        if lines:
            self._logger.info("%s", "\n".join(lines))


# ---------------------------------------------------------------------- parser errors

_MALFORMED = orjson.dumps(
    {
        "error": {
            "message": "The HTTP request is malformed.",
            "type": "invalid_request_error",
            "param": None,
            "code": "bad_request",
        }
    }
)
_ORIGINAL = "_llm_proxy_original_handle_error"


def _safe_handle_error(
    self: RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    if status >= 500:
        # Errors raised by the application itself: aiohttp's own answer has a generic
        # body (no traceback unless debug) and the log needs the traceback.
        original: Any = getattr(RequestHandler, _ORIGINAL)
        return original(self, request, status, exc, message)  # type: ignore[no-any-return]
    # A parser error: its text quotes request bytes (header lines, keys). Log the class only.
    _log.info("malformed HTTP request from %s rejected (%s, status %d)", request.remote, type(exc).__name__, status)
    if request.writer.output_size > 0:
        raise ConnectionError("Response is sent already, cannot send another response with the error message")
    resp = web.Response(status=status, body=_MALFORMED, content_type="application/json")
    resp.force_close()
    return resp


def redact_parse_errors() -> None:
    """Make aiohttp's answers to unparseable requests quote nothing from the request."""
    if not hasattr(RequestHandler, _ORIGINAL):
        setattr(RequestHandler, _ORIGINAL, RequestHandler.handle_error)
        RequestHandler.handle_error = _safe_handle_error  # type: ignore[method-assign]


redact_parse_errors()
