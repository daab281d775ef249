"""Access log lines without secrets: no query string (it can hold `?key=`), no headers.

A line names the caller by its key's name (set by the auth middleware), never the key.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.middleware.auth import KEY
from proxy.middleware.context import REQUEST_ID


def _printable(text: str, limit: int = 200) -> str:
    # Control characters from the request line must not forge log lines.
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        key = request.get(KEY)
        self.logger.info(
            '%s "%s %s" %d %.1fms key=%s rid=%s',
            request.remote,
            request.method,
            _printable(request.path),
            response.status,
            time * 1000,
            key.name if key is not None else "-",
            request.get(REQUEST_ID, "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(20)
