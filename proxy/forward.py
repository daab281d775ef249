"""The model-call pipeline: parse once, route, admit, forward, tee, record.

One `Forwarder` serves every model-calling route of every dialect. It knows nothing
of a provider's wire format beyond what the endpoint's dialect and meter tell it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.accounting import UsageSink
from proxy.config import Config
from proxy.dialects import Endpoint
from proxy.errors import (
    InvalidRequest,
    ModelNotAllowed,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UnsupportedMediaType,
    UnsupportedParameter,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
    UsageUnavailable,
)
from proxy.health import Failure, RouteHealth, failure_for_status, retry_after_s
from proxy.http1.client import Http1Response, UpstreamConnectionError
from proxy.http1.server import Exchange
from proxy.limits.base import Reservation
from proxy.metering import meter_for, settle_usage
from proxy.metering.base import Meter, Usage
from proxy.metering.estimate import estimate_prompt_tokens
from proxy.metering.openai import UsageChunkDropper, ensure_include_usage
from proxy.metering.sse import WholeEvents
from proxy.middleware.context import fresh_request_id
from proxy.middleware.limits import Admission
from proxy.pricing import cost_usd, max_cost_usd
from proxy.routing import Route, Router
from proxy.store.base import KeyRecord, Outcome, UsageRecord
from proxy.translate import Translation, targets, translation_for
from proxy.translate.common import ClientContext
from proxy.translate.stream import StreamTranslator
from proxy.upstream import UpstreamPool, UpstreamTarget, open_response, request_head, scrub_secret

log = logging.getLogger("llm_proxy.forward")

# Body fields that would let a caller choose hosts or credentials in other gateways
# (LiteLLM CVE-2024-6587). We never honour them, and refuse them so nobody thinks we do.
FORBIDDEN_FIELDS = frozenset(
    {"api_base", "base_url", "api_key", "user_config", "extra_headers", "custom_llm_provider", "api_version"}
)
# Where a body holds the caller's own content, whose keys are data, not settings: message
# text and history (tool call inputs included), prompts, tool and output schemas (a tool
# may well take an `api_key` parameter). Forbidden fields are looked for everywhere else,
# at any depth (`extra_body`, `litellm_params`, `metadata`, ...).
_CONTENT_FIELDS = frozenset({
    "messages", "input", "contents", "system", "systemInstruction", "instructions", "prompt", "suffix",
    "tools", "functions", "tool_choice", "toolConfig", "response_format", "text",
    "responseSchema", "responseJsonSchema", "response_schema", "json_schema", "parameters", "input_schema", "schema",
})
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Upstream response headers worth passing to the client.
_PASS_HEADERS = {
    "content-type": "Content-Type", "content-encoding": "Content-Encoding",
    "retry-after": "Retry-After", "x-should-retry": "x-should-retry",
}  # received -> sent
_PASS_NAMES = frozenset(_PASS_HEADERS)
_STREAM_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
HeaderList = list[tuple[str, str]]
_UPSTREAM_BODY_CAP = 64 * 1024 * 1024


@dataclass(slots=True)
class Call:
    """What one model call knows as it goes; becomes one usage record per attempt."""

    request_id: str              # the record's id (see record_id)
    client_request_id: str       # what the client sees in x-request-id
    started: float
    endpoint: Endpoint
    key: KeyRecord | None
    model: str
    stream: bool
    prompt_estimate: int
    route: Route | None = None
    attempt: int = 0
    status: int = 0
    ttft_ms: float | None = None
    outcome: Outcome = "ok"
    error: str | None = None
    meter: Meter | None = None
    max_output: int | None = None  # the most output tokens the request allows, if it says
    emitted: bool = False        # the current attempt's record went out
    records: list[UsageRecord] = field(default_factory=list)


class Forwarder:
    def __init__(
        self,
        config: Config,
        router: Router,
        upstreams: UpstreamPool,
        admission: Admission,
        sink: UsageSink,
        state: StreamRegistry,
        health: RouteHealth | None = None,
    ) -> None:
        self._admission = admission
        self._sink = sink
        self._record = sink.record
        self._streams = state
        self._health = health or RouteHealth(config.routing.breaker)
        self.use(config, router, upstreams)
        # (upstream, upstream_model) pairs that rejected stream_options.include_usage.
        self._no_include_usage: set[tuple[str, str]] = set()

    def use(self, config: Config, router: Router, upstreams: UpstreamPool) -> None:
        """Swap in a (re)loaded configuration. Requests read the router and the pool
        together before their first await, so each runs wholly on one configuration:
        those in flight finish on the old one, new ones take this."""
        self._router = router
        self._upstreams = upstreams
        self._keepalive_s = config.server.stream_keepalive_s
        self._default_max_tokens = config.limits.default_max_tokens

    # ------------------------------------------------------------------ entry point

    async def handle(
        self,
        ex: Exchange,
        endpoint: Endpoint,
        key: KeyRecord | None,
        request_id: str,
        common: HeaderList,
        path_model: str | None = None,
    ) -> None:
        """Serve one model call. `common` headers go on every response (request id, CORS).

        ProxyErrors raised before anything was sent are the caller's to render; once a
        stream has started, failures end it in the caller's dialect here.
        """
        if not self._sink.accepting:
            raise UsageUnavailable()   # the call could not be billed: refused before any work
        request = ex.request
        encoding = request.headers.get("content-encoding")
        if encoding is not None and encoding.lower() != "identity":
            # Compressed request bodies are a decompression-bomb surface; no client needs them.
            raise UnsupportedMediaType("Compressed request bodies are not accepted.", code="unsupported_content_encoding")
        raw = request.body
        body = _parse_body(raw)
        if endpoint.required:
            _check_fields(body, endpoint)
        model = _model_of(body, endpoint, path_model)
        stream = _stream_flag(body, endpoint)
        if key is not None and key.models and model not in key.models:
            raise ModelNotAllowed(f"This key may not use the model '{model[:64]}'.", param="model")
        plan: Sequence[Route] = self._router.plan(model, endpoint.dialect.name, targets(endpoint.name))
        upstreams = self._upstreams   # read with the plan: one configuration per request
        price = plan[0].model.price
        prompt_estimate = estimate_prompt_tokens(raw)
        max_out = _max_output_tokens(body, self._default_max_tokens)
        record_id = record_id_for(request.headers.get("x-request-id"), request_id)
        call = Call(record_id, request_id, time.time(), endpoint, key, model, stream, prompt_estimate)
        call.max_output = _output_bound(body)
        reserve, reserve_usd = prompt_estimate + max_out, max_cost_usd(price, prompt_estimate, max_out)
        # The record id is always one this process made (record_id_for), never admitted
        # before: a fresh id, which the memory limiter does not need to index.
        admitted = self._admission.admit_now(key, call.request_id, reserve, reserve_usd, True)
        if admitted is None:   # the limiter must wait (Redis, or a budget's first request)
            admitted = await self._admission.admit(key, call.request_id, reserve, reserve_usd, True)
        reservation, limit_lines = admitted
        leases: list[tuple[tuple[str, str], float]] = []
        try:
            if self._health.unsettled:   # some route has failures on record: skip what cools down
                plan, leases = await self._health.arrange(plan)
            await self._run(ex, call, body, raw, plan, common, limit_lines, upstreams)
        finally:
            self._finish(call, reservation)
            if leases:
                self._health.release(leases)

    # ------------------------------------------------------------------ attempts

    async def _run(
        self,
        ex: Exchange,
        call: Call,
        body: dict[str, Any],
        raw: bytes,
        plan: Sequence[Route],
        headers: HeaderList,
        lines: bytes,
        upstreams: UpstreamPool,
    ) -> None:
        """Try the plan's routes in turn until one answers. `headers` go on the answer,
        and `lines`, the same encoded (rate limits).

        Before the first byte, a route that fails (proxy/health/verdict.py) is recorded,
        logged and reported to the route's breaker, and the next route is tried. The last
        route's failure is relayed as the upstream said it, unless an earlier failure says
        more (a 429 with its Retry-After beats a refused connection): then that one is
        rendered in the caller's dialect."""
        best: Failure | None = None
        last_error: ProxyError | None = None
        health = self._health
        for attempt, route in enumerate(plan):
            call.route = route
            if attempt:
                _next_attempt(call)
            target = upstreams.get(route.upstream.name)
            # The one seam of cross-dialect translation: None keeps the byte-exact path.
            translation = translation_for(call.endpoint.name, route.upstream, body)
            if translation is None:
                out, dropper_needed = self._upstream_body(call, body, raw, route)
            else:
                out, dropper_needed = translation.request(body, route.upstream_model, call.stream), False
            self._pending(call)
            sent = time.monotonic()
            try:
                resp = await self._open(ex, call, target, out, dropper_needed, body, raw, route, translation)
            except (UpstreamError, UpstreamTimeout) as exc:
                self._fail(call, exc)
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
                if kind is None:
                    health.succeeded(route, (time.monotonic() - sent) * 1000)
                else:
                    failure = Failure(kind, resp.status, retry_after_s(resp.headers))
                    await self._attempt_failed(call, failure, sent)
                    reported = True
                    if attempt + 1 < len(plan) or (best is not None and best.outranks(failure)):
                        # Nothing reached the client yet: the next route may do better.
                        call.outcome, call.error, call.status = "upstream_error", f"upstream_{resp.status}", resp.status
                        self._emit(call)
                        if failure.outranks(best):
                            best, last_error = failure, None
                        continue
                if 300 <= resp.status < 400:
                    # Never followed nor passed on: a redirect could
                    # send the caller, or a later hop, to an internal host.
                    raise UpstreamError(f"The upstream answered with a redirect (status {resp.status}).")
                if translation is not None:
                    ctx = translation.context(call.model, call.stream, call.prompt_estimate, ex.request.query_string)
                    return await self._translated(ex, call, target, resp, translation, ctx, headers, lines)
                if resp.status < 300:
                    call.meter = meter_for(call.endpoint.name, call.stream, sse="alt=sse" in ex.request.query_string)
                if call.stream and resp.status == 200 and _is_stream(resp):
                    relay: UsageChunkDropper | WholeEvents | None = None
                    if dropper_needed:
                        relay = UsageChunkDropper()
                    elif (resp.headers.get("content-type") or "").startswith("text/event-stream"):
                        relay = WholeEvents()
                    return await self._relay_stream(ex, call, target, resp, relay, headers, lines)
                return await self._relay_body(ex, call, target, resp, headers, lines)
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
            call.client_request_id, route.upstream.name, route.upstream_model, failure.label, latency_ms,
        )
        await self._health.failed(route, failure.retry_after, latency_ms, failure.label)

    def _upstream_body(self, call: Call, body: dict[str, Any], raw: bytes, route: Route) -> tuple[bytes, bool]:
        """Re-encode only when something must change; say whether to drop a usage event."""
        changed = False
        if not call.endpoint.model_in_path and body.get("model") != route.upstream_model:
            body = {**body, "model": route.upstream_model}
            changed = True
        dropper = False
        if (
            call.stream
            and call.endpoint.wants_include_usage
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
                target.base_path, call.endpoint.name, route.upstream_model, call.stream, ex.request.query_string
            )
        else:
            path = target.dialect.upstream_url(
                target.base_path, translation.upstream_endpoint(call.stream), route.upstream_model, call.stream,
                translation.upstream_query(call.stream),
            )
        head = request_head(ex.request.headers, target, call.request_id)
        resp = await open_response(target, path, out, head)
        if resp.status == 400 and dropper_needed:
            # Some OpenAI-compatible servers reject stream_options: ask once without it,
            # remember, and estimate usage for those streams. The rejected request reached
            # the upstream: it is an attempt with its own record (status, zero tokens).
            resp.close()
            self._no_include_usage.add((route.upstream.name, route.upstream_model))
            log.info("upstream %s rejects include_usage for %s; estimating", target.name, route.upstream_model)
            call.status, call.outcome, call.error = 400, "upstream_error", "upstream_400"
            self._emit(call)
            _next_attempt(call)
            out, _ = self._upstream_body(call, body, raw, route)
            self._pending(call)
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
        """The upstream's answer, in the caller's dialect: metered on the upstream's own
        bytes (its numbers are what is billed), relayed through the translator."""
        if translation.dropped:
            headers = [*headers, ("x-llm-proxy-translation", "dropped=" + ",".join(translation.dropped)[:512])]
        endpoint = translation.upstream_endpoint(call.stream)
        if resp.status < 300:
            call.meter = meter_for(endpoint, call.stream, sse=True)
        if call.stream and resp.status == 200 and _is_stream(resp):
            relay = translation.stream(ctx)
            return await self._relay_stream(ex, call, target, resp, relay, headers, lines)
        return await self._relay_body(ex, call, target, resp, headers, lines, translation, ctx)

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
            data = call.endpoint.dialect.relay_error_body(scrub_secret(data, target.secret), call.client_request_id)
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
    ) -> None:
        meter = call.meter
        assert meter is not None  # set for every 2xx answer
        # The head goes out with the first data or keep-alive: an upstream that fails
        # before sending anything still gets a plain 502 in the caller's dialect.
        head = _pass_headers(resp, headers) + _STREAM_HEADERS
        dialect = call.endpoint.dialect
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
        except (UpstreamTimeout, UpstreamError) as exc:
            if not ex.head_sent:
                raise
            await self._end_stream(call, ex, exc, "timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error")
        except UpstreamConnectionError as exc:
            log.warning("upstream %s cut the stream (%s)", target.name, type(exc).__name__)
            if not ex.head_sent:
                raise UpstreamError("The upstream connection failed before its answer.") from None
            await self._end_stream(call, ex, UpstreamError("The upstream connection failed mid-stream."), "upstream_error")
        except ConnectionResetError:
            if not delivered:
                call.outcome, call.error = "client_abort", "client_abort"
        except asyncio.CancelledError:
            if delivered:  # the client left after the final event: a whole answer, "ok"
                if not ex.client_gone:
                    _try_end(ex)
            elif self._streams.ending:
                call.outcome, call.error = "shutdown", "server_shutdown"
                if not ex.client_gone:
                    _begin(ex, call, head, lines)
                await _try_write(ex, dialect.stream_error_event(_shutdown_error(), call.client_request_id))
                _try_end(ex)
            else:
                call.outcome, call.error = "client_abort", "client_abort"
            raise
        finally:
            self._streams.discard(task)
            # A cancelled task's CancelledError holds this frame (its traceback); the frame
            # must not hold the task too, or both wait for the cyclic collector.
            del task

    async def _end_stream(self, call: Call, out: Exchange, err: ProxyError, outcome: Outcome) -> None:
        call.outcome, call.error = outcome, err.code
        await _try_write(out, call.endpoint.dialect.stream_error_event(err, call.client_request_id))
        _try_end(out)

    # ------------------------------------------------------------------ records

    def _fail(self, call: Call, exc: ProxyError) -> None:
        call.outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error"
        call.error, call.status = exc.code, exc.status
        self._emit(call)

    def _finish(self, call: Call, reservation: Reservation | None) -> None:
        """Runs in `finally`, also under cancellation: record the open attempt, settle."""
        if call.route is not None and not call.emitted:
            if call.status == 0 and call.outcome == "ok":
                # Cancelled while waiting for the upstream: the client left (or shutdown).
                ending = self._streams.ending
                call.outcome = "shutdown" if ending else "client_abort"
                call.error = "server_shutdown" if ending else "client_abort"
            self._emit(call)
        if reservation is not None:
            tokens, cost = 0, 0.0
            for r in call.records:
                tokens += r.prompt_tokens + r.completion_tokens
                cost += r.cost_usd
            self._admission.settle(reservation, tokens, cost)

    def _pending(self, call: Call) -> None:
        """Before an attempt goes upstream: the record to keep if the process dies first
        (RELIABILITY I2): the provider bills the prompt, the answer is unknown. Built only
        if the attempt is still open at the next flush tick (most end before it)."""
        route = call.route
        assert route is not None
        rid = _attempt_id(call)
        self._sink.pending(rid, functools.partial(self._pending_record, call, route, rid))

    def _pending_record(self, call: Call, route: Route, record_id: str) -> UsageRecord:
        usage = Usage(prompt_tokens=call.prompt_estimate)
        return self._usage_record(call, usage, True, "interrupted", "shutdown", route, record_id)

    def _emit(self, call: Call) -> None:
        error = call.error
        if call.meter is not None:
            usage, estimated, why = settle_usage(call.meter, call.prompt_estimate, call.max_output)
            if why is not None:
                # The answer was delivered: billed at the estimate, the reason on the record.
                route = call.route
                log.warning("implausible usage from upstream %s (%s): estimated instead",
                            route.upstream.name if route else "-", why)
                error = f"implausible_usage: {why}"[:200]
        elif call.outcome in ("client_abort", "shutdown"):
            # Left while the upstream was working on it: the provider bills the prompt.
            usage, estimated = Usage(prompt_tokens=call.prompt_estimate), True
        else:
            usage, estimated = Usage(), False   # refused or unreachable: nothing billable
        rec = self._usage_record(call, usage, estimated, error, call.outcome)
        call.records.append(rec)
        call.emitted = True
        self._record(rec)

    def _usage_record(
        self, call: Call, usage: Usage, estimated: bool, error: str | None, outcome: Outcome,
        route: Route | None = None, record_id: str | None = None,
    ) -> UsageRecord:
        """The record of the call's current attempt (or of `record_id` on `route`)."""
        route = route or call.route
        assert route is not None
        key = call.key
        # Positional, in field order (a NamedTuple's keyword path costs twice as much).
        return UsageRecord(
            record_id or _attempt_id(call),
            call.started,
            key.id if key is not None else None,
            key.name if key is not None else None,
            call.endpoint.name,
            call.model,
            route.upstream.name,
            route.upstream_model,
            call.stream,
            call.status,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.cache_creation_tokens,
            usage.reasoning_tokens,
            cost_usd(route.model.price, usage),
            estimated,
            call.ttft_ms,
            (time.time() - call.started) * 1000,
            error,
            outcome,
            call.endpoint.dialect.name,
            route.upstream.protocol,
        )


class StreamRegistry:
    """The handler tasks currently streaming, and whether the process is stopping."""

    def __init__(self) -> None:
        self._active: set[asyncio.Task[Any]] = set()
        self.stopping = False   # draining: no new requests, /readyz 503
        self.ending = False     # grace period over: cancellations are the server's, not clients'

    def add(self, task: asyncio.Task[Any]) -> None:
        self._active.add(task)

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._active.discard(task)

    def __len__(self) -> int:
        return len(self._active)

    def end_all(self) -> None:
        """At the end of the grace period: cancel every stream's handler. Each one writes
        a shutdown error event while its connection is still open, and records itself."""
        self.stopping = self.ending = True
        for task in list(self._active):
            task.cancel()


# ---------------------------------------------------------------------- helpers


def _parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    name = _forbidden_field(body)
    if name is not None:
        raise UnsupportedParameter(f"The parameter '{name}' is not accepted by this gateway.", param=name)
    return body


def _forbidden_field(body: dict[str, Any]) -> str | None:
    """The first forbidden field (dotted path) in the body's objects, outside the caller's
    content; None when there is none. Iterative: a deeply nested body cannot exhaust the stack."""
    bad = FORBIDDEN_FIELDS.intersection(body)
    if bad:
        return sorted(bad)[0]  # the usual place: the top level
    stack: list[tuple[str, Any]] = []
    for name, value in body.items():  # (a loop, not a list per request: most bodies nest nothing else)
        if (type(value) is dict or type(value) is list) and name not in _CONTENT_FIELDS:
            stack.append((name, value))
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            bad = FORBIDDEN_FIELDS.intersection(value)
            if bad:
                return f"{path}.{sorted(bad)[0]}"[:128]
            stack.extend((f"{path}.{k}", v) for k, v in value.items() if k not in _CONTENT_FIELDS)
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (dict, list)))
    return None


def _check_fields(body: dict[str, Any], endpoint: Endpoint) -> None:
    if any(name in body for name in endpoint.other_shapes):
        return   # another API's shape: the translator checks it
    for name in endpoint.required:
        if name not in body:
            for field_name, route in endpoint.misdirected:
                if field_name in body:
                    raise InvalidRequest(
                        f"'{field_name}' belongs to another API; this endpoint needs '{name}'. Use {route}.",
                        param=field_name,
                    )
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)


def _model_of(body: dict[str, Any], endpoint: Endpoint, path_model: str | None) -> str:
    if endpoint.model_in_path:
        model = (path_model or "").removeprefix("models/")
    else:
        named = body.get("model")
        if not isinstance(named, str) or not named:
            raise InvalidRequest("The request needs a 'model' string.", param="model")
        model = named
    if not model or len(model) > 256:
        raise InvalidRequest("The model name is missing or too long.", param="model")
    return model


def _stream_flag(body: dict[str, Any], endpoint: Endpoint) -> bool:
    if endpoint.always_stream:
        return True
    value = body.get("stream", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    if value and not endpoint.can_stream:
        raise InvalidRequest("This endpoint does not stream.", param="stream")
    return value


def _max_output_tokens(body: dict[str, Any], default: int) -> int:
    for name in _MAX_TOKEN_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(f"'{name}' must be a non-negative integer.", param=name)
        return min(value, 10_000_000)
    config = body.get("generationConfig")
    limit = config.get("maxOutputTokens") if isinstance(config, dict) else None
    if isinstance(limit, int):
        return max(0, min(limit, 10_000_000))
    return default


def _attempt_id(call: Call) -> str:
    """The id of the current attempt's record: the request's, then `<id>.<n>`."""
    return call.request_id if call.attempt == 0 else f"{call.request_id}.{call.attempt}"


def _next_attempt(call: Call) -> None:
    """Another upstream attempt for the same call (a fresh Call starts in this state)."""
    call.attempt += 1
    call.emitted = False
    call.outcome, call.error, call.status, call.meter, call.ttft_ms = "ok", None, 0, None, None


def _output_bound(body: dict[str, Any]) -> int | None:
    """The most output tokens the request allows when it says (max_tokens and its
    spellings, Gemini's maxOutputTokens, times the choices asked for), else None."""
    limit: int | None = None
    for name in _MAX_TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            limit = value
            break
    config = body.get("generationConfig")
    choices = body.get("n")
    if isinstance(config, dict):
        if limit is None and isinstance(config.get("maxOutputTokens"), int):
            limit = config["maxOutputTokens"]
        choices = config.get("candidateCount", choices)
    if limit is None:
        return None
    if not isinstance(choices, int) or isinstance(choices, bool) or choices < 1:
        choices = 1
    return limit * min(choices, 128)


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


def record_id_for(sent: str | None, request_id: str) -> str:
    """The id of the usage record and limit reservation: the request id when the gateway
    made it, a fresh one when the client chose its x-request-id (echoed in headers) so a
    reused id cannot collide with another request's record or slot and go unbilled."""
    return fresh_request_id() if sent == request_id else request_id
