"""The model call's handler: forward to the plan's routes in turn, tee the answer.

The last stage of the model-call chain (proxy/gateway.py): the earlier stages parsed the
body, authenticated, reserved limits and opened the usage accounting. One `Forwarder`
serves every model-calling route of every dialect; it knows nothing of a provider's wire
format beyond what the endpoint's dialect, its meter and the translator tell it. Each
attempt leaves a pending record before it goes upstream and its record when it ends
(`UsageAccounting`); the last one is recorded by the accounting stage, whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import orjson

from proxy.config import Config
from proxy.dialects import Dialect, Endpoint
from proxy.errors import (
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
)
from proxy.health import Failure, RouteHealth, failure_for_status, retry_after_s
from proxy.http1.client import Http1Response, UpstreamConnectionError
from proxy.http1.server import Exchange
from proxy.metering import meter_for
from proxy.metering.openai import UsageChunkDropper, ensure_include_usage
from proxy.metering.sse import WholeEvents
from proxy.middleware.accounting import UsageAccounting, next_attempt
from proxy.middleware.draining import StreamRegistry
from proxy.pipeline import Call, HeaderList
from proxy.routing import Route
from proxy.store.base import Outcome
from proxy.translate import CountTranslation, Translation, translation_for
from proxy.translate.common import ClientContext
from proxy.translate.stream import StreamTranslator
from proxy.upstream import UpstreamPool, UpstreamTarget, open_response, request_head, scrub_secret

log = logging.getLogger("llm_proxy.forward")

# Upstream response headers worth passing to the client.
_PASS_HEADERS = {
    "content-type": "Content-Type", "content-encoding": "Content-Encoding",
    "retry-after": "Retry-After", "x-should-retry": "x-should-retry",
}  # received -> sent
_PASS_NAMES = frozenset(_PASS_HEADERS)
_STREAM_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
_UPSTREAM_BODY_CAP = 64 * 1024 * 1024
# How an upstream broke a stream after its first byte (proxy/health/verdict.py).
_CUT = Failure("cut")
_STALLED = Failure("timeout")


class Forwarder:
    def __init__(self, config: Config, usage: UsageAccounting, streams: StreamRegistry, health: RouteHealth) -> None:
        self._usage = usage
        self._streams = streams
        self._health = health
        self.use(config)
        # (upstream, upstream_model) pairs that rejected stream_options.include_usage.
        self._no_include_usage: set[tuple[str, str]] = set()

    def use(self, config: Config) -> None:
        """Swap in a (re)loaded configuration. The plan and the upstream pool of a call
        come with the call (read together by the model request stage)."""
        self._keepalive_s = config.server.stream_keepalive_s

    def __call__(self, call: Call) -> Awaitable[None]:
        """Serve one model call (the chain's handler). While every route is settled (no
        failures on record) the plan is tried as it is, in this one coroutine."""
        if self._health.unsettled:
            return self._arranged(call)
        return self._attempts(call, call.plan)

    async def _arranged(self, call: Call) -> None:
        """Some route has failures on record: routes that cool down are skipped, and the
        half-open ones leased while tried."""
        plan, leases = await self._health.arrange(call.plan)
        try:
            await self._attempts(call, plan)
        finally:
            if leases:
                self._health.release(leases)

    # ------------------------------------------------------------------ attempts

    async def _attempts(self, call: Call, plan: Sequence[Route]) -> None:
        """Try `plan`'s routes in turn until one answers. The call's headers go on the
        answer, and its limit lines (the same, encoded).

        ProxyErrors raised before anything was sent are the request context's to render;
        once a stream has started, failures end it in the caller's dialect here. Before
        the first byte, a route that fails (proxy/health/verdict.py) is recorded, logged
        and reported to the route's breaker, and the next route is tried. The last route's
        failure is relayed as the upstream said it, unless an earlier failure says more (a
        429 with its Retry-After beats a refused connection): then that one is rendered in
        the caller's dialect.

        After the first byte, a stream the upstream breaks is reported to the breaker too
        (once, as the relay ends) but not retried. A stream's success is reported then as
        well, not at its head: a route whose every stream is cut would reset its count."""
        ex, body, headers, lines = call.ex, call.body, call.headers, call.limit_lines
        raw = ex.request.body
        endpoint, upstreams = _endpoint(call), _pool(call)
        best: Failure | None = None
        last_error: ProxyError | None = None
        health = self._health
        for attempt, route in enumerate(plan):
            # The route becomes the call's (and gets a record) only once its body is made:
            # a body the translator refuses (400) or a count estimated here (no counter
            # upstream) never reached an upstream.
            call.route = None
            if attempt:
                next_attempt(call)
            target = upstreams.get(route.upstream.name)
            # The one seam of cross-dialect translation: None keeps the byte-exact path.
            translation = translation_for(endpoint.name, route.upstream, body)
            if isinstance(translation, CountTranslation) and translation.local:
                data, marker = translation.estimate(body)
                return ex.respond(200, [*headers, marker, ("Content-Type", "application/json")], data, lines)
            if translation is None:
                out, dropper_needed = self._upstream_body(call, endpoint, body, raw, route)
            else:
                out, dropper_needed = translation.request(body, route.upstream_model, call.stream), False
            call.route = route
            self._usage.pending(call)
            sent = time.monotonic()
            try:
                resp = await self._open(ex, call, endpoint, target, out, dropper_needed, body, raw, route, translation)
            except (UpstreamError, UpstreamTimeout) as exc:
                self._usage.record_failed(call, exc)
                failure = Failure("timeout" if isinstance(exc, UpstreamTimeout) else "unreachable")
                await self._attempt_failed(call, failure, sent)
                if failure.outranks(best):
                    # Kept without its traceback, which holds this frame (a cycle otherwise,
                    # also when a later route answers); raising it again gives it a new one.
                    best, last_error = failure, exc.with_traceback(None)
                continue
            reported = False
            try:
                kind = None if resp.status < 400 else failure_for_status(resp.status)
                head_ms = (time.monotonic() - sent) * 1000
                streamed = call.stream and resp.status == 200 and _is_stream(resp)
                if kind is None:
                    if not streamed:
                        health.succeeded(route, head_ms)
                else:
                    failure = Failure(kind, resp.status, retry_after_s(resp.headers))
                    await self._attempt_failed(call, failure, sent)
                    reported = True
                    if attempt + 1 < len(plan) or (best is not None and best.outranks(failure)):
                        # Nothing reached the client yet: the next route may do better.
                        call.outcome, call.error, call.status = "upstream_error", f"upstream_{resp.status}", resp.status
                        self._usage.record(call)
                        if failure.outranks(best):
                            best, last_error = failure, None
                        continue
                if 300 <= resp.status < 400:
                    # Never followed nor passed on: a redirect could
                    # send the caller, or a later hop, to an internal host.
                    raise UpstreamError(f"The upstream answered with a redirect (status {resp.status}).")
                if not streamed:
                    if translation is not None:
                        ctx = translation.context(call.model, call.stream, call.prompt_estimate, ex.request.query_string)
                        return await self._translated(ex, call, target, resp, translation, ctx, headers, lines)
                    if resp.status < 300:
                        call.meter = meter_for(endpoint.name, call.stream, sse=endpoint.dialect.streams_sse(ex.request.query_string))
                    return await self._relay_body(ex, call, target, resp, headers, lines)
                try:
                    if translation is not None:
                        ctx = translation.context(call.model, call.stream, call.prompt_estimate, ex.request.query_string)
                        broke = await self._translated_stream(ex, call, target, resp, translation, ctx, headers, lines)
                    else:
                        call.meter = meter_for(endpoint.name, call.stream, sse=endpoint.dialect.streams_sse(ex.request.query_string))
                        relay: UsageChunkDropper | WholeEvents | None = None
                        if dropper_needed:
                            relay = UsageChunkDropper()
                        elif (resp.headers.get("content-type") or "").startswith("text/event-stream"):
                            relay = WholeEvents()
                        broke = await self._relay_stream(ex, call, target, resp, relay, headers, lines)
                except asyncio.CancelledError:
                    # The client left, or the gateway is stopping: not the route's doing.
                    health.succeeded(route, head_ms)
                    raise
                if broke is None:
                    health.succeeded(route, head_ms)
                else:
                    reported = True
                    await self._attempt_failed(call, broke, sent)
                return
            except ProxyError as exc:
                call.outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error"
                call.error, call.status = exc.code, exc.status
                if not reported:
                    await self._attempt_failed(call, Failure("timeout" if isinstance(exc, UpstreamTimeout) else "server_error"), sent)
                raise
            finally:
                resp.close()
        try:
            raise last_error or _error_for(best)
        finally:
            last_error = None  # raised, its traceback holds this frame: not both ways

    async def _attempt_failed(self, call: Call, failure: Failure, sent: float) -> None:
        """Each failed attempt: one WARNING line (never a key or a body) and one report to
        the route's breaker."""
        route = call.route
        assert route is not None
        latency_ms = (time.monotonic() - sent) * 1000
        log.warning(
            "upstream attempt failed: request %s upstream %s model %s: %s after %.0f ms",
            call.request_id, route.upstream.name, route.upstream_model, failure.label, latency_ms,
        )
        await self._health.failed(route, failure.retry_after, latency_ms, failure.label)

    def _upstream_body(
        self, call: Call, endpoint: Endpoint, body: dict[str, Any], raw: bytes, route: Route
    ) -> tuple[bytes, bool]:
        """Re-encode only when something must change; say whether to drop a usage event."""
        changed = False
        if not endpoint.model_in_path:
            if body.get("model") != route.upstream_model:
                body = {**body, "model": route.upstream_model}
                changed = True
        elif endpoint.retarget is not None and call.model != route.upstream_model:
            retargeted = endpoint.retarget(body, call.model, route.upstream_model)
            if retargeted is not None:
                body, changed = retargeted, True
        dropper = False
        if (
            call.stream
            and endpoint.wants_include_usage
            and route.upstream.stream_usage
            and (route.upstream.name, route.upstream_model) not in self._no_include_usage
        ):
            new_body, client_asked = ensure_include_usage(body)
            if not client_asked:
                body, changed, dropper = new_body, True, True
        return (orjson.dumps(body) if changed else raw), dropper

    async def _open(
        self,
        ex: Exchange,
        call: Call,
        endpoint: Endpoint,
        target: UpstreamTarget,
        out: bytes,
        dropper_needed: bool,
        body: dict[str, Any],
        raw: bytes,
        route: Route,
        translation: Translation | None = None,
    ) -> Http1Response:
        if translation is None:
            path = target.dialect.upstream_url(
                target.base_path, endpoint.name, route.upstream_model, call.stream, ex.request.query_string
            )
        else:
            path = target.dialect.upstream_url(
                target.base_path, translation.upstream_endpoint(call.stream), route.upstream_model, call.stream,
                translation.upstream_query(call.stream),
            )
        head = request_head(ex.request.headers, target, call.record_id)
        resp = await open_response(target, path, out, head)
        if resp.status == 400 and dropper_needed:
            # Some OpenAI-compatible servers reject stream_options: ask once without it,
            # remember, and estimate usage for those streams. The rejected request reached
            # the upstream: it is an attempt with its own record (status, zero tokens).
            resp.close()
            self._no_include_usage.add((route.upstream.name, route.upstream_model))
            log.info("upstream %s rejects include_usage for %s; estimating", target.name, route.upstream_model)
            call.status, call.outcome, call.error = 400, "upstream_error", "upstream_400"
            self._usage.record(call)
            next_attempt(call)
            out, _ = self._upstream_body(call, endpoint, body, raw, route)
            self._usage.pending(call)
            resp = await open_response(target, path, out, head)
        return resp

    # ------------------------------------------------------------------ relays

    async def _translated(
        self,
        ex: Exchange,
        call: Call,
        target: UpstreamTarget,
        resp: Http1Response,
        translation: Translation,
        ctx: ClientContext,
        headers: HeaderList,
        lines: bytes,
    ) -> None:
        """The upstream's answer (not a stream), in the caller's dialect: metered on the
        upstream's own bytes (its numbers are what is billed), relayed through the translator."""
        if resp.status < 300:
            call.meter = meter_for(translation.upstream_endpoint(call.stream), call.stream, sse=True)
        headers = _dropped_header(translation, headers)
        return await self._relay_body(ex, call, target, resp, headers, lines, translation, ctx)

    async def _translated_stream(
        self,
        ex: Exchange,
        call: Call,
        target: UpstreamTarget,
        resp: Http1Response,
        translation: Translation,
        ctx: ClientContext,
        headers: HeaderList,
        lines: bytes,
    ) -> Failure | None:
        """The upstream's stream, in the caller's dialect (metered as in `_translated`)."""
        call.meter = meter_for(translation.upstream_endpoint(call.stream), call.stream, sse=True)
        headers = _dropped_header(translation, headers)
        return await self._relay_stream(ex, call, target, resp, translation.stream(ctx), headers, lines)

    async def _relay_body(
        self,
        ex: Exchange,
        call: Call,
        target: UpstreamTarget,
        resp: Http1Response,
        headers: HeaderList,
        lines: bytes,
        translation: Translation | None = None,
        ctx: ClientContext | None = None,
    ) -> None:
        try:
            data = await resp.read_all(_UPSTREAM_BODY_CAP, target.config.timeouts.idle_s)
        except TimeoutError:
            raise UpstreamTimeout("The upstream stopped sending its answer.") from None
        except (UpstreamConnectionError, OSError):
            raise UpstreamError("The upstream connection failed while reading the answer.") from None
        call.status = resp.status
        call.ttft_ms = (time.time() - call.started) * 1000
        if resp.status in (401, 403):
            # The provider rejected the operator's credential; its body may echo it.
            # (Logged with every failed attempt, in _attempt_failed.)
            raise UpstreamError("The upstream rejected the gateway's credentials.", code="upstream_auth_error")
        if resp.status == 529:
            raise UpstreamOverloaded("The upstream is overloaded; please retry.")
        if resp.status >= 500:
            raise UpstreamError(f"The upstream failed with status {resp.status}.")
        if call.meter is not None:
            call.meter.feed_body(data)
            call.meter.finish()
        elif resp.status >= 400:
            call.outcome, call.error = "upstream_error", f"upstream_{resp.status}"
        if translation is not None and ctx is not None:
            if resp.status >= 400:
                raise translation.error(resp.status, scrub_secret(data, target.secret), resp.headers.get("retry-after"))
            data = translation.response(data, ctx)
            ex.respond(resp.status, [*headers, ("Content-Type", "application/json")], data, lines)
            return
        if resp.status >= 400:
            # An error body may echo the operator's key, whole, masked or cut short.
            data = call.dialect.relay_error_body(scrub_secret(data, target.secret), call.request_id)
        ex.respond(resp.status, _pass_headers(resp, headers), data, lines)

    async def _relay_stream(
        self,
        ex: Exchange,
        call: Call,
        target: UpstreamTarget,
        resp: Http1Response,
        relay: UsageChunkDropper | WholeEvents | StreamTranslator | None,
        headers: HeaderList,
        lines: bytes,
    ) -> Failure | None:
        """Relay an upstream stream to the client. Returns how the upstream broke it after
        its first byte (for the route's breaker), None when it did not (it ended whole, or
        the client left); before the first byte, upstream failures are raised."""
        meter = call.meter
        assert meter is not None  # set for every 2xx answer
        # The head goes out with the first data or keep-alive: an upstream that fails
        # before sending anything still gets a plain 502 in the caller's dialect.
        head = _pass_headers(resp, headers) + _STREAM_HEADERS
        dialect = call.dialect
        errors: Dialect | StreamTranslator | _ArrayStreamErrors = dialect
        if isinstance(relay, StreamTranslator):
            # Translated: the caller's content type and error framing, not the upstream's.
            head = [h for h in head if h[0] != "Content-Type"] + [("Content-Type", relay.content_type)]
            errors = relay
        elif not dialect.streams_sse(ex.request.query_string):
            errors = _ArrayStreamErrors(dialect)
        keepalive = dialect.keepalive
        idle_s = target.config.timeouts.idle_s
        wait_s = min(idle_s, self._keepalive_s) if keepalive else idle_s
        loop = asyncio.get_running_loop()
        last_data = loop.time()
        # One SSE split serves the relay and the meter when both read events.
        shared = relay is not None and meter.frames_sse()
        # The final event went out: a client that closes after it got the whole answer
        # (openai-python and Codex close as soon as they read [DONE] / response.completed).
        delivered = False
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            while True:
                chunk = await resp.read_within(wait_s)
                if chunk is None:
                    if loop.time() - last_data >= idle_s:
                        raise UpstreamTimeout("The upstream stopped sending data.")
                    _begin(ex, call, head, lines)
                    await ex.write(keepalive)  # type: ignore[arg-type]  # None only when wait_s == idle_s: raised above
                    continue
                if not chunk:
                    break
                last_data = loop.time()
                if relay is None:
                    meter.feed(chunk)
                else:
                    out = relay.feed(chunk)
                    if shared:
                        meter.feed_events(relay.events, chunk if relay.events is not None else out)
                    else:
                        meter.feed(chunk)
                    chunk = out
                    if not chunk:
                        continue
                if call.ttft_ms is None:
                    call.ttft_ms = (time.time() - call.started) * 1000
                    _begin(ex, call, head, lines)  # unless a keep-alive already sent it
                paused = ex.send(chunk)
                delivered = meter.final
                if paused:
                    await ex.drain()
            rest = relay.flush() if relay is not None else b""
            if shared:
                meter.feed_events(relay.events, rest)  # type: ignore[union-attr]  # shared: relay is set
            meter.finish()
            _begin(ex, call, head, lines)
            if rest:
                await ex.write(rest)
                delivered = meter.final
            # The upstream's last bytes go out as they came: a last event it left without its
            # blank line is not completed here, or the client would act on an event the
            # upstream never finished (issue 25 item 11; CLIENTS.md 57 binds the events the
            # gateway writes itself: errors and shutdown notices, each ends with its blank line).
            ex.end()
            # An upstream that closes without its final event broke the answer off (after
            # an error event, typically): its route is charged, the bytes went out as they came.
            return None if meter.final else _CUT
        except (UpstreamTimeout, UpstreamError) as exc:
            if not ex.head_sent:
                raise
            await self._end_stream(call, ex, exc, "timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error", errors)
            return _STALLED if isinstance(exc, UpstreamTimeout) else _CUT
        except UpstreamConnectionError as exc:
            log.warning("upstream %s cut the stream (%s)", target.name, type(exc).__name__)
            if not ex.head_sent:
                raise UpstreamError("The upstream connection failed before its answer.") from None
            await self._end_stream(call, ex, UpstreamError("The upstream connection failed mid-stream."), "upstream_error", errors)
            return _CUT
        except ConnectionResetError:
            if not delivered:
                call.outcome, call.error = "client_abort", "client_abort"
            return None
        except asyncio.CancelledError:
            if delivered:  # the client left after the final event: a whole answer, "ok"
                if not ex.client_gone:
                    _try_end(ex)
            elif self._streams.ending:
                call.outcome, call.error = "shutdown", "server_shutdown"
                if not ex.client_gone:
                    _begin(ex, call, head, lines)
                await _try_write(ex, errors.stream_error_event(_shutdown_error(), call.request_id))
                _try_end(ex)
            else:
                call.outcome, call.error = "client_abort", "client_abort"
            raise
        finally:
            self._streams.discard(task)
            # A cancelled task's CancelledError holds this frame (its traceback); the frame
            # must not hold the task too, or both wait for the cyclic collector.
            del task

    async def _end_stream(
        self, call: Call, out: Exchange, err: ProxyError, outcome: Outcome,
        errors: Dialect | StreamTranslator | _ArrayStreamErrors,
    ) -> None:
        call.outcome, call.error = outcome, err.code
        await _try_write(out, errors.stream_error_event(err, call.request_id))
        _try_end(out)

# ---------------------------------------------------------------------- helpers


class _ArrayStreamErrors:
    """The gateway's mid-stream error on a stream that is one JSON array (Gemini without
    `alt=sse`), relayed as the upstream wrote it: the error is the array's last element,
    and the array is closed, so the body still parses (an SSE line would break it)."""

    __slots__ = ("_dialect",)

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect

    def stream_error_event(self, err: ProxyError, request_id: str) -> bytes:
        return b",\r\n" + self._dialect.error_body(err, request_id) + b"]"


def _endpoint(call: Call) -> Endpoint:
    endpoint = call.endpoint
    assert endpoint is not None   # set on every model route
    return endpoint


def _pool(call: Call) -> UpstreamPool:
    pool = call.upstreams
    assert pool is not None   # set with the plan by the model request stage
    return pool


def _begin(ex: Exchange, call: Call, head: HeaderList, lines: bytes) -> None:
    """Send the stream's head, once."""
    if not ex.head_sent:
        ex.start(200, head, lines)
        call.status = 200


def _is_stream(resp: Http1Response) -> bool:
    ctype = resp.headers.get("content-type") or ""
    # Gemini's streamGenerateContent without alt=sse streams a JSON array.
    return ctype.startswith(("text/event-stream", "application/json"))


def _pass_headers(resp: Http1Response, headers: HeaderList) -> HeaderList:
    out = list(headers)
    got = resp.headers
    # The intersection runs in C; an answer usually has one of these (its content type).
    for name in _PASS_NAMES & got.keys():
        out.append((_PASS_HEADERS[name], got[name]))
    return out


def _dropped_header(translation: Translation, headers: HeaderList) -> HeaderList:
    """Tell the client which of its request's fields the upstream's dialect cannot carry."""
    if translation.dropped:
        return [*headers, ("x-llm-proxy-translation", "dropped=" + ",".join(translation.dropped)[:512])]
    return headers


def _error_for(best: Failure | None) -> ProxyError:
    """The error for a call whose every route failed, `best` being the most telling
    upstream answer (connection errors and timeouts are re-raised as they were)."""
    if best is None:
        return UpstreamError("No upstream could serve the request.")
    wait = math.ceil(best.retry_after) if best.retry_after is not None else None
    if best.kind == "rate_limited":
        return RateLimited("The upstream provider is rate limiting this model; retry later.", retry_after_s=wait)
    if best.kind == "overloaded":
        return UpstreamOverloaded("The upstream is overloaded; please retry.", retry_after_s=wait)
    if best.kind == "auth":
        return UpstreamError("The upstream rejected the gateway's credentials.", code="upstream_auth_error")
    return UpstreamError(f"The upstream failed with status {best.status}.")


def _shutdown_error() -> ServiceUnavailable:
    return ServiceUnavailable("The gateway is shutting down; the stream was ended.", code="server_shutdown")


async def _try_write(out: Exchange, data: bytes) -> None:
    try:
        await out.write(data)
    except (ConnectionResetError, RuntimeError):
        pass


def _try_end(out: Exchange) -> None:
    try:
        out.end()
    except (ConnectionResetError, RuntimeError):
        pass
