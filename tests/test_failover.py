"""Issue 23: routes that fail before the first byte are failed over, recorded, logged and
put in cooldown; a cooled route gets one probe once its cooldown ends.

Two real upstream servers: `up` (the scripted upstream, tried first) and `backup` (a
second scripted upstream, priority 1). Faults are scripted on `up`; each call must be
served by `backup`. Time is the breaker's own clock, set by the tests (no sleeps).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import logging
from types import SimpleNamespace
from typing import Any, AsyncIterator

import aiohttp
import orjson
import pytest

from _gateway import MASTER_KEY, PRICE, UPSTREAM_KEY, Gateway, Reply, ScriptedUpstream
from proxy.config import (
    BreakerConfig, LimitsConfig, ModelConfig, RouteConfig, RoutingConfig, StorageConfig, Timeouts, UpstreamConfig,
)

JSON = {"Content-Type": "application/json"}
OK = Reply(headers=JSON, chunks=[b'{"id":"chatcmpl-backup","object":"chat.completion","choices":[],'
                                  b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'])


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def backup() -> AsyncIterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    up.default = OK
    await up.start()
    yield up
    await up.stop()


def _config(primary: str, backup: ScriptedUpstream, **breaker: Any) -> dict[str, Any]:
    timeouts = Timeouts(connect_s=1, first_byte_s=0.5, idle_s=5)
    ups = (
        UpstreamConfig("up", primary, "openai", UPSTREAM_KEY, timeouts),
        UpstreamConfig("backup", backup.base + "/v1", "openai", "sk-backup", timeouts),
        UpstreamConfig("dead", "http://127.0.0.1:9/v1", "openai", "dead-key", timeouts),
    )
    models = (
        ModelConfig("pair", (RouteConfig("up", "gpt-a"), RouteConfig("backup", "gpt-b", priority=1)), (), PRICE),
        ModelConfig("dead-pair", (RouteConfig("dead", "gpt-d"), RouteConfig("backup", "gpt-b", priority=1)), (), PRICE),
        ModelConfig("solo", (RouteConfig("up", "gpt-a"),), ("backup-only",), PRICE),
        ModelConfig("backup-only", (RouteConfig("backup", "gpt-b"),), (), PRICE),
    )
    return {"upstreams": ups, "models": models, "routing": RoutingConfig(breaker=BreakerConfig(**breaker))}


async def _start(gateway: Any, scripted_upstream: ScriptedUpstream, backup: ScriptedUpstream, **breaker: Any) -> tuple[Gateway, Clock]:
    gw: Gateway = await gateway(**_config(scripted_upstream.base + "/v1", backup, **breaker))
    clock = Clock()
    gw.state.health.now = clock
    return gw, clock


async def chat(gw: Gateway, model: str = "pair", stream: bool = False) -> tuple[int, dict[str, str], bytes]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def _err(status: int, retry_after: str | None = None, body: bytes = b'{"error":{"message":"nope","type":"x"}}') -> Reply:
    headers = dict(JSON)
    if retry_after is not None:
        headers["retry-after"] = retry_after
    return Reply(status=status, headers=headers, chunks=[body])


FAULTS = {
    "429-retry-after": (_err(429, "30"), "429"),
    "529": (_err(529, body=b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'), "529"),
    "500": (_err(500), "500"),
    "401": (_err(401), "401"),
    "403": (_err(403), "403"),
    "hang": (Reply(headers=JSON, ttfb_s=3, chunks=[b"{}"]), "timeout"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_failing_first_route_is_failed_over(gateway, scripted_upstream, backup, fault, caplog):
    reply, label = FAULTS[fault]
    gw, _ = await _start(gateway, scripted_upstream, backup)
    scripted_upstream.script(reply)
    with caplog.at_level(logging.WARNING, logger="llm_proxy.forward"):
        status, headers, body = await chat(gw)
    assert status == 200, body
    assert orjson.loads(body)["id"] == "chatcmpl-backup"
    assert len(scripted_upstream.received) == 1 and len(backup.received) == 1
    recs = sorted(await gw.wait_records(2), key=lambda r: r.id)
    assert [(r.upstream, r.upstream_model) for r in recs] == [("up", "gpt-a"), ("backup", "gpt-b")]
    failed, served = recs
    assert failed.outcome == ("timeout" if fault == "hang" else "upstream_error")
    assert (failed.prompt_tokens, failed.completion_tokens, failed.cost_usd) == (0, 0, 0)
    if fault != "hang":
        assert failed.status == int(label) and failed.error == f"upstream_{label}"
    assert served.outcome == "ok" and served.completion_tokens == 2 and served.id == failed.id + ".1"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "attempt failed" in r.getMessage()]
    assert len(warnings) == 1
    assert f"upstream up model gpt-a: {label}" in warnings[0] and headers["x-request-id"] in warnings[0]
    assert UPSTREAM_KEY not in caplog.text and "nope" not in caplog.text


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    url = request.getfixturevalue("pg_store_url")
    return {"storage": StorageConfig(url=url, spool_path=str(tmp_path / "pg-spool.jsonl"), flush_interval_s=0.05)}


async def test_each_attempt_is_recorded_with_its_number(backend, gateway, scripted_upstream, backup):
    """DESIGN §7: a failover leaves one record per attempt, each with its `attempt` (0 for
    the first, n for the id's `.n`), kept by the store and shown by the admin API and CSV.
    `backend` first: its database must outlive the gateway (torn down in reverse order)."""
    gw: Gateway = await gateway(**_config(scripted_upstream.base + "/v1", backup), **backend)
    scripted_upstream.script(_err(500))
    status, _, body = await chat(gw)
    assert status == 200, body
    first, second = sorted(await gw.wait_records(2), key=lambda r: r.id)
    assert [(r.upstream, r.status, r.attempt) for r in (first, second)] == [("up", 500, 0), ("backup", 200, 1)]
    assert second.id == first.id + ".1"
    assert all((r.client_dialect, r.upstream_protocol) == ("openai", "openai") for r in (first, second))
    status, doc = await _admin(gw, "GET", "/admin/usage?since=1h")
    assert status == 200 and {r["id"]: r["attempt"] for r in doc["data"]} == {first.id: 0, second.id: 1}
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/admin/usage?since=1h&format=csv", headers=MASTER) as r:
            rows = list(csv.DictReader(io.StringIO((await r.read()).decode())))
    assert {row["id"]: (row["attempt"], row["client_dialect"]) for row in rows} == {
        first.id: ("0", "openai"), second.id: ("1", "openai")}


async def test_a_refused_connection_is_failed_over(gateway, scripted_upstream, backup):
    gw, _ = await _start(gateway, scripted_upstream, backup)
    status, _, body = await chat(gw, "dead-pair")
    assert status == 200 and orjson.loads(body)["id"] == "chatcmpl-backup"
    recs = sorted(await gw.wait_records(2), key=lambda r: r.id)
    assert [(r.upstream, r.status, r.error) for r in recs] == [("dead", 502, "upstream_error"), ("backup", 200, None)]


async def test_fallback_models_are_tried_after_every_route(gateway, scripted_upstream, backup):
    gw, _ = await _start(gateway, scripted_upstream, backup)
    scripted_upstream.script(_err(500))
    status, _, body = await chat(gw, "solo")
    assert status == 200 and orjson.loads(body)["id"] == "chatcmpl-backup"
    recs = sorted(await gw.wait_records(2), key=lambda r: r.id)
    assert [(r.model, r.upstream) for r in recs] == [("solo", "up"), ("solo", "backup")]


async def test_cooldown_skips_the_route_then_exactly_one_probe(gateway, scripted_upstream, backup):
    gw, clock = await _start(gateway, scripted_upstream, backup, failures=2, cooldown_s=10)
    scripted_upstream.script(_err(500), _err(500))
    for _ in range(2):
        assert (await chat(gw))[0] == 200
    assert len(scripted_upstream.received) == 2
    view = gw.state.health.view(("up", "gpt-a"))
    assert view.state == "cooldown" and view.cooldown_until == clock.t + 10
    # Cooling down: no traffic at all, not even concurrent.
    results = await asyncio.gather(*(chat(gw) for _ in range(6)))
    assert all(r[0] == 200 for r in results)
    assert len(scripted_upstream.received) == 2 and len(backup.received) == 8
    # Cooldown over: the first request to arrive probes (slowly); the others meanwhile
    # go to the backup. The probe succeeds and closes the breaker.
    clock.t += 10
    scripted_upstream.script(Reply(headers=JSON, ttfb_s=0.3, chunks=OK.chunks))
    probe = asyncio.create_task(chat(gw))
    while len(scripted_upstream.received) < 3:
        await asyncio.sleep(0.01)
    others = await asyncio.gather(*(chat(gw) for _ in range(4)))
    assert all(r[0] == 200 for r in others)
    assert (await probe)[0] == 200
    assert len(scripted_upstream.received) == 3 and len(backup.received) == 12
    assert gw.state.health.view(("up", "gpt-a")).state == "ok"
    await chat(gw)
    assert len(scripted_upstream.received) == 4   # back in use


async def test_a_failed_probe_backs_off(gateway, scripted_upstream, backup):
    gw, clock = await _start(gateway, scripted_upstream, backup, failures=1, cooldown_s=10, max_cooldown_s=25)
    health = gw.state.health
    scripted_upstream.script(_err(500), _err(500), _err(500))
    await chat(gw)
    assert health.view(("up", "gpt-a")).cooldown_until == clock.t + 10
    clock.t += 10
    await chat(gw)   # the probe fails: twice as long
    assert health.view(("up", "gpt-a")).cooldown_until == clock.t + 20
    clock.t += 20
    await chat(gw)   # capped
    assert health.view(("up", "gpt-a")).cooldown_until == clock.t + 25
    assert len(scripted_upstream.received) == 3


async def test_retry_after_sets_the_cooldown_at_once(gateway, scripted_upstream, backup):
    gw, clock = await _start(gateway, scripted_upstream, backup, failures=5)
    scripted_upstream.script(_err(429, "42"))
    await chat(gw)
    assert gw.state.health.view(("up", "gpt-a")).cooldown_until == clock.t + 42


async def test_a_cooled_route_is_used_when_every_route_is(gateway, scripted_upstream, backup):
    gw, _ = await _start(gateway, scripted_upstream, backup, failures=1)
    scripted_upstream.script(_err(500))
    backup.script(_err(500))
    status, _, _ = await chat(gw)
    assert status == 502
    assert len(scripted_upstream.received) == 1 and len(backup.received) == 1
    # Both cool down: the call is tried anyway (soonest back first) rather than refused.
    assert (await chat(gw))[0] == 200
    assert len(scripted_upstream.received) + len(backup.received) == 3


async def test_when_every_route_fails_a_429_stays_a_429(gateway, scripted_upstream, backup):
    gw, _ = await _start(gateway, scripted_upstream, backup)
    scripted_upstream.script(_err(429, "17"))
    backup.script(_err(500))
    status, headers, body = await chat(gw)
    assert status == 429 and headers["retry-after"] == "17"
    assert orjson.loads(body)["error"]["type"] == "rate_limit_error"
    recs = await gw.wait_records(2)
    assert sorted((r.status, r.error) for r in recs) == [(429, "upstream_429"), (500, "upstream_500")]


async def test_the_last_routes_own_answer_passes_through_when_it_says_most(gateway, scripted_upstream, backup):
    gw, _ = await _start(gateway, scripted_upstream, backup)
    scripted_upstream.script(_err(500))
    backup.script(_err(429, "9", b'{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}'))
    status, headers, body = await chat(gw)
    assert status == 429 and headers["retry-after"] == "9"
    assert orjson.loads(body)["error"]["message"] == "slow down"


async def test_other_client_errors_are_not_failed_over(gateway, scripted_upstream, backup):
    gw, _ = await _start(gateway, scripted_upstream, backup, failures=1)
    scripted_upstream.script(_err(400, body=b'{"error":{"message":"bad messages","type":"invalid_request_error"}}'))
    status, _, body = await chat(gw)
    assert status == 400 and b"bad messages" in body
    assert len(backup.received) == 0
    assert gw.state.health.view(("up", "gpt-a")).state == "ok"


# ---------------------------------------------------------------------- visibility

MASTER = {"Authorization": f"Bearer {MASTER_KEY}"}


async def _admin(gw: Gateway, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path, json=body, headers=MASTER if headers is None else headers) as r:
            return r.status, orjson.loads(await r.read())


async def test_admin_upstreams_and_metrics_show_each_route(gateway, scripted_upstream, backup):
    gw, clock = await _start(gateway, scripted_upstream, backup, failures=1, cooldown_s=30)
    scripted_upstream.script(_err(503))
    assert (await chat(gw))[0] == 200
    status, doc = await _admin(gw, "GET", "/admin/upstreams")
    assert status == 200 and doc["shared"] is False
    rows = {(r["upstream"], r["model"]): r for r in doc["data"]}
    up, back = rows[("up", "gpt-a")], rows[("backup", "gpt-b")]
    assert (up["state"], up["cooldown_until"], up["error_rate"], up["attempts"]) == ("cooldown", clock.t + 30, 1.0, 1)
    assert {"model": "pair", "priority": 0, "weight": 1} in up["models"]
    assert up["last_error"] == "503" and up["last_error_at"].endswith("+00:00")
    assert (back["state"], back["error_rate"], back["cooldown_until"]) == ("ok", 0.0, None)
    assert back["latency_ms"] is not None and back["latency_ms"] >= 0
    assert rows[("dead", "gpt-d")]["state"] == "ok" and rows[("dead", "gpt-d")]["attempts"] == 0
    assert (await _admin(gw, "GET", "/admin/upstreams", headers={}))[0] == 401
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/metrics") as r:
            text = await r.text()
    assert 'llm_proxy_upstream_attempts_total{outcome="upstream_error",upstream="up"} 1.0' in text
    assert 'llm_proxy_upstream_attempts_total{outcome="ok",upstream="backup"} 1.0' in text
    assert "llm_proxy_routes_in_cooldown 1.0" in text


async def test_admin_route_test_sends_one_tiny_call(gateway, scripted_upstream, backup):
    gw, _ = await _start(gateway, scripted_upstream, backup)
    status, doc = await _admin(gw, "POST", "/admin/upstreams/test", {"model": "pair"})
    assert status == 200 and doc["status"] == 200 and doc["error"] is None and doc["latency_ms"] >= 0
    assert set(doc) == {"status", "latency_ms", "error"}
    sent = scripted_upstream.received[0]
    assert sent.path == "/v1/chat/completions" and sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert orjson.loads(sent.body) == {"model": "gpt-a", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    status, doc = await _admin(gw, "POST", "/admin/upstreams/test", {"upstream": "backup", "model": "gpt-other"})
    assert (status, doc["status"], doc["error"]) == (200, 200, None)
    assert orjson.loads(backup.received[0].body)["model"] == "gpt-other"
    status, doc = await _admin(gw, "POST", "/admin/upstreams/test", {"upstream": "dead", "model": "gpt-d"})
    assert (status, doc["status"], doc["error"]) == (200, 0, "unreachable")
    backup.script(_err(401))
    status, doc = await _admin(gw, "POST", "/admin/upstreams/test", {"upstream": "backup", "model": "gpt-b"})
    assert (doc["status"], doc["error"]) == (401, "upstream_401")
    assert (await _admin(gw, "POST", "/admin/upstreams/test", {"model": "nope"}))[0] == 404
    assert (await _admin(gw, "POST", "/admin/upstreams/test", {"upstream": "nowhere", "model": "m"}))[0] == 404
    assert (await _admin(gw, "POST", "/admin/upstreams/test", {}))[0] == 400
    recs = await gw.wait_records(4)
    assert sorted((r.upstream, r.status, r.key_id) for r in recs) == [
        ("backup", 200, None), ("backup", 401, None), ("dead", 0, None), ("up", 200, None)]


async def test_active_health_checks_feed_the_breaker(gateway, scripted_upstream, backup):
    cfg = _config(scripted_upstream.base + "/v1", backup, failures=1)
    cfg["upstreams"] = tuple(
        dataclasses.replace(u, health_check_s=0.2) if u.name == "up" else u for u in cfg["upstreams"]
    )
    gw: Gateway = await gateway(**cfg)
    gw.audit = False   # health checks reach the upstream and are not model calls: no records
    scripted_upstream.default = _err(500)
    deadline = asyncio.get_running_loop().time() + 10
    while gw.state.health.view(("up", "gpt-a")).state != "cooldown":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    got = scripted_upstream.received[0]
    assert (got.path, got.headers["Authorization"]) == ("/v1/models", f"Bearer {UPSTREAM_KEY}")
    assert gw.state.health.view(("backup", "gpt-b")).state == "ok"   # not checked: off by default
    assert not any(r.path == "/v1/models" for r in backup.received)
    assert await gw.records() == []


# ---------------------------------------------------------------------- shared through Redis


async def test_two_gateways_share_the_cooldown_and_the_probe_through_redis(gateway, scripted_upstream, backup, redis_server, tmp_path):
    cfg = _config(scripted_upstream.base + "/v1", backup, failures=1, cooldown_s=10)
    limits = LimitsConfig(url=redis_server.url)
    a: Gateway = await gateway(**cfg, limits=limits)
    b: Gateway = await gateway(**cfg, limits=limits, storage=StorageConfig(
        url=f"sqlite:///{tmp_path}/gw2.db", spool_path=str(tmp_path / "spool2.jsonl"), flush_interval_s=0.05))
    a.audit = b.audit = False   # one upstream, two stores: counted below
    clock = Clock()
    a.state.health.now = b.state.health.now = clock
    scripted_upstream.script(_err(500))
    assert (await chat(a))[0] == 200
    # B never called `up`, yet sees it cooling down and sends it nothing.
    status, doc = await _admin(b, "GET", "/admin/upstreams")
    row = next(r for r in doc["data"] if r["upstream"] == "up")
    assert doc["shared"] is True and row["state"] == "cooldown" and row["cooldown_until"] == clock.t + 10
    assert all(r[0] == 200 for r in await asyncio.gather(*(chat(b) for _ in range(3))))
    assert len(scripted_upstream.received) == 1
    # Cooldown over: A's request probes; B's meanwhile cannot take the probe too.
    clock.t += 10
    scripted_upstream.script(Reply(headers=JSON, ttfb_s=0.3, chunks=OK.chunks))
    probe = asyncio.create_task(chat(a))
    while len(scripted_upstream.received) < 2:
        await asyncio.sleep(0.01)
    assert all(r[0] == 200 for r in await asyncio.gather(*(chat(b) for _ in range(3))))
    assert (await probe)[0] == 200
    assert len(scripted_upstream.received) == 2
    # The probe's success reaches Redis in the background (not on the answer's path).
    deadline = asyncio.get_running_loop().time() + 5
    while b.state.health.view(("up", "gpt-a")).state != "ok":
        assert asyncio.get_running_loop().time() < deadline
        await b.state.health.sync()
        await asyncio.sleep(0.02)
    assert len((await a.wait_records(3))) + len(await b.wait_records(6)) == 9


# ---------------------------------------------------------------------- after the first byte
# A stream broken by its upstream after the head went out is not retried (bytes reached
# the client) but counts for the route's breaker like a failure before the first byte;
# a client that leaves mid-stream does not. The upstream is the real mock
# (proxy/mock_upstream.py), its x-mock-* behaviour set per upstream by its extra headers.


@pytest.fixture
async def mock_server() -> AsyncIterator[Any]:
    from proxy.mock_upstream import start_mock

    server = await start_mock()
    yield server
    await server.close()


def _mock_pair(base: str, flaky: dict[str, str], **breaker: Any) -> dict[str, Any]:
    timeouts = Timeouts(connect_s=1, first_byte_s=1, idle_s=0.3)
    ups = (
        UpstreamConfig("flaky", base + "/v1", "openai", UPSTREAM_KEY, timeouts, headers=flaky),
        UpstreamConfig("steady", base + "/v1", "openai", "sk-steady", timeouts),
    )
    routes = (RouteConfig("flaky", "gpt-a"), RouteConfig("steady", "gpt-b", priority=1))
    models = (ModelConfig("pair", routes, (), PRICE),)
    return {"upstreams": ups, "models": models, "routing": RoutingConfig(breaker=BreakerConfig(**breaker))}


@pytest.mark.parametrize("fault", ["midstream", "stall"])
async def test_streams_broken_mid_way_cool_the_route(gateway, mock_server, fault, caplog):
    gw: Gateway = await gateway(**_mock_pair(mock_server.base_url, {"x-mock-fail": fault}, failures=3, cooldown_s=30))
    clock = Clock()
    gw.state.health.now = clock
    with caplog.at_level(logging.WARNING, logger="llm_proxy.forward"):
        for i in range(3):
            status, _, raw = await chat(gw, stream=True)
            # The client's stream is as before: its head, some events, one error event.
            assert status == 200 and b'"error"' in raw and b"[DONE]" not in raw
            assert gw.state.health.view(("flaky", "gpt-a")).consecutive_failures == i + 1
    view = gw.state.health.view(("flaky", "gpt-a"))
    assert view.state == "cooldown" and view.cooldown_until == clock.t + 30
    assert view.last_error == ("cut" if fault == "midstream" else "timeout")
    warnings = [r.getMessage() for r in caplog.records if "attempt failed" in r.getMessage()]
    assert len(warnings) == 3 and all("upstream flaky model gpt-a" in w for w in warnings)
    recs = await gw.wait_records(3)
    assert {(r.upstream, r.outcome) for r in recs} == {("flaky", "timeout" if fault == "stall" else "upstream_error")}
    # Cooling down: the next call, streamed or not, goes to the other route.
    status, _, raw = await chat(gw, stream=True)
    assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
    status, _, _ = await chat(gw)
    assert status == 200
    recs = sorted(await gw.wait_records(5), key=lambda r: r.ts)
    assert [(r.upstream, r.outcome) for r in recs[3:]] == [("steady", "ok"), ("steady", "ok")]


async def test_a_whole_stream_resets_the_count(gateway, mock_server):
    """A stream that ends with its final event is the route's success (reported at its
    end, not its head), so failures must be consecutive to trip the breaker."""
    gw: Gateway = await gateway(**_mock_pair(mock_server.base_url, {}, failures=2))
    health = gw.state.health
    await health.failed(SimpleNamespace(key=("flaky", "gpt-a")), None, None)
    assert health.view(("flaky", "gpt-a")).consecutive_failures == 1
    status, _, raw = await chat(gw, stream=True)
    assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
    assert health.view(("flaky", "gpt-a")).state == "ok"


async def test_a_client_leaving_mid_stream_does_not_count(gateway, mock_server):
    slow = {"x-mock-chunks": "200", "x-mock-delay-ms": "20"}
    gw: Gateway = await gateway(**_mock_pair(mock_server.base_url, slow, failures=1))
    body = {"model": "pair", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    for n in range(1, 3):
        async with aiohttp.ClientSession() as s:
            r = await s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers())
            assert r.status == 200
            await r.content.readany()
            r.close()
        recs = await gw.wait_records(n)
        assert recs[-1].outcome == "client_abort"
    view = gw.state.health.view(("flaky", "gpt-a"))
    assert (view.state, view.consecutive_failures) == ("ok", 0)
    await chat(gw)
    recs = await gw.wait_records(3)
    assert all(r.upstream == "flaky" for r in recs)


async def test_a_stream_ended_by_an_upstream_error_event_counts(gateway, scripted_upstream, backup):
    """An upstream that sends an error event and closes cleanly ended without its final
    event: the client gets the bytes as they came, the route is charged."""
    gw, clock = await _start(gateway, scripted_upstream, backup, failures=1, cooldown_s=10)
    events = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
              b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n']
    scripted_upstream.script(Reply(chunks=events))
    status, _, raw = await chat(gw, stream=True)
    assert status == 200 and raw == b"".join(events)
    view = gw.state.health.view(("up", "gpt-a"))
    assert (view.state, view.cooldown_until, view.last_error) == ("cooldown", clock.t + 10, "cut")
