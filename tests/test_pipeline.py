"""The data plane's chain, stage by stage, without sockets: each middleware with a
scripted exchange, the fold's order, and the route table's 404 / 405 / control split."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from proxy.config import Config, LimitsConfig, ModelConfig, Price, RouteConfig
from proxy.dialects import ANTHROPIC, CHAT, COUNT_TOKENS, GEMINI, GENERATE, OPENAI
from proxy.dialects.openai import EMBEDDINGS
from proxy.errors import InvalidApiKey, ModelNotAllowed, NotFound, ProxyError, ShuttingDown, UsageUnavailable
from proxy.front import Routes
from proxy.http1.headers import Headers
from proxy.http1.server import Request
from proxy.limits.memory import MemoryLimiter
from proxy.middleware.accounting import UsageAccounting, next_attempt
from proxy.middleware.auth import Authenticate
from proxy.middleware.context import request_context
from proxy.middleware.draining import RefuseWhileDraining, StreamRegistry
from proxy.middleware.limits import Admission, ReserveLimits
from proxy.middleware.model_request import ModelRequest
from proxy.pipeline import Before, Call, compose
from proxy.routing import Route
from proxy.store.base import KeyRecord, UsageRecord
from proxy.upstream import UpstreamPool

pytestmark = pytest.mark.fast  # pure units: no sockets (see README, "Run the tests")


@dataclass
class FakeExchange:
    """What the stages use of proxy.http1.server.Exchange."""

    request: Request
    head_sent: bool = False
    client_gone: bool = False
    status: int = 0
    answers: list[tuple[int, list[tuple[str, str]], bytes]] = field(default_factory=list)

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes, lines: bytes = b"") -> None:
        assert not self.head_sent
        self.head_sent, self.status = True, status
        self.answers.append((status, headers, body))


def call_for(method: str = "POST", path: str = "/v1/chat/completions", body: bytes = b"", query: str = "",
             **headers: str) -> Call:
    request = Request(method, path, query, Headers(headers), body, "10.0.0.1", "1.1", True, 0.0)
    return Call(FakeExchange(request), OPENAI, "10.0.0.1")  # type: ignore[arg-type]


def key(**kw: Any) -> KeyRecord:
    base = dict(id="key_0123456789abcdef", name="k", prefix="sk-x", digest="d", models=(), rpm=None, tpm=None,
                max_parallel=None, budget_usd=None, budget_period=None, expires_at=None, revoked_at=None, created_at=0.0)
    return KeyRecord(**{**base, **kw})


async def done(call: Call) -> None:
    call.ex.respond(200, call.headers, b"ok")


# ---------------------------------------------------------------------- the fold


async def test_compose_runs_stages_in_order_around_the_handler() -> None:
    seen: list[str] = []

    def stage(name: str) -> Any:
        async def mw(call: Call, call_next: Any) -> None:
            seen.append(name + ">")
            await call_next(call)
            seen.append("<" + name)
        return mw

    async def handler(call: Call) -> None:
        seen.append("handler")

    await compose([stage("a"), stage("b")], handler)(call_for())
    assert seen == ["a>", "b>", "handler", "<b", "<a"]


async def test_a_stage_may_answer_without_going_on() -> None:
    async def refuse(call: Call, call_next: Any) -> None:
        raise ShuttingDown()

    async def handler(call: Call) -> None:
        raise AssertionError("not reached")

    call = call_for()
    await compose([request_context, refuse], handler)(call)
    assert call.ex.status == 503


async def test_steps_act_before_the_rest_in_order_and_may_wait_or_refuse() -> None:
    seen: list[str] = []

    def step(name: str, wait: bool = False) -> Before:
        def run(call: Call) -> Awaitable[None] | None:
            seen.append(name)
            if not wait:
                return None

            async def waited() -> None:
                await asyncio.sleep(0)
                seen.append(name + " waited")
            return waited()
        return Before(run)

    async def around(call: Call, call_next: Any) -> None:
        seen.append("around>")
        await call_next(call)
        seen.append("<around")

    async def handler(call: Call) -> None:
        seen.append("handler")

    await compose([step("a"), around, step("b", wait=True), step("c")], handler)(call_for())
    assert seen == ["a", "around>", "b", "b waited", "c", "handler", "<around"]

    def refuse(call: Call) -> None:
        raise ShuttingDown()

    async def not_reached(call: Call) -> None:
        raise AssertionError("not reached")

    call = call_for()
    await compose([request_context, step("d"), Before(refuse), step("e")], not_reached)(call)
    assert call.ex.status == 503 and seen[-1] == "d"


# ---------------------------------------------------------------------- request context


async def test_context_sets_ids_and_cors_and_renders_errors_once_in_the_callers_dialect() -> None:
    async def fail(call: Call) -> None:
        raise ModelNotAllowed("no", param="model")

    call = call_for(path="/v1/messages", **{"x-request-id": "client-id-1", "origin": "https://app"})
    call.dialect = ANTHROPIC
    await compose([request_context], fail)(call)
    ((status, headers, body),) = call.ex.answers  # type: ignore[attr-defined]
    assert status == 403 and orjson.loads(body)["type"] == "error"
    names = dict(headers)
    assert names["x-request-id"] == "client-id-1" and names["Access-Control-Allow-Origin"] == "https://app"
    # An insane client id is replaced.
    call = call_for(**{"x-request-id": "bad id\x01"})
    await compose([request_context], done)(call)
    assert call.request_id.startswith("req_")


async def test_context_turns_an_unexpected_error_into_a_500_but_not_after_the_head(caplog: Any) -> None:
    async def boom(call: Call) -> None:
        raise KeyError("x")

    call = call_for()
    await compose([request_context], boom)(call)
    assert call.ex.status == 500 and orjson.loads(call.ex.answers[0][2])["error"]["code"] == "internal_error"  # type: ignore[attr-defined]

    async def late(call: Call) -> None:
        call.ex.respond(200, [], b"")
        raise KeyError("y")

    with pytest.raises(KeyError):
        await compose([request_context], late)(call_for())

    async def stream_failed(call: Call) -> None:   # a stream ended in its dialect already
        call.ex.respond(200, [], b"")
        raise ProxyError("gone")

    call = call_for()
    await compose([request_context], stream_failed)(call)
    assert len(call.ex.answers) == 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- auth brake, draining, auth


async def test_draining_refuses_new_work_once_stopping() -> None:
    streams = StreamRegistry()
    chain = compose([request_context, Before(RefuseWhileDraining(streams))], done)
    call = call_for()
    await chain(call)
    assert call.ex.status == 200
    streams.stopping = True
    call = call_for()
    await chain(call)
    assert call.ex.status == 503 and orjson.loads(call.ex.answers[0][2])["error"]["code"] == "server_shutting_down"  # type: ignore[attr-defined]


class OneKey:
    """An Authenticator stand-in: one valid key."""

    def __init__(self) -> None:
        self.presented: list[str | None] = []

    async def authenticate(self, presented: str | None) -> KeyRecord:
        self.presented.append(presented)
        if presented != "sk-good":
            raise InvalidApiKey()
        return key()


@pytest.mark.parametrize(
    "dialect,headers,query,ok",
    [
        (OPENAI, {"authorization": "Bearer sk-good"}, "", True),
        (ANTHROPIC, {"x-api-key": "sk-good"}, "", True),
        (GEMINI, {}, "key=sk-good", True),     # Gemini's own style
        (OPENAI, {}, "key=sk-good", False),    # ...on Gemini routes only
        (OPENAI, {"authorization": "Basic sk-good"}, "", False),
    ],
)
async def test_authenticate_takes_the_key_where_the_dialect_does(dialect: Any, headers: dict[str, str], query: str,
                                                                ok: bool) -> None:
    auth = OneKey()
    call = call_for(query=query, **headers)
    call.dialect = dialect
    failures: list[str] = []

    async def on_failure(client: str, now: float) -> None:
        failures.append(client)

    await compose([request_context, Before(Authenticate(auth, on_failure))], done)(call)  # type: ignore[arg-type]
    assert (call.ex.status == 200) is ok and (call.key is not None) is ok
    assert failures == ([] if ok else ["10.0.0.1"])   # the brake hears of every failure


# ---------------------------------------------------------------------- model request, limits, accounting


PRICE = Price(input_per_mtok=1.0, output_per_mtok=2.0)
MODEL = ModelConfig("m", (RouteConfig("up", "m-up"),), (), PRICE)


class OneModel:
    """A Router stand-in: one model, one route."""

    def plan(self, model: str, dialect: str, translatable: frozenset[str] = frozenset()) -> tuple[Route, ...]:
        if model != "m":
            raise NotFound("no such model", code="model_not_found")
        return (route(),)


def model_call(body: dict[str, Any], **kw: Any) -> Call:
    call = call_for(body=orjson.dumps(body), **kw)
    call.endpoint = CHAT
    return call


async def test_model_request_parses_once_and_refuses_before_any_upstream() -> None:
    pool = UpstreamPool()
    stage = ModelRequest(Config(limits=LimitsConfig(default_max_tokens=4096)), OneModel(), pool)  # type: ignore[arg-type]
    chain = compose([request_context, Before(stage)], done)
    call = model_call({"model": "m", "messages": [], "stream": True, "max_tokens": 10})
    await chain(call)
    assert call.ex.status == 200 and call.model == "m" and call.stream and call.max_output == 10
    assert call.prompt_estimate > 0 and call.plan and call.upstreams is pool
    for body, code in (
        ({"messages": []}, "invalid_request_error"),
        ({"model": "m", "messages": [], "api_base": "http://x"}, "unsupported_parameter"),
        ({"model": "nope", "messages": []}, "model_not_found"),
        ({"model": "m", "messages": [], "max_tokens": -1}, "invalid_request_error"),
    ):
        call = model_call(body)
        await chain(call)
        assert orjson.loads(call.ex.answers[0][2])["error"]["code"] == code, body  # type: ignore[attr-defined]
    call = model_call({"model": "m", "messages": []})
    call.key = key(models=("other",))
    await chain(call)
    assert call.ex.status == 403
    call = model_call({"model": "m", "messages": []}, **{"content-encoding": "gzip"})
    await chain(call)
    assert call.ex.status == 415


async def test_model_request_reserves_no_output_for_embeddings_and_nothing_for_counts() -> None:
    stage = ModelRequest(Config(limits=LimitsConfig(default_max_tokens=4096)), OneModel(), UpstreamPool())  # type: ignore[arg-type]
    chain = compose([request_context, Before(stage)], done)
    call = model_call({"model": "m", "input": "some text to embed"})
    call.endpoint = EMBEDDINGS
    await chain(call)
    assert call.ex.status == 200 and call.max_output == 0 and call.prompt_estimate > 0
    call = model_call({"model": "m", "messages": [{"role": "user", "content": "count me"}]})
    call.endpoint = COUNT_TOKENS
    await chain(call)
    assert call.ex.status == 200 and call.max_output == 0 and call.prompt_estimate == 0


async def test_gemini_output_cap_is_the_dialects_knowledge() -> None:
    assert GEMINI.max_output_tokens({"generationConfig": {"maxOutputTokens": 7}}) == 7
    assert OPENAI.max_output_tokens({"generationConfig": {"maxOutputTokens": 7}}) is None
    assert GENERATE.dialect is GEMINI


class FakeSink:
    def __init__(self, accepting: bool = True) -> None:
        self.accepting = accepting
        self.records: list[UsageRecord] = []
        self.open: dict[str, Callable[[], UsageRecord]] = {}   # pending records' builders

    def record(self, rec: UsageRecord) -> None:
        self.records.append(rec)

    def pending(self, record_id: str, build: Callable[[], UsageRecord]) -> None:
        self.open[record_id] = build

    def ended(self, record_id: str, build: Callable[[], UsageRecord]) -> None:
        if record_id in self.open:
            self.open[record_id] = build


@dataclass
class _Upstream:
    name: str
    protocol: str = "openai"


def route() -> Route:
    return Route(model=MODEL, upstream=_Upstream("up"), upstream_model="m-up", weight=1.0)  # type: ignore[arg-type]


async def test_accounting_refuses_unbillable_calls_and_records_the_open_attempt_whatever_happens() -> None:
    streams = StreamRegistry()
    limiter = MemoryLimiter()
    admission = Admission(limiter, fail_open=False)
    sink = FakeSink(accepting=False)
    accounting = UsageAccounting(sink, admission, streams)  # type: ignore[arg-type]

    call = model_call({"model": "m", "messages": []})
    await compose([request_context, accounting], done)(call)
    assert call.ex.status == 503 and sink.records == []
    assert orjson.loads(call.ex.answers[0][2])["error"]["code"] == UsageUnavailable.code  # type: ignore[attr-defined]

    sink.accepting = True
    limited = key(rpm=100, max_parallel=1)

    async def attempt_then_cancelled(call: Call) -> None:
        call.route = route()
        raise asyncio.CancelledError()   # the client went away while the upstream worked

    call = model_call({"model": "m", "messages": []}, **{"x-request-id": "mine"})
    call.key = limited
    call.prompt_estimate, call.plan = 100, (route(),)
    with pytest.raises(asyncio.CancelledError):
        await compose([request_context, accounting, Before(ReserveLimits(admission))], attempt_then_cancelled)(call)
    (rec,) = sink.records
    assert rec.outcome == "client_abort" and rec.estimated and rec.prompt_tokens == 100
    assert rec.id != "mine"   # a client-chosen id never names a record
    # The reservation was settled: the one parallel slot is free again.
    call = model_call({"model": "m", "messages": []})
    call.key = limited
    call.plan = (route(),)
    await compose([request_context, accounting, Before(ReserveLimits(admission))], done)(call)
    assert call.ex.status == 200 and b"x-ratelimit-limit-requests: 100" in call.limit_lines


async def test_each_attempt_and_its_pending_record_carry_the_attempt_number() -> None:
    """DESIGN §7: records carry `attempt` (0 first, n for the id's `.n`). A pending record
    is built later, at a flush tick, when the call may be on its next attempt: it still
    names its own."""
    sink = FakeSink()
    accounting = UsageAccounting(sink, Admission(MemoryLimiter(), fail_open=False), StreamRegistry())  # type: ignore[arg-type]

    async def failed_over(call: Call) -> None:
        call.route = route()
        accounting.pending(call)
        call.status, call.outcome, call.error = 500, "upstream_error", "upstream_500"
        accounting.record(call)
        next_attempt(call)
        accounting.pending(call)
        call.status = 200

    call = model_call({"model": "m", "messages": []})
    call.plan = (route(), route())
    await compose([request_context, accounting], failed_over)(call)
    first, second = sink.records
    assert (first.attempt, second.attempt, second.id) == (0, 1, first.id + ".1")
    pending = {rid: build() for rid, build in sink.open.items()}
    assert {rid: r.attempt for rid, r in pending.items()} == {first.id: 0, second.id: 1}


async def test_an_ended_attempts_pending_record_is_read_off_its_record_not_the_live_call() -> None:
    sink = FakeSink()
    accounting = UsageAccounting(sink, Admission(MemoryLimiter(), fail_open=False), StreamRegistry())  # type: ignore[arg-type]
    call = model_call({"model": "m", "messages": []})
    call.key, call.record_id, call.started, call.model, call.prompt_estimate = key(), "req_x", time.time() - 1, "m", 42
    call.route = route()
    accounting.pending(call)
    call.status, call.ttft_ms = 200, 12.5   # the stream has started when a flush tick comes
    while_open = sink.open["req_x"]()
    assert while_open.outcome == "shutdown" and while_open.error == "interrupted" and while_open.estimated
    assert while_open.prompt_tokens == 42 and while_open.completion_tokens == 0 and while_open.cost_usd > 0
    accounting.record(call)   # the attempt ends; its record is not durable yet
    after = sink.open["req_x"]
    # The same estimate (but for how long the attempt has lasted), without the call.
    assert after()._replace(duration_ms=0) == while_open._replace(duration_ms=0)
    assert after().duration_ms >= 1000
    assert not any(arg is call for arg in after.args)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- routes


def routes() -> Routes:
    def named(name: str) -> Any:
        async def chain(call: Call) -> None:
            call.ex.respond(200, [], name.encode())
        return chain

    return Routes(
        model_call=named("model"), get={"/healthz": named("healthz"), "/v1/models": named("models")},
        get_model=named("get_model"), control=lambda p: p.startswith("/admin/") or p == "/metrics",
        relay=named("relay"), preflight=named("preflight"), not_found=named("404"),
        method_not_allowed=named("405"), refuse=lambda err: named(f"refuse {err.status}"),
    )


@pytest.mark.parametrize(
    "method,path,want",
    [
        ("POST", "/v1/chat/completions", "model"),
        ("POST", "/chat/completions", "model"),
        ("POST", "/v1beta/models/m:generateContent", "model"),
        ("POST", "/v1beta/models/m:nope", "refuse 404"),
        ("GET", "/v1/chat/completions", "405"),
        ("HEAD", "/healthz", "healthz"),
        ("POST", "/healthz", "405"),
        ("GET", "/v1/models/gpt-x", "get_model"),
        ("GET", "/v1/models/", "404"),
        ("DELETE", "/v1beta/models/m", "405"),
        ("OPTIONS", "/v1/chat/completions", "preflight"),
        ("GET", "/admin/keys", "relay"),
        ("OPTIONS", "/admin/keys", "relay"),
        ("GET", "/metrics", "relay"),
        ("GET", "/metrics/x", "404"),
        ("GET", "/v1/%2e%2e/admin/keys", "404"),
    ],
)
async def test_route_table(method: str, path: str, want: str) -> None:
    call = call_for(method, path)
    await routes().resolve(call)(call)
    assert call.ex.answers[0][2].decode() == want  # type: ignore[attr-defined]
    if want == "model" and "v1beta" in path:
        assert call.dialect is GEMINI and call.path_model == "m"
