"""Outermost middleware: request id, CORS, error rendering in the caller's dialect.

Every response carries `x-request-id` (and `request-id`, which Anthropic SDKs read).
Every error the gateway produces itself, including aiohttp's own 404/405/413, is
rendered here, once, in the dialect of the route that was called.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.dialects import ANTHROPIC, GEMINI, OPENAI, Dialect
from proxy.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    RequestTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from proxy.store.base import StoreError

log = logging.getLogger("llm_proxy.http")

REQUEST_ID = web.RequestKey("llm_proxy_request_id", str)
DIALECT = web.RequestKey("llm_proxy_dialect", object)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CORS_ALLOW_HEADERS = (
    "authorization, content-type, x-api-key, api-key, anthropic-version, anthropic-beta, "
    "anthropic-dangerous-direct-browser-access, x-goog-api-key, x-goog-api-client, x-request-id, "
    "x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, "
    "x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout"
)
_EXPOSE = "x-request-id, request-id, retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dialect_for(request: web.Request) -> Dialect:
    return dialect_for_path(request.path, request.headers)


def dialect_for_path(path: str, headers: Mapping[str, str]) -> Dialect:
    """Which API family the caller speaks, from the path (and Anthropic's headers on /v1/models)."""
    if path.startswith(("/v1beta/", "/v1beta")) or ":generateContent" in path or ":streamGenerateContent" in path:
        return GEMINI
    if path.startswith(("/v1/messages", "/messages")):
        return ANTHROPIC
    if path.rstrip("/") in ("/v1/models", "/models") and ("anthropic-version" in headers or "x-api-key" in headers):
        return ANTHROPIC
    return OPENAI


class _RequestIds:
    """`req_` + 32 hex digits, unique per process: a random prefix and a counter.

    Request ids name records and limit reservations; they must be unique, not secret
    (clients see them). uuid4 per request costs a getrandom syscall and a UUID object.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)  # a forked child must not repeat ids

    def _reseed(self) -> None:
        self._prefix = "req_" + os.urandom(8).hex()
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


fresh_request_id = _RequestIds()


def new_request_id(sent: str | None) -> str:
    """The client's x-request-id when it is sane, else a fresh one."""
    return sent if sent and _SANE_ID.match(sent) else fresh_request_id()


def response_headers(rid: str, origin: str | None) -> list[tuple[str, str]]:
    """Headers every response gets (what `on_prepare` adds on aiohttp's side)."""
    headers = [("x-request-id", rid), ("request-id", rid)]
    if origin:
        headers += [("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", _EXPOSE), ("Vary", "Origin")]
    return headers


def error_parts(dialect: Dialect, err: ProxyError, rid: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of an error the gateway answers itself."""
    return dialect.error_status(err), {"Content-Type": "application/json", **err.headers}, dialect.error_body(err, rid)


def cors_headers(request: web.Request) -> dict[str, str]:
    origin = request.headers.get("Origin")
    return {"Access-Control-Allow-Origin": origin or "*", "Vary": "Origin"} if origin else {}


def _preflight(request: web.Request) -> web.Response:
    headers = cors_headers(request) or {"Access-Control-Allow-Origin": "*"}
    headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    headers["Access-Control-Allow-Headers"] = request.headers.get("Access-Control-Request-Headers", _CORS_ALLOW_HEADERS)
    headers["Access-Control-Max-Age"] = "86400"
    return web.Response(status=204, headers=headers)


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge("The request body is larger than this gateway accepts.")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("No such endpoint.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed("This method is not allowed on this endpoint.")
    if isinstance(exc, web.HTTPUnsupportedMediaType):
        return UnsupportedMediaType("Unsupported request encoding.")
    if exc.status >= 500:
        return ProxyError("Internal error.")
    return InvalidRequest(exc.reason or "Bad request.")


def render_error(request: web.Request, err: ProxyError) -> web.Response:
    status, headers, body = error_parts(dialect_for(request), err, request.get(REQUEST_ID, ""))
    return web.Response(status=status, body=body, headers=headers)


def make_context_middleware() -> Middleware:
    @web.middleware
    async def context(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[REQUEST_ID] = new_request_id(request.headers.get("x-request-id"))
        if request.method == "OPTIONS":
            return _preflight(request)
        try:
            return await handler(request)
        except ProxyError as err:
            return render_error(request, err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return render_error(request, _from_http_exception(exc))
        except (ConnectionResetError, OSError) as exc:
            # The client went away mid-request; nothing to answer.
            log.debug("client connection lost (%s)", type(exc).__name__)
            raise
        except StoreError as exc:
            # An outage, not a bug: one line (no traceback) per refused admin or usage call.
            log.warning("store unavailable for %s %s (%s): 503", request.method, request.path[:200], type(exc).__name__)
            return render_error(
                request, ServiceUnavailable("The key and usage store is unavailable; please retry.", code="store_unavailable", retry_after_s=5)
            )
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return render_error(request, ProxyError("Internal error."))

    return context


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response gets, streams and errors included (runs at prepare time)."""
    rid = request.get(REQUEST_ID)
    if rid:
        response.headers["x-request-id"] = rid
        response.headers["request-id"] = rid
    origin = request.headers.get("Origin")
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _EXPOSE
        response.headers.setdefault("Vary", "Origin")
