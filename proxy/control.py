"""The control plane: the aiohttp application behind `/admin/*`, `/metrics` and `/ui/`.

Operators' routes, rare and not latency critical, on aiohttp's router and middlewares:
request id and error rendering (the same headers and error shapes as the data plane,
from proxy/middleware/context.py), the master-key check (proxy/admin.py), the dashboard
and its sessions (proxy/dashboard.py). No client API route is served here. The front server relays the paths `is_control_path` names to this
app over an in-process socket pair (proxy/front.py), on the gateway's own port: the
dashboard (DESIGN §8) belongs here too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from proxy import admin, dashboard
from proxy.config import Config
from proxy.errors import InvalidRequest, MethodNotAllowed, NotFound, ProxyError, RequestTooLarge, UnsupportedMediaType
from proxy.metrics import Metrics
from proxy.middleware.auth import Authenticator
from proxy.middleware.context import (
    CORS_ALLOW_HEADERS,
    EXPOSE,
    dialect_for_path,
    error_parts,
    new_request_id,
    preflight_headers,
    store_unavailable,
)
from proxy.sessions import Sessions
from proxy.store.base import Store, StoreError
from proxy.worker_metrics import WorkerMetrics

log = logging.getLogger("llm_proxy.control")

REQUEST_ID = web.RequestKey("llm_proxy_request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Controlled(Protocol):
    """What the control plane reads of the gateway (proxy/gateway.py)."""

    config: Config
    store: Store
    authenticator: Authenticator
    metrics: Metrics
    sessions: Sessions     # dashboard sign-ins
    relay_token: str       # proves x-llm-proxy-* request headers came from the front server
    worker_metrics: WorkerMetrics | None   # under --workers N: the siblings' numbers too


GATEWAY = web.AppKey("llm_proxy_gateway", Controlled)


def is_control_path(path: str) -> bool:
    """Whether this app serves `path`; every other path is the data plane's (proxy/front.py)."""
    return path.startswith(("/admin/", "/ui/")) or path in ("/metrics", "/ui")


def build_control_app(gateway: Controlled, config: Config) -> web.Application:
    app = web.Application(
        middlewares=[_context],
        client_max_size=int(config.server.max_body_mb * 1024 * 1024),
        handler_args={
            "max_line_size": config.server.max_line_size,
            "max_field_size": config.server.max_field_size,
            "max_headers": config.server.max_headers,
        },
    )
    app[GATEWAY] = gateway
    app.on_response_prepare.append(_on_prepare)
    app.router.add_get("/metrics", _metrics)
    admin.add_routes(app, GATEWAY)
    dashboard.add_routes(app, GATEWAY)
    return app


async def _metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    body, ctype = gateway.metrics.render(gateway)
    if gateway.worker_metrics is not None:
        body = await gateway.worker_metrics.scrape(body)
    return web.Response(body=body, headers={"Content-Type": ctype})


def _render(request: web.Request, err: ProxyError) -> web.Response:
    status, headers, body = error_parts(dialect_for_path(request.path, request.headers), err, request.get(REQUEST_ID, ""))
    return web.Response(status=status, body=body, headers=headers)


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


@web.middleware
async def _context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, CORS preflights, and every error rendered in the caller's dialect."""
    request[REQUEST_ID] = new_request_id(request.headers.get("x-request-id"))
    if request.method == "OPTIONS":
        origin = request.headers.get("Origin")
        asked = request.headers.get("Access-Control-Request-Headers", CORS_ALLOW_HEADERS)
        return web.Response(status=204, headers=preflight_headers(origin, asked))
    try:
        return await handler(request)
    except ProxyError as err:
        return _render(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _render(request, _from_http_exception(exc))
    except (ConnectionResetError, OSError) as exc:
        # The client went away mid-request; nothing to answer.
        log.debug("client connection lost (%s)", type(exc).__name__)
        raise
    except StoreError as exc:
        # An outage, not a bug: one line (no traceback) per refused admin call.
        log.warning("store unavailable for %s %s (%s): 503", request.method, request.path[:200], type(exc).__name__)
        return _render(request, store_unavailable())
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _render(request, ProxyError("Internal error."))


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response gets, errors included (runs at prepare time)."""
    rid = request.get(REQUEST_ID)
    if rid:
        response.headers["x-request-id"] = rid
        response.headers["request-id"] = rid
    origin = request.headers.get("Origin")
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE
        response.headers.setdefault("Vary", "Origin")
