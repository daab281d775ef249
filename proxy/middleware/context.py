"""The request context stage: request id, CORS, and the one place errors are rendered.

Every response carries `x-request-id` (and `request-id`, which Anthropic SDKs read) and,
for a browser caller, the CORS headers. Every error the data plane produces itself is
rendered here, once, in the dialect of the route that was called. The control plane
(proxy/control.py) gives its answers the same headers and error shapes from the helpers
here.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl

from proxy.dialects import ANTHROPIC, GEMINI, OPENAI, Dialect
from proxy.errors import ProxyError, ServiceUnavailable
from proxy.pipeline import Call, HeaderList, Next
from proxy.store.base import StoreError

log = logging.getLogger("llm_proxy.http")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CORS_ALLOW_HEADERS = (
    "authorization, content-type, x-api-key, api-key, anthropic-version, anthropic-beta, "
    "anthropic-dangerous-direct-browser-access, x-goog-api-key, x-goog-api-client, x-request-id, "
    "x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, "
    "x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout"
)
EXPOSE = "x-request-id, request-id, retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"

def _is_models_path(path: str) -> bool:
    return path.rstrip("/") in ("/v1/models", "/models") or path.startswith(("/v1/models/", "/models/"))


def _has_query_key(query: str) -> bool:
    return any(k == "key" for k, _ in parse_qsl(query))


def dialect_for_path(path: str, headers: Mapping[str, str], query: str = "") -> Dialect:
    """Which API family the caller speaks, from the path (and, on the model list that
    three SDKs share at /v1/models, from their headers or query).

    google-genai on API v1 lists models at /v1/models with `x-goog-api-key` (or `?key=`,
    Gemini's way to pass the key): it gets Gemini's shape; Anthropic's SDK
    (`anthropic-version`, `x-api-key`) Anthropic's; anyone else OpenAI's.
    """
    if path.startswith(("/v1beta/", "/v1beta")) or ":generateContent" in path or ":streamGenerateContent" in path:
        return GEMINI
    if path.startswith(("/v1/messages", "/messages")):
        return ANTHROPIC
    if _is_models_path(path):
        if "x-goog-api-key" in headers or (query and _has_query_key(query)):
            return GEMINI
        if "anthropic-version" in headers or "x-api-key" in headers:
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
    """Headers every response gets (the control plane adds the same in `on_prepare`)."""
    headers = [("x-request-id", rid), ("request-id", rid)]
    if origin:
        headers += [("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", EXPOSE), ("Vary", "Origin")]
    return headers


def error_parts(dialect: Dialect, err: ProxyError, rid: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of an error the gateway answers itself."""
    return dialect.error_status(err), {"Content-Type": "application/json", **err.headers}, dialect.error_body(err, rid)


def preflight_headers(origin: str | None, asked: str | None) -> HeaderList:
    """The answer to a CORS preflight: any origin, the headers the SDKs send."""
    return [
        ("Access-Control-Allow-Origin", origin or "*"),
        *([("Vary", "Origin")] if origin else []),
        ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
        ("Access-Control-Allow-Headers", asked or CORS_ALLOW_HEADERS),
        ("Access-Control-Max-Age", "86400"),
    ]


def respond_error(call: Call, err: ProxyError) -> None:
    """Answer `call` with `err` in the caller's dialect (nothing sent yet)."""
    status, headers, body = error_parts(call.dialect, err, call.request_id)
    call.ex.respond(status, call.headers + list(headers.items()), body)


async def request_context(call: Call, call_next: Next) -> None:
    """First stage of every client route: the request id and the headers every answer
    carries, then the errors of every later stage, rendered once."""
    request = call.ex.request
    rid = call.request_id = new_request_id(request.headers.get("x-request-id"))
    call.headers = response_headers(rid, request.headers.get("origin"))
    try:
        await call_next(call)
    except ProxyError as err:
        if not call.ex.head_sent:   # a stream that failed later was ended in its dialect
            respond_error(call, err)
    except StoreError as exc:
        if call.ex.head_sent:
            raise
        # An outage, not a bug: one line (no traceback) per refused call.
        log.warning("store unavailable for %s %s (%s): 503", request.method, request.path[:200], type(exc).__name__)
        respond_error(call, store_unavailable())
    except Exception:
        if call.ex.head_sent or call.ex.client_gone:
            raise                   # the server closes the connection
        log.exception("unhandled error in %s %s", request.method, request.path[:200])
        respond_error(call, ProxyError("Internal error."))


def store_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The key and usage store is unavailable; please retry.", code="store_unavailable", retry_after_s=5)
