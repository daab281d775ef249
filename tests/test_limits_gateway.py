"""Per-key limits through the gateway: 429 shapes, headers, bursts, budgets, Redis, processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.config import LimitsConfig

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def _burst(url: str, headers: dict[str, str], n: int, body: dict | None = None, path: str = "/v1/chat/completions"):
    async with aiohttp.ClientSession() as s:
        async def one() -> tuple[int, dict[str, str], bytes]:
            async with s.post(url + path, json=body or CHAT, headers=headers) as r:
                return r.status, r.headers.copy(), await r.read()

        return await asyncio.gather(*(one() for _ in range(n)))


async def test_rpm_burst_admits_exactly_limit_with_openai_429(gateway):
    gw = await gateway()
    key = await gw.create_key("rpm5", rpm=5)
    results = await _burst(gw.url, gw.headers(key), 20)
    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(200) == 5 and statuses.count(429) == 15
    ok = next(h for s, h, _ in results if s == 200)
    assert ok["x-ratelimit-limit-requests"] == "5" and "x-ratelimit-remaining-requests" in ok
    status, headers, raw = next(r for r in results if r[0] == 429)
    err = orjson.loads(raw)["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    wait = int(headers["Retry-After"])
    assert 1 <= wait <= 60 and f"Please try again in {wait}s" in err["message"]
    recs = await gw.wait_records(5)
    assert len(recs) == 5  # refused requests never reached an upstream


async def test_ratelimit_headers_on_answers_streams_and_refusals(gateway):
    gw = await gateway()
    key = await gw.create_key("rpm3-tpm", rpm=3, tpm=100_000)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=CHAT, headers=gw.headers(key)) as r:
            assert r.status == 200
            first = r.headers.copy()
            await r.read()
        async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=gw.headers(key)) as r:
            assert r.status == 200
            streamed = r.headers.copy()
            await r.read()
        async with s.post(gw.url + "/v1/chat/completions", json=CHAT, headers=gw.headers(key)) as r:
            await r.read()
        async with s.post(gw.url + "/v1/chat/completions", json=CHAT, headers=gw.headers(key)) as r:
            assert r.status == 429
            refused = r.headers.copy()
    assert first["x-ratelimit-limit-requests"] == "3" and first["x-ratelimit-remaining-requests"] == "2"
    assert first["x-ratelimit-reset-requests"] == "60s" and first["x-ratelimit-reset-tokens"] == "60s"
    assert first["x-ratelimit-limit-tokens"] == "100000"
    assert 0 < int(first["x-ratelimit-remaining-tokens"]) < 100_000
    assert streamed["x-ratelimit-remaining-requests"] == "1" and streamed["x-ratelimit-limit-tokens"] == "100000"
    assert refused["x-ratelimit-limit-requests"] == "3" and refused["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused["x-ratelimit-reset-requests"].removesuffix("s")) <= 60
    for headers in (first, streamed, refused):
        assert len(headers.getall("x-ratelimit-limit-requests")) == 1


async def test_429_in_anthropic_and_gemini_shape(gateway):
    gw = await gateway()
    key = await gw.create_key("rpm1", rpm=1)
    body = {"model": "mock-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    results = await _burst(gw.url, {"x-api-key": key}, 2, body, "/v1/messages")
    _, headers, raw = next(r for r in results if r[0] == 429)
    err = orjson.loads(raw)
    assert err["type"] == "error" and err["error"]["type"] == "rate_limit_error" and headers["Retry-After"]
    key2 = await gw.create_key("rpm1-gemini", rpm=1)
    results = await _burst(gw.url, {"x-goog-api-key": key2}, 2, {"contents": [{"parts": [{"text": "x"}]}]},
                           "/v1beta/models/mock-gemini:generateContent")
    _, _, raw = next(r for r in results if r[0] == 429)
    err = orjson.loads(raw)["error"]
    assert err["status"] == "RESOURCE_EXHAUSTED"
    assert any(d.get("@type", "").endswith("RetryInfo") for d in err["details"])


async def test_max_parallel_released_on_every_path(gateway):
    gw = await gateway()
    key = await gw.create_key("par2", max_parallel=2)
    slow = {**gw.headers(key), "x-mock-delay-ms": "40", "x-mock-chunks": "5"}
    stream = {**CHAT, "stream": True}
    results = await _burst(gw.url, slow, 6, stream)
    assert sorted(s for s, _, _ in results).count(200) == 2
    # A client that leaves mid-stream releases its slot too.
    async with aiohttp.ClientSession() as s:
        r = await s.post(gw.url + "/v1/chat/completions", json=stream, headers=slow)
        await r.content.readany()
        r.close()
    await asyncio.sleep(0.3)
    results = await _burst(gw.url, gw.headers(key), 2)
    assert [s for s, _, _ in results] == [200, 200]


async def test_budget_never_overspent_by_more_than_one_request(gateway):
    """budget_admission: reserve (each request reserves its worst case)."""
    gw = await gateway(limits=LimitsConfig(budget_admission="reserve"))
    # mock-gpt costs $1/M input and $2/M output: one request reserves about 10 output tokens.
    key = await gw.create_key("budget", budget_usd=0.0004)
    results = await _burst(gw.url, gw.headers(key), 50)
    refused = [orjson.loads(raw)["error"] for s, _, raw in results if s == 429]
    # Refused either for good (no room left for this request's worst case) or, while
    # reservations of requests in flight are what is in the way, for a second.
    assert refused and all(
        e["code"] == "insufficient_quota" or (e["code"] == "rate_limit_exceeded" and "in flight" in e["message"])
        for e in refused
    )
    assert all("spent" not in e["message"] for e in refused)  # nothing said spent that was not
    recs = await gw.wait_records(1)
    spent = sum(r.cost_usd for r in recs)
    one_request_max = max(r.cost_usd for r in recs)
    assert spent <= 0.0004 + one_request_max


async def test_spend_admission_uses_the_whole_budget_and_overspends_by_at_most_the_requests_in_flight(gateway):
    """budget_admission: spend (the default): admitted while spend < budget, whatever
    max_tokens says; refused ones are told the budget is spent, which is then true."""
    gw = await gateway()
    key = await gw.create_key("spend", budget_usd=0.0004)
    big = {**CHAT, "max_tokens": 32000}  # reserve mode would reserve $0.064 each: refused at once
    results = []
    for _ in range(4):  # waves of 10 in flight
        results += await _burst(gw.url, gw.headers(key), 10, big)
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) >= 10 and statuses.count(429) >= 1
    recs = await gw.wait_records(statuses.count(200))
    spent = sum(r.cost_usd for r in recs)
    assert spent <= 0.0004 + 10 * max(r.cost_usd for r in recs)  # at most one wave in flight past it
    refused = [orjson.loads(raw)["error"] for s, _, raw in results if s == 429]
    assert all(e["code"] == "insufficient_quota" and "is spent" in e["message"] for e in refused)
    # Once spent, a request is refused, and says so.
    status, headers, raw = (await _burst(gw.url, gw.headers(key), 1, big))[0]
    assert status == 429 and "is spent" in orjson.loads(raw)["error"]["message"] and "Retry-After" not in headers


# ---------------------------------------------------------------------- Redis


async def test_redis_limits_and_fail_closed_then_recover(gateway, redis_server):
    gw = await gateway(limits=LimitsConfig(url=redis_server.url))
    key = await gw.create_key("redis-rpm", rpm=3)
    results = await _burst(gw.url, gw.headers(key), 10)
    assert sorted(s for s, _, _ in results).count(200) == 3
    other = await gw.create_key("redis-open", rpm=1000)
    redis_server.kill()
    t0 = time.monotonic()
    status, headers, raw = (await _burst(gw.url, gw.headers(other), 1))[0]
    assert status == 503 and orjson.loads(raw)["error"]["code"] == "rate_limiter_unavailable"
    assert headers["Retry-After"] and time.monotonic() - t0 < 3
    # A key without limits never touches Redis.
    assert (await _burst(gw.url, gw.headers(), 1))[0][0] == 200
    redis_server.start()
    for _ in range(50):
        if (await _burst(gw.url, gw.headers(other), 1))[0][0] == 200:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the gateway did not recover after Redis came back")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_two_gateway_processes_share_one_redis_exactly(tmp_path: Path, redis_server):
    db = tmp_path / "gw.db"
    ports = [_free_port(), _free_port()]
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"""
server: {{host: 127.0.0.1, shutdown_grace_s: 2}}
storage: {{url: "sqlite:///{db}", spool_path: "{tmp_path}/spool.jsonl"}}
limits: {{url: "{redis_server.url}"}}
upstreams: [{{name: mock, protocol: openai, base_url: "mock://"}}]
models: [{{name: demo, routes: [{{upstream: mock, model: mock-gpt}}]}}]
"""
    )
    env = {**os.environ, "LLM_PROXY_LOG_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-m", "proxy", "keys", "create", "--name", "shared", "--rpm", "7", "--json", "--config", str(config)],
                         capture_output=True, env=env, check=True, timeout=30)
    key = orjson.loads(out.stdout)["key"]
    procs = [subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(p)], env=env)
             for p in ports]
    try:
        async with aiohttp.ClientSession() as s:
            for p in ports:
                for _ in range(100):
                    try:
                        async with s.get(f"http://127.0.0.1:{p}/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
        body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
        results = await asyncio.gather(*(_burst(f"http://127.0.0.1:{p}", {"Authorization": f"Bearer {key}"}, 15, body) for p in ports))
        statuses = [s for batch in results for s, _, _ in batch]
        assert statuses.count(200) == 7 and statuses.count(429) == 23
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(timeout=15) == 0
