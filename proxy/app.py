"""The aiohttp application: routes, middlewares and the life cycle of every backend.

This is the one place that names concrete backends. Start-up order (cleanup_ctx):
store → limiter → built-in mock upstream → upstream pools → usage sink. Shutdown
unwinds in reverse, so the usage sink flushes before any pool or store closes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from aiohttp import web

from proxy import admin, dashboard
from proxy.accounting import UsageSink
from proxy.config import Config
from proxy.dialects import GEMINI_MODEL_PREFIXES, MODEL_PATHS, ModelInfo
from proxy.dialects.gemini import GEMINI
from proxy.dialects.openai import OPENAI
from proxy.errors import NotFound, ProxyError, ShuttingDown
from proxy.forward import Forwarder, StreamRegistry
from proxy.health import RouteHealth
from proxy.health.shared import RedisStates
from proxy.limits import make_limiter
from proxy.limits.base import Limiter
from proxy.live_config import Reloader, fill_pool
from proxy.metrics import Metrics
from proxy.middleware.auth import KEY, Authenticator, KeyCache, extract_key
from proxy.middleware.context import dialect_for, make_context_middleware, on_prepare
from proxy.middleware.last_used import LastUsed
from proxy.middleware.limits import Admission
from proxy.mock_upstream import MockOptions, build_mock_app
from proxy.routing import Router
from proxy.sessions import Sessions
from proxy.store import open_store
from proxy.store.base import Store
from proxy.upstream import UpstreamPool
from proxy.upstream_checks import UpstreamChecks
from proxy.worker_metrics import WorkerMetrics

log = logging.getLogger("llm_proxy.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class AppState:
    """Runtime objects of one gateway process (mutable by nature: connections, counters)."""

    config: Config
    router: Router
    store: Store
    limiter: Limiter
    upstreams: UpstreamPool = field(default_factory=UpstreamPool)
    streams: StreamRegistry = field(default_factory=StreamRegistry)
    metrics: Metrics = field(default_factory=Metrics)
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)   # requests in flight
    ready: bool = False
    started: float = field(default_factory=time.time)
    sink: UsageSink | None = None
    sessions: Sessions | None = None  # dashboard sign-ins (set in build_app)
    # Proves that x-llm-proxy-* request headers came from this process's front server
    # (proxy/middleware/session.py).
    relay_token: str = field(default_factory=lambda: secrets.token_hex(16))
    health: RouteHealth | None = None
    reloader: Reloader | None = None
    checks: UpstreamChecks | None = None
    # Under `serve --workers N`: merges the sibling workers' numbers into each scrape.
    worker_metrics: WorkerMetrics | None = None

    @property
    def in_flight(self) -> int:
        return len(self.handlers)

    forwarder: Forwarder | None = None
    admission: Admission | None = None
    authenticator: Authenticator | None = None
    last_used: LastUsed | None = None


STATE = web.AppKey("llm_proxy_state", AppState)

# Routes a request may reach without a client key. Everything else needs one, except
# /admin/ which needs the master key instead (checked in proxy.admin) and the /ui/
# dashboard, which has its own sign-in (proxy.dashboard).
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics"})


# ---------------------------------------------------------------------- handlers


async def served_by_front(request: web.Request) -> web.StreamResponse:
    """Model calls are served by proxy/front.py before they could reach this app; the
    routes are registered so that other methods on them get 405, not 404."""
    raise NotFound("No such endpoint.")


def _visible_models(request: web.Request) -> list[ModelInfo]:
    state = request.app[STATE]
    key = request.get(KEY)
    created = int(state.started)
    out = []
    for m in state.router.models:
        if key is not None and key.models and m.name not in key.models:
            continue
        owner = m.routes[0].upstream
        out.append(ModelInfo(m.name, owner, created))
    return out


async def list_models(request: web.Request) -> web.Response:
    dialect = dialect_for(request)
    body = dialect.models_body(_visible_models(request), request.query)
    return web.Response(body=body, content_type="application/json")


async def list_gemini_models(request: web.Request) -> web.Response:
    return web.Response(body=GEMINI.models_body(_visible_models(request), request.query), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"].removeprefix("models/")
    for m in _visible_models(request):
        if m.id == name:
            dialect = dialect_for(request)
            if dialect is OPENAI:
                body = {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
                return web.json_response(body)
            return web.Response(body=dialect.models_body([m], {}), content_type="application/json")
    raise NotFound(f"The model '{name[:64]}' does not exist.", code="model_not_found")


async def root(request: web.Request) -> web.Response:
    return web.json_response({"name": "llm-proxy", "status": "ok"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.ready or state.streams.stopping:
        return web.json_response({"status": "unavailable"}, status=503)
    checks: dict[str, str] = {}
    for name, ping in (("store", state.store.ping), ("limits", state.limiter.ping)):
        try:
            await ping()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = type(exc).__name__
    if state.sink is not None and not state.sink.accepting:
        checks["usage"] = "refusing"  # spool full or disk refusing: model calls get 503
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ok" if ok else "degraded", "checks": checks}, status=200 if ok else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body, ctype = state.metrics.render(state)
    if state.worker_metrics is not None:
        body = await state.worker_metrics.scrape(body)
    return web.Response(body=body, headers={"Content-Type": ctype})


# The front server writes the access line of a relayed request (GET /v1/models,
# /v1/usage, ...) and names its key there too: the app says which key it was in this
# response header, which the front server removes before the response leaves the process.
KEY_NAME_HEADER = "x-llm-proxy-key-name"


async def _name_the_key(request: web.Request, response: web.StreamResponse) -> None:
    key = request.get(KEY)
    if key is not None:
        response.headers[KEY_NAME_HEADER] = quote(key.name, safe="")  # names may be any printable text


# ---------------------------------------------------------------------- middlewares


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route
    if request.match_info.http_exception is not None:
        return await handler(request)  # 404 / 405: no handler runs
    # Decide by the route the router matched, never by the raw path or Host.
    canonical = route.resource.canonical if route.resource is not None else ""
    if canonical in PUBLIC_PATHS:
        return await handler(request)
    if canonical.startswith(("/admin/", "/ui")):
        return await handler(request)  # master key checked by proxy.admin, sessions by proxy.dashboard
    state = request.app[STATE]
    if state.streams.stopping:
        raise ShuttingDown()
    assert state.authenticator is not None and route is not None
    query = (lambda: request.query) if dialect_for(request) is GEMINI else None
    request[KEY] = await state.authenticator.authenticate(extract_key(request.headers, query))
    return await handler(request)


# ---------------------------------------------------------------------- life cycle


def _backends(app: web.Application) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        await state.store.open()
        try:
            await state.limiter.open()
            try:
                yield
            finally:
                await state.limiter.close()
        finally:
            await state.store.close()

    return ctx


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    cfg = state.config
    mock_runner: web.AppRunner | None = None
    mock_base = ""
    if any(u.is_mock for u in cfg.upstreams):
        mock_runner = web.AppRunner(build_mock_app(MockOptions()), access_log=None)
        await mock_runner.setup()
        site = web.TCPSite(mock_runner, "127.0.0.1", 0)
        await site.start()
        port = mock_runner.addresses[0][1]
        mock_base = f"http://127.0.0.1:{port}"
    fill_pool(state.upstreams, cfg, mock_base)
    assert state.reloader is not None
    state.reloader.mock_base = mock_base
    if state.router.skipped:
        log.warning("models left out (their upstream has no credential): %s", ", ".join(state.router.skipped))
    try:
        yield
    finally:
        await state.reloader.close()
        await state.upstreams.close()   # the current pool: a reload may have replaced the first
        if mock_runner is not None:
            await mock_runner.cleanup()


def _swap(state: AppState) -> Callable[[Config, Router, UpstreamPool], None]:
    """The reload's swap: every reference the request path reads, in one synchronous step."""

    def apply(config: Config, router: Router, upstreams: UpstreamPool) -> None:
        state.config, state.router, state.upstreams = config, router, upstreams
        if state.health is not None:
            state.health.use_policy(config.routing.breaker)
        if state.forwarder is not None:
            state.forwarder.use(config, router, upstreams)

    return apply


async def _pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    cfg = state.config
    sink = UsageSink(
        state.store,
        cfg.storage.spool_path,
        flush_interval_s=cfg.storage.flush_interval_s,
        queue_max=cfg.storage.queue_max,
        spool_max_bytes=int(cfg.storage.spool_max_mb * 1024 * 1024),
        on_record=state.metrics.observe_record,
    )
    await sink.start()
    state.sink = sink
    state.admission = Admission(
        state.limiter, cfg.limits.fail_open, cfg.limits.budget_admission, cfg.limits.default_max_tokens
    )
    state.last_used = LastUsed(state.store)
    state.last_used.start()
    state.authenticator = Authenticator(
        state.store, KeyCache(cfg.auth.cache_ttl_s, cfg.auth.negative_cache_ttl_s), last_used=state.last_used
    )
    state.forwarder = Forwarder(cfg, state.router, state.upstreams, state.admission, sink, state.streams, state.health)
    assert state.health is not None
    state.checks = UpstreamChecks(lambda: (state.router, state.upstreams), state.health, sink.record)
    checking = asyncio.create_task(state.checks.run())
    state.ready = True
    try:
        yield
    finally:
        state.ready = False
        checking.cancel()
        await state.admission.drain()
        # Handlers have drained by now (aiohttp runs cleanup after shutdown): flush last.
        try:
            await sink.close()
        finally:
            await state.last_used.close()  # the store is still open (closed by _backends)


def make_route_health(config: Config) -> RouteHealth:
    """Breaker states in this process, or shared through Redis when the limits are."""
    policy = config.routing.breaker
    if config.limits.url.startswith(("redis://", "rediss://")):
        return RouteHealth(policy, RedisStates(config.limits.url, policy))
    return RouteHealth(policy)


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    health = state.health
    assert health is not None
    sync: asyncio.Task[None] | None = None
    if health.shared:
        await health.sync()
        sync = asyncio.create_task(health.run_sync(state.config.routing.shared_sync_s))
    try:
        yield
    finally:
        if sync is not None:
            sync.cancel()
        await health.close()


def build_app(
    config: Config,
    *,
    store: Store | None = None,
    limiter: Limiter | None = None,
    config_path: str | None = None,
    parent_pid: int | None = None,
) -> web.Application:
    """`config_path`: the file a reload reads (None: resolved as at start-up);
    `parent_pid`: the --workers parent, told of reloads asked through the admin API."""
    store = store or open_store(config.storage.url)
    limiter = limiter or make_limiter(config.limits.url, spend_seed=store.spend_usd)
    state = AppState(config=config, router=Router(config), store=store, limiter=limiter)
    state.sessions = Sessions(state.store, config.auth.session_ttl_h * 3600)
    state.reloader = Reloader(config_path, lambda: (state.config, state.upstreams), _swap(state), parent_pid=parent_pid)
    state.health = make_route_health(config)

    app = web.Application(
        middlewares=[make_context_middleware(), auth_middleware],
        client_max_size=int(config.server.max_body_mb * 1024 * 1024),
        handler_args={
            "max_line_size": config.server.max_line_size,
            "max_field_size": config.server.max_field_size,
            "max_headers": config.server.max_headers,
        },
    )
    app[STATE] = state
    app.on_response_prepare.append(on_prepare)
    app.on_response_prepare.append(_name_the_key)
    app.cleanup_ctx.append(_backends(app))
    app.cleanup_ctx.append(_health_ctx)
    app.cleanup_ctx.append(_upstreams_ctx)
    app.cleanup_ctx.append(_pipeline_ctx)

    r = app.router
    for path in MODEL_PATHS:
        r.add_post(path, served_by_front)
    for prefix in GEMINI_MODEL_PREFIXES:
        r.add_post(prefix + "{tail:.+}", served_by_front)
    for prefix in ("/v1", ""):
        r.add_get(f"{prefix}/models", list_models)
    r.add_get("/v1beta/models", list_gemini_models)
    r.add_get("/v1beta/models/{model:.+}", get_model)
    r.add_get("/v1/models/{model:.+}", get_model)
    r.add_get("/", root)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_handler)
    admin.add_routes(app, STATE)
    dashboard.add_routes(app, STATE)
    return app


__all__ = ["KEY_NAME_HEADER", "AppState", "PUBLIC_PATHS", "STATE", "build_app", "ProxyError"]
