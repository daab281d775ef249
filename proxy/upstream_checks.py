"""Calls the gateway makes to upstreams on its own: active health checks and the admin's
route test. Both feed the routes' circuit breakers like real calls do.

- Health checks (`upstreams[].health_check_s`, off by default): a GET of the upstream's
  model list (its dialect says where), authenticated with the upstream's credential;
  the verdict counts for every route of that upstream. Nothing is billed: no usage record.
- `POST /admin/upstreams/test`: one tiny real call (its dialect's smallest request, one
  output token) through one route with the gateway's credential. It is a model call, so
  it leaves one usage record (no key; endpoint as called) like any other attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from proxy.health import RouteHealth, failure_for_status, retry_after_s
from proxy.http1.client import UpstreamConnectionError
from proxy.metering import meter_for, settle
from proxy.metering.base import Usage
from proxy.middleware.context import fresh_request_id
from proxy.pricing import cost_usd
from proxy.routing import Route, Router
from proxy.store.base import UsageRecord
from proxy.upstream import UpstreamPool, UpstreamTarget, request_head

log = logging.getLogger("llm_proxy.checks")

_BODY_CAP = 1024 * 1024
Live = Callable[[], tuple[Router, UpstreamPool]]


class UpstreamChecks:
    def __init__(self, live: Live, health: RouteHealth, record: Callable[[UsageRecord], None]) -> None:
        self._live = live
        self._health = health
        self._record = record

    # ------------------------------------------------------------------ admin route test

    async def test(self, route: Route, upstreams: UpstreamPool, model: str) -> dict[str, object]:
        """{"status", "latency_ms", "error"}: status 0 when the upstream never answered."""
        target = upstreams.get(route.upstream.name)
        endpoint, body = target.dialect.test_call(route.upstream_model)
        path = target.dialect.upstream_url(target.base_path, endpoint, route.upstream_model, False, "")
        rid = fresh_request_id()
        started, sent = time.time(), time.monotonic()
        status, error, usage, ttft, wait = 0, None, Usage(), None, None
        try:
            resp = await target.client.request("POST", path, request_head({}, target, rid), body, target.config.timeouts.first_byte_s)
            try:
                status, wait = resp.status, retry_after_s(resp.headers)
                ttft = (time.monotonic() - sent) * 1000
                data = await resp.read_all(_BODY_CAP, target.config.timeouts.idle_s)
            finally:
                resp.close()
            if status < 300:
                meter = meter_for(endpoint, False)
                meter.feed_body(data)
                meter.finish()
                usage, _ = settle(meter, 0)
            else:
                error = f"upstream_{status}"
        except TimeoutError:
            error = "timeout"
        except (UpstreamConnectionError, OSError):
            error = "unreachable"
        latency_ms = (time.monotonic() - sent) * 1000
        await self._report(route, status, error, latency_ms, wait)
        self._record(UsageRecord(
            rid, started, None, None, endpoint, model, route.upstream.name, route.upstream_model, False, status,
            usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_creation_tokens,
            usage.reasoning_tokens, cost_usd(route.model.price, usage), False, ttft, latency_ms, error,
            "ok" if error is None else ("timeout" if error == "timeout" else "upstream_error"),
            upstream_protocol=route.upstream.protocol, attempt=0,   # no client: no client dialect
        ))
        return {"status": status, "latency_ms": round(latency_ms, 1), "error": error}

    # ------------------------------------------------------------------ active health checks

    async def run(self) -> None:
        """Check each upstream whose health_check_s is set, on its own interval; the set of
        upstreams is read again every second (a reload may change it)."""
        due: dict[str, float] = {}
        while True:
            router, upstreams = self._live()
            now = time.monotonic()
            checked = []
            for route in router.routes:
                up = route.upstream
                if up.health_check_s <= 0 or up.name in checked:
                    continue
                checked.append(up.name)
                if due.get(up.name, 0.0) <= now:
                    due[up.name] = now + up.health_check_s
                    try:
                        await self.check(upstreams.get(up.name), [r for r in router.routes if r.upstream.name == up.name])
                    except Exception:   # one upstream's check must not end the others'
                        log.exception("health check of upstream %s failed", up.name)
            await asyncio.sleep(1.0)

    async def check(self, target: UpstreamTarget, routes: list[Route]) -> tuple[int, str | None]:
        status, error, wait = 0, None, None
        sent = time.monotonic()
        head = request_head({}, target, fresh_request_id())
        try:
            resp = await target.client.request("GET", target.dialect.models_url(target.base_path), head, b"", target.config.timeouts.connect_s + 10)
            try:
                status, wait = resp.status, retry_after_s(resp.headers)
                await resp.read_all(_BODY_CAP, target.config.timeouts.idle_s)
            finally:
                resp.close()
            kind = failure_for_status(status)
            error = None if kind is None else f"upstream_{status}"
        except TimeoutError:
            error = "timeout"
        except (UpstreamConnectionError, OSError):
            error = "unreachable"
        latency_ms = (time.monotonic() - sent) * 1000
        if error is not None:
            log.warning("health check failed: upstream %s: %s after %.0f ms", target.name, error, latency_ms)
        for route in routes:
            await self._report(route, status, error, latency_ms, wait)
        return status, error

    async def _report(self, route: Route, status: int, error: str | None, latency_ms: float, wait: float | None) -> None:
        """An answer whose status fails no route (2xx, or a 4xx about the request itself)
        says the route works; no answer or a failing status counts against it."""
        if error is None or (status and failure_for_status(status) is None):
            self._health.succeeded(route, latency_ms)
        else:
            await self._health.failed(route, wait, latency_ms, error)
