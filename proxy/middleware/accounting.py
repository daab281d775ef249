"""The usage accounting stage: one usage record per upstream attempt, whatever happens.

Before the call: a call that could not be billed is refused (503, RELIABILITY I8), and
the call gets the id its records and limit reservation carry. After it, in `finally`,
also under cancellation: the attempt still open is recorded (an attempt the forwarder
ended itself was recorded then, through `record_failed` or `record`), and the reservation the
limits stage made is settled with the tokens and cost of every record. Records go to
the usage sink (proxy/usage_sink.py), which never blocks.
"""

from __future__ import annotations

import functools
import logging
import time

from proxy.errors import ProxyError, UpstreamTimeout, UsageUnavailable
from proxy.metering import settle_usage
from proxy.metering.base import Usage
from proxy.middleware.context import fresh_request_id
from proxy.middleware.draining import StreamRegistry
from proxy.middleware.limits import Admission
from proxy.pipeline import Call, Next
from proxy.pricing import cost_usd
from proxy.routing import Route
from proxy.store.base import Outcome, UsageRecord
from proxy.usage_sink import UsageSink

log = logging.getLogger("llm_proxy.forward")


class UsageAccounting:
    def __init__(self, sink: UsageSink, admission: Admission, streams: StreamRegistry) -> None:
        self._sink = sink
        self._admission = admission
        self._streams = streams

    async def __call__(self, call: Call, call_next: Next) -> None:
        if not self._sink.accepting:
            raise UsageUnavailable()   # the call could not be billed: refused before any work
        call.record_id = record_id_for(call.ex.request.headers.get("x-request-id"), call.request_id)
        call.started = time.time()
        try:
            await call_next(call)
        finally:
            self._finish(call)

    def record_failed(self, call: Call, exc: ProxyError) -> None:
        """The current attempt failed with `exc` before anything reached the client."""
        call.outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error"
        call.error, call.status = exc.code, exc.status
        self.record(call)

    def _finish(self, call: Call) -> None:
        if call.route is not None and not call.emitted:
            if call.status == 0 and call.outcome == "ok":
                # Cancelled while waiting for the upstream: the client left (or shutdown).
                ending = self._streams.ending
                call.outcome = "shutdown" if ending else "client_abort"
                call.error = "server_shutdown" if ending else "client_abort"
            self.record(call)
        if call.reservation is not None:
            tokens, cost = 0, 0.0
            for r in call.records:
                tokens += r.prompt_tokens + r.completion_tokens
                cost += r.cost_usd
            self._admission.settle(call.reservation, tokens, cost)

    def pending(self, call: Call) -> None:
        """Before an attempt goes upstream: the record to keep if the process dies first
        (RELIABILITY I2): the provider bills the prompt, the answer is unknown."""
        route = call.route
        assert route is not None   # an attempt has a route
        rid = _attempt_id(call)
        # Built only if the attempt is still open at the next flush tick (most end before it).
        self._sink.pending(rid, functools.partial(_pending_record, call, route, rid, call.attempt))

    def record(self, call: Call) -> None:
        """Record the current attempt as it stands (the forwarder, for an attempt it ends)."""
        error = call.error
        if call.meter is not None:
            usage, estimated, why = settle_usage(call.meter, call.prompt_estimate, call.output_bound)
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
        record = _usage_record(call, usage, estimated, error, call.outcome)
        call.records.append(record)
        call.emitted = True
        self._sink.record(record)
        # The pending record of this attempt is needed until its own record is durable (a
        # flush tick or two); from now on it is read off that record, so the sink does
        # not keep the whole call (exchange, parsed body) alive that long.
        route = call.route
        assert route is not None   # an attempt has a route
        self._sink.ended(record.id, functools.partial(_pending_of, record, route, call.prompt_estimate))


def _attempt_id(call: Call) -> str:
    """The id of the current attempt's record: the call's, then `<id>.<n>`."""
    return call.record_id if call.attempt == 0 else f"{call.record_id}.{call.attempt}"


def _pending_record(call: Call, route: Route, record_id: str, attempt: int) -> UsageRecord:
    """An open attempt's pending record: the provider bills the prompt, the answer is unknown."""
    usage = Usage(prompt_tokens=call.prompt_estimate)
    return _usage_record(call, usage, True, "interrupted", "shutdown", route, record_id, attempt)


def _pending_of(record: UsageRecord, route: Route, prompt_estimate: int) -> UsageRecord:
    """The same pending record for an attempt that ended with `record` (its fields are
    the call's as the attempt ended)."""
    usage = Usage(prompt_tokens=prompt_estimate)
    return record._replace(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_tokens,
        cache_creation_tokens=usage.cache_creation_tokens, reasoning_tokens=usage.reasoning_tokens,
        cost_usd=cost_usd(route.model.price, usage), estimated=True, duration_ms=(time.time() - record.ts) * 1000,
        error="interrupted", outcome="shutdown",
    )


def _usage_record(
    call: Call, usage: Usage, estimated: bool, error: str | None, outcome: Outcome,
    route: Route | None = None, record_id: str | None = None, attempt: int | None = None,
) -> UsageRecord:
    """The record of the call's current attempt (or of attempt `attempt`, `record_id`, on
    `route`: a pending record is built later, when the call may have moved on)."""
    route = route or call.route
    assert route is not None   # an attempt has a route
    key = call.key
    return UsageRecord(
        id=record_id or _attempt_id(call),
        ts=call.started,
        key_id=key.id if key is not None else None,
        key_name=key.name if key is not None else None,
        endpoint=call.endpoint.name if call.endpoint is not None else "",
        model=call.model,
        upstream=route.upstream.name,
        upstream_model=route.upstream_model,
        stream=call.stream,
        status=call.status,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cache_creation_tokens=usage.cache_creation_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cost_usd=cost_usd(route.model.price, usage),
        estimated=estimated,
        ttft_ms=call.ttft_ms,
        duration_ms=(time.time() - call.started) * 1000,
        error=error,
        outcome=outcome,
        client_dialect=call.dialect.name,
        upstream_protocol=route.upstream.protocol,
        attempt=call.attempt if attempt is None else attempt,
    )


def next_attempt(call: Call) -> None:
    """Another upstream attempt for the same call (a fresh Call starts in this state)."""
    call.attempt += 1
    call.emitted = False
    call.outcome, call.error, call.status, call.meter, call.ttft_ms = "ok", None, 0, None, None


def record_id_for(sent: str | None, request_id: str) -> str:
    """The id of the usage record and limit reservation: the request id when the gateway
    made it, a fresh one when the client chose its x-request-id (echoed in headers) so a
    reused id cannot collide with another request's record or slot and go unbilled."""
    return fresh_request_id() if sent == request_id else request_id
