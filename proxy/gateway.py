"""The composition root: `build_gateway(config)` makes every part of one gateway process.

This is the one place that names concrete backends and the one place the data plane's
chains are composed. Every client route runs one chain, in this order (a stage is one
line to add; `Before(...)` marks a step, which acts only before the rest, see
proxy/pipeline.py):

    access log → request context (id, CORS, errors)
      → draining → auth (with the brute-force brake)        (keyed routes)
      → usage accounting → model request → limits → forward (model calls)

The usage accounting stage sits before the model request and limits stages so that a
call it must refuse (usage cannot be recorded) is refused before it is parsed or takes
a rate-limit slot, and so that it settles the limits' reservation after everything
inner has run. A model call's key is checked from the head, before its body is read
(`Front.head_check`); the auth stage then takes that key as is. The control plane's paths
take `access log → request context → relay` to the aiohttp app (proxy/control.py): `/admin/*`, `/metrics`, `/ui/`.

Life cycle (`open`, then `close` in reverse): store → limiter → route health (breaker
states) → built-in mock upstream → upstream pools → usage sink and upstream checks →
control plane. The usage sink flushes before any pool or
store closes. `proxy/server.py` owns sockets, workers and signals, nothing of this.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from proxy.access_log import AccessLog, LogAccess
from proxy.config import Config
from proxy.control import build_control_app, is_control_path
from proxy.errors import ProxyError
from proxy.forward import Forwarder
from proxy.front import Brake, Front, Relay, Routes, internal_connector
from proxy.handlers import ClientRoutes, method_not_allowed, not_found, preflight, refuse
from proxy.health import RouteHealth
from proxy.health.shared import RedisStates
from proxy.http1.client import Http1Client
from proxy.limits import make_limiter
from proxy.limits.base import Limiter
from proxy.live_config import Reloader, fill_pool
from proxy.metrics import Metrics
from proxy.middleware.accounting import UsageAccounting
from proxy.middleware.auth import Authenticate, Authenticator, KeyCache
from proxy.middleware.auth_failures import AuthFailures, ClientAddress
from proxy.middleware.context import request_context
from proxy.middleware.draining import RefuseWhileDraining, StreamRegistry
from proxy.middleware.last_used import LastUsed
from proxy.middleware.limits import Admission, ReserveLimits
from proxy.middleware.model_request import ModelRequest
from proxy.mock_upstream import MockOptions, build_mock_app
from proxy.pipeline import Before, Next, Stage, compose
from proxy.routing import Router
from proxy.sessions import Sessions
from proxy.store import open_store
from proxy.store.base import Store
from proxy.upstream import UpstreamPool
from proxy.upstream_checks import UpstreamChecks
from proxy.usage_sink import UsageSink
from proxy.worker_metrics import WorkerMetrics

log = logging.getLogger("llm_proxy.gateway")

# Routes a request may reach without a client key. Everything else needs one, except
# /admin/ which needs the master key instead (checked in proxy/admin.py) and the /ui/
# dashboard, which has its own sign-in (proxy/dashboard.py).
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics"})
# How long the control plane's aiohttp server waits for its requests at shutdown.
_CONTROL_SHUTDOWN_S = 2.0


class Gateway:
    """Every backend and both planes of one gateway process; nothing here is optional."""

    def __init__(
        self, config: Config, store: Store, limiter: Limiter, *, config_path: str | None, parent_pid: int | None
    ) -> None:
        self.config = config
        self.store = store
        self.limiter = limiter
        self.router = Router(config)
        self.upstreams = UpstreamPool()
        self.streams = StreamRegistry()
        self.metrics = Metrics()
        self.handlers: set[asyncio.Task[Any]] = set()   # requests in flight (the server's)
        self.ready = False
        cfg = config
        self.sink = UsageSink(
            store,
            cfg.storage.spool_path,
            flush_interval_s=cfg.storage.flush_interval_s,
            queue_max=cfg.storage.queue_max,
            spool_max_bytes=int(cfg.storage.spool_max_mb * 1024 * 1024),
            on_record=self.metrics.observe_record,
        )
        self.admission = Admission(limiter, cfg.limits.fail_open, cfg.limits.budget_admission, cfg.limits.default_max_tokens)
        self.last_used = LastUsed(store)   # keys' last_used_at, written in batches
        self.authenticator = Authenticator(
            store, KeyCache(cfg.auth.cache_ttl_s, cfg.auth.negative_cache_ttl_s), last_used=self.last_used
        )
        self.accounting = UsageAccounting(self.sink, self.admission, self.streams)
        self.health = make_route_health(cfg)
        self.forwarder = Forwarder(cfg, self.accounting, self.streams, self.health)
        self.model_request = ModelRequest(cfg, self.router, self.upstreams)
        self.client_routes = ClientRoutes(self.router, store, limiter, self.sink, self.streams, lambda: self.ready)
        # Live configuration (SIGHUP, POST /admin/reload) and active upstream checks.
        self.reloader = Reloader(config_path, lambda: (self.config, self.upstreams), self._swap, parent_pid=parent_pid)
        self.checks = UpstreamChecks(lambda: (self.router, self.upstreams), self.health, self.sink.record)
        self.access_log = AccessLog(fmt=cfg.server.log_format) if cfg.server.access_log else None
        # Under `serve --workers N`: merges the sibling workers' numbers into each scrape
        # (set by the server once this worker listens).
        self.worker_metrics: WorkerMetrics | None = None
        self.sessions = Sessions(store, cfg.auth.session_ttl_h * 3600)   # dashboard sign-ins
        # Proves that x-llm-proxy-* request headers came from this process's front server
        # (proxy/middleware/session.py).
        self.relay_token = secrets.token_hex(16)
        self.control_app = build_control_app(self, config)
        client_address = ClientAddress(cfg.server.trusted_proxies)
        self._control = web.AppRunner(
            self.control_app,
            handle_signals=False,
            access_log=None,  # the front server logs every request
            handler_cancellation=True,  # a client that goes away cancels its handler at once
            shutdown_timeout=_CONTROL_SHUTDOWN_S,
        )
        self.client_address = client_address
        brake = Brake(AuthFailures(cfg.auth.max_failures_per_min))
        self.authenticate = Authenticate(self.authenticator, brake.failed)
        self._relay = Relay(
            Http1Client("http://llm-proxy.internal", max_connections=64, connect_timeout_s=5, connect=internal_connector(self._control)),
            client_address,
            self.relay_token,
            brake,
            tls=cfg.server.tls is not None,
        )
        self.routes = self._compose()
        self.front = Front(self.routes, client_address, self.authenticate, self.access_log)
        self._stack = AsyncExitStack()
        self._mock: web.AppRunner | None = None   # the built-in mock provider, when configured
        self._tasks: list[asyncio.Task[None]] = []  # breaker-state sync, upstream checks

    @property
    def in_flight(self) -> int:
        return len(self.handlers)

    # ---------------------------------------------------------------- the chains

    def _compose(self) -> Routes:
        outer: list[Stage] = [request_context]
        if self.access_log is not None:
            outer.insert(0, LogAccess(self.access_log))
        keyed: list[Stage] = [*outer, Before(RefuseWhileDraining(self.streams)), Before(self.authenticate)]
        model_call: list[Stage] = [*keyed, self.accounting, Before(self.model_request), Before(ReserveLimits(self.admission))]
        client = self.client_routes
        get_handlers: dict[str, Next] = {
            "/": client.root,
            "/healthz": client.healthz,
            "/readyz": client.readyz,
            "/v1/models": client.list_models,
            "/models": client.list_models,
            "/v1beta/models": client.list_models,
            "/v1/usage": client.own_usage,
        }

        def refusal(err: ProxyError) -> Next:
            return compose(outer, refuse(err))

        return Routes(
            model_call=compose(model_call, self.forwarder),
            get={path: compose(outer if path in PUBLIC_PATHS else keyed, h) for path, h in get_handlers.items()},
            get_model=compose(keyed, client.get_model),
            control=is_control_path,
            relay=compose(outer, self._relay),
            preflight=compose(outer, preflight),
            not_found=compose(outer, not_found),
            method_not_allowed=compose(outer, method_not_allowed),
            refuse=refusal,
        )

    def _swap(self, config: Config, router: Router, upstreams: UpstreamPool) -> None:
        """A reload's swap: every reference the request path reads, in one synchronous step
        (requests in flight keep the plan and pool they read; new ones take these)."""
        self.config, self.router, self.upstreams = config, router, upstreams
        self.health.use_policy(config.routing.breaker)
        self.forwarder.use(config)
        self.model_request.use(config, router, upstreams)
        self.client_routes.use(router)

    # ---------------------------------------------------------------- life cycle

    async def open(self) -> None:
        """Open the stores, the breaker states, the upstream pools and the usage sink;
        start the checks and the control plane."""
        stack = self._stack
        try:
            await self.store.open()
            stack.push_async_callback(self.store.close)
            await self.limiter.open()
            stack.push_async_callback(self.limiter.close)
            stack.push_async_callback(self.health.close)
            if self.health.shared:
                await self.health.sync()
                self._tasks.append(asyncio.create_task(self.health.run_sync(self.config.routing.shared_sync_s)))
            await self._open_upstreams()
            stack.push_async_callback(self._close_upstreams)
            await self.sink.start()
            self.last_used.start()
            stack.push_async_callback(self.last_used.close)   # after the sink's flush, before the store
            stack.push_async_callback(self._close_accounting)
            self._tasks.append(asyncio.create_task(self.checks.run()))
            await self._control.setup()
            stack.push_async_callback(self._close_control)
        except BaseException:
            await stack.aclose()
            raise
        self.ready = True

    async def close(self) -> None:
        """After the handlers drained: in reverse; the usage sink flushes last but the stores."""
        self.ready = False
        if self.access_log is not None:
            self.access_log.flush()
        await self._stack.aclose()

    async def _close_control(self) -> None:
        await self._relay.close()
        await self._control.cleanup()

    async def _close_accounting(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.admission.drain()
        # Handlers have drained by now (the server closes the gateway last): flush last.
        await self.sink.close()

    async def _open_upstreams(self) -> None:
        cfg = self.config
        mock_base = ""
        if any(u.is_mock for u in cfg.upstreams):
            self._mock = web.AppRunner(build_mock_app(MockOptions()), access_log=None)
            await self._mock.setup()
            await web.TCPSite(self._mock, "127.0.0.1", 0).start()
            mock_base = f"http://127.0.0.1:{self._mock.addresses[0][1]}"
        fill_pool(self.upstreams, cfg, mock_base)
        self.reloader.mock_base = mock_base
        if self.router.skipped:
            log.warning("models left out (their upstream has no credential): %s", ", ".join(self.router.skipped))

    async def _close_upstreams(self) -> None:
        await self.reloader.close()
        await self.upstreams.close()   # the current pool: a reload may have replaced the first
        if self._mock is not None:
            await self._mock.cleanup()


def build_gateway(
    config: Config,
    *,
    store: Store | None = None,
    limiter: Limiter | None = None,
    config_path: str | None = None,
    parent_pid: int | None = None,
) -> Gateway:
    """Every part of one gateway process, not yet open (`await gateway.open()`).
    `config_path`: the file a reload reads (None: resolved as at start-up); `parent_pid`:
    the --workers parent, told of reloads asked through the admin API."""
    store = store or open_store(config.storage.url)
    limiter = limiter or make_limiter(config.limits.url, spend_seed=store.spend_usd)
    return Gateway(config, store, limiter, config_path=config_path, parent_pid=parent_pid)


def make_route_health(config: Config) -> RouteHealth:
    """Breaker states in this process, or shared through Redis when the limits are."""
    policy = config.routing.breaker
    if config.limits.url.startswith(("redis://", "rediss://")):
        return RouteHealth(policy, RedisStates(config.limits.url, policy))
    return RouteHealth(policy)


__all__ = ["PUBLIC_PATHS", "Gateway", "build_gateway"]
