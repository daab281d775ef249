"""Issue 25: what an attacker, a broken provider and a crash could still do, one test (or
more) per item. RELIABILITY.md: D5 (keyless bodies), D6 (connection caps), C11 (hostile
upstream heads), I2 (records of requests in flight at a SIGKILL), I3/I4 (implausible
provider usage). docs/RELIABILITY-COVERAGE.md maps each item to its tests.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from _gateway import UPSTREAM_KEY, Reply
from test_http_robustness import RawUpstream, _raw_gateway_overrides, addr, exchange, post_bytes, responses

from proxy.config import LimitsConfig, ServerConfig

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
BIG = 30 * 1024 * 1024


def _server(**kw: Any) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=2, **kw)


def _head(key: str | None, length: int, *, extra: bytes = b"", path: str = "/v1/chat/completions") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n".encode() if key is not None else b""
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n".encode()
        + auth + extra + b"\r\n"
    )


# ---------------------------------------------------------------------- item 1 (D5, D6)


async def test_d5_keyless_upload_gets_401_before_its_body_is_read(gateway):
    gw = await gateway()
    for key in (None, "sk-" + "x" * 43, ""):
        # Only the head of a 30 MB upload is sent: the answer must not wait for the body.
        raw, closed = await exchange(gw, _head(key, BIG), timeout=3, until=lambda b: b"\r\n\r\n" in b and b"}" in b)
        [resp] = responses(raw)
        assert resp.status == 401, raw[:300]
        assert orjson.loads(resp.body)["error"]["code"] == "invalid_api_key"
        assert resp.headers.get("connection") == "close"
    # The valid key still works on the same server, body and all.
    raw, _ = await exchange(gw, post_bytes("/v1/chat/completions", orjson.dumps(CHAT), gw.key), until=lambda b: b"}}" in b or b"usage" in b)
    assert responses(raw)[0].status == 200


async def test_d5_ten_keyless_30mb_uploads_do_not_pin_their_bodies(gateway):
    """Ten connections stream 30 MB each without a key: each is refused after the head,
    and the server never holds more than a read's worth of any of them."""
    gw = await gateway()
    held: list[int] = []

    async def upload() -> int:
        reader, writer = await asyncio.open_connection(*addr(gw))
        writer.write(_head(None, BIG))
        chunk = b"x" * (1 << 20)
        sent = 0
        try:
            while sent < BIG:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 2)
                sent += len(chunk)
        except (ConnectionError, TimeoutError):
            pass
        head = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        return int(head.split(b" ", 2)[1])

    async def watch() -> None:
        while True:
            held.append(max((c._body_len for c in gw.running.http._conns), default=0))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        statuses = await asyncio.gather(*(upload() for _ in range(10)))
    finally:
        watcher.cancel()
    assert statuses == [401] * 10
    assert max(held) < 1 << 20  # never a body buffered: at most part of one read


async def test_d5_expect_100_continue_is_answered_only_after_auth(gateway):
    gw = await gateway()
    body = orjson.dumps(CHAT)
    raw, _ = await exchange(gw, _head(None, len(body), extra=b"Expect: 100-continue\r\n"), timeout=3,
                            until=lambda b: b"}" in b)
    assert not raw.startswith(b"HTTP/1.1 100"), raw[:100]
    assert responses(raw)[0].status == 401
    # With a valid key: 100 Continue, and only then (the body sent after it) the answer.
    reader, writer = await asyncio.open_connection(*addr(gw))
    try:
        writer.write(_head(gw.key, len(body), extra=b"Expect: 100-continue\r\n"))
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_d5_a_body_must_arrive_within_body_timeout_s(gateway):
    gw = await gateway(server=_server(body_timeout_s=0.5, head_timeout_s=5))
    body = orjson.dumps(CHAT) + b" " * 200
    # The body trickles in (no gap near head_timeout_s), but never completes in time.
    pieces = [_head(gw.key, len(body))] + [body[i:i + 5] for i in range(0, 60, 5)]
    raw, closed = await exchange(gw, *pieces, gap=0.1, timeout=5, until=lambda b: b"}" in b)
    [resp] = responses(raw)
    assert resp.status == 408 and closed or resp.headers.get("connection") == "close"


async def test_d6_connections_over_the_per_client_cap_get_503(gateway):
    gw = await gateway(server=_server(max_connections_per_client=2))
    host, port = addr(gw)
    opened = [await asyncio.open_connection(host, port) for _ in range(2)]
    try:
        raw, closed = await exchange(gw, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
        assert raw.startswith(b"HTTP/1.1 503") and closed
        assert b"Retry-After: 1" in raw
        # Another client address is not affected.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as s:
            async with s.get(gw.url + "/healthz") as r:
                assert r.status == 200
    finally:
        for _, w in opened:
            w.close()
    # Once they close, the address may connect again.
    await asyncio.sleep(0.05)
    raw, _ = await exchange(gw, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3, until=lambda b: b"\r\n\r\n" in b)
    assert raw.startswith(b"HTTP/1.1 200")
    assert gw.running.http.refused_connections == 1


async def test_d6_global_cap_and_trusted_proxies_are_not_capped_per_address(gateway):
    gw = await gateway(server=_server(max_connections_per_client=1, max_connections=3, trusted_proxies=("127.0.0.1",)))
    host, port = addr(gw)
    # 127.0.0.1 is a trusted proxy: its connections carry many clients, the per-address cap skips it.
    opened = [await asyncio.open_connection(host, port) for _ in range(3)]
    try:
        await asyncio.sleep(0.05)
        assert gw.running.http.connections == 3
        raw, closed = await exchange(gw, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
        assert raw.startswith(b"HTTP/1.1 503") and closed  # the global cap
    finally:
        for _, w in opened:
            w.close()


# ---------------------------------------------------------------------- item 13 (see also test_keys_auth B6)


async def test_trusted_proxies_are_documented_in_the_deployment_guide():
    guide = (Path(__file__).parent.parent / "deploy" / "README.md").read_text()
    assert "trusted_proxies" in guide and re.search(r"X-Forwarded-For", guide)


# ---------------------------------------------------------------------- item 9


def _sse(obj: Any, event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + orjson.dumps(obj) + b"\n\n"


FINAL_STREAMS: dict[str, tuple[str, str, dict[str, Any], list[bytes], bytes]] = {
    "chat": ("/v1/chat/completions", "up-gpt", {"messages": [{"role": "user", "content": "hi"}],
                                                 "stream_options": {"include_usage": True}}, [
        _sse({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}),
        _sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}),
        b"data: [DONE]\n\n"], b"[DONE]"),
    "responses": ("/v1/responses", "up-gpt", {"input": "hi"}, [
        _sse({"type": "response.output_text.delta", "delta": "Hi"}, "response.output_text.delta"),
        _sse({"type": "response.completed", "response": {"usage": {"input_tokens": 5, "output_tokens": 1,
                                                                     "total_tokens": 6}}}, "response.completed")],
        b"response.completed"),
    "messages": ("/v1/messages", "up-claude", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, [
        _sse({"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}}, "message_start"),
        _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}, "content_block_delta"),
        _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop")], b"message_stop"),
    "gemini": ("/v1beta/models/up-gemini:streamGenerateContent?alt=sse", "", {"contents": [{"parts": [{"text": "hi"}]}]}, [
        _sse({"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]}),
        _sse({"candidates": [{"content": {"parts": [{"text": "!"}]}, "finishReason": "STOP"}],
              "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7}})],
        b"finishReason"),
}


@pytest.mark.parametrize("name", list(FINAL_STREAMS))
async def test_item9_client_closing_after_the_final_event_is_ok_not_client_abort(gateway, name):
    gw = await gateway()
    path, model, body, chunks, final = FINAL_STREAMS[name]
    # The upstream sends the final event but keeps the connection a while (its EOF comes later).
    gw.upstream.script(Reply(chunks=[*chunks, b""], hang_after=len(chunks)))
    payload = orjson.dumps({**body, **({"model": model} if model else {}), **({"stream": True} if model else {})})
    head = post_bytes(path, payload, gw.key)
    raw, _ = await exchange(gw, head, timeout=5, until=lambda b: final in b and b.endswith(b"\n\n\r\n"))
    assert final in raw
    [rec] = await gw.wait_records(1)
    assert (rec.outcome, rec.error, rec.status) == ("ok", None, 200), rec
    assert not rec.estimated and rec.prompt_tokens == 5


async def test_item9_client_closing_before_the_final_event_is_still_client_abort(gateway):
    gw = await gateway()
    path, model, body, chunks, final = FINAL_STREAMS["chat"]
    gw.upstream.script(Reply(chunks=[*chunks[:1], *chunks[1:]], hang_after=1))
    head = post_bytes(path, orjson.dumps({**body, "model": model, "stream": True}), gw.key)
    raw, _ = await exchange(gw, head, timeout=5, until=lambda b: b"Hi" in b)
    assert final not in raw
    [rec] = await gw.wait_records(1)
    assert rec.outcome == "client_abort"


# ---------------------------------------------------------------------- item 12


async def _post_json(gw: Any, key: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers(key)) as r:
            return r.status, r.headers.copy(), await r.json()


async def test_item12_tpm_refusal_that_waiting_cannot_fix_says_why_without_retry_after(gateway):
    gw = await gateway()
    key = await gw.create_key("tpm60", tpm=60)
    status, headers, body = await _post_json(gw, key, CHAT)  # no max_tokens: 4096 reserved
    assert status == 429 and "Retry-After" not in headers and headers["x-should-retry"] == "false"
    message = body["error"]["message"]
    assert "max_tokens" in message and "4096" in message and "60 tokens per minute" in message
    assert "try again" not in message.lower()
    # With a max_tokens that fits, the same key is served.
    status, _, _ = await _post_json(gw, key, {**CHAT, "max_tokens": 5})
    assert status == 200


async def test_item12_budget_never_says_spent_when_nothing_was_spent(gateway):
    gw = await gateway(limits=LimitsConfig(budget_admission="reserve"))
    key = await gw.create_key("tiny", budget_usd=0.00005)
    status, headers, body = await _post_json(gw, key, CHAT)  # 4096 output tokens at $2/M: $0.008
    assert status == 429 and "Retry-After" not in headers
    message = body["error"]["message"]
    assert "spent" not in message and "max_tokens" in message and "whole budget" in message
    assert body["error"]["code"] == "insufficient_quota"


async def test_item12_the_default_budget_rule_admits_while_nothing_is_spent(gateway):
    gw = await gateway()
    key = await gw.create_key("tiny", budget_usd=0.00005)
    status, _, _ = await _post_json(gw, key, CHAT)
    assert status == 200


# ---------------------------------------------------------------------- item 2 (C11)


async def test_c11_response_head_over_the_client_bounds_is_502_in_the_callers_dialect(gateway):
    raw = RawUpstream()
    await raw.start()
    try:
        gw = await gateway(**_raw_gateway_overrides(raw))
        heads = [
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(40_000)) + b"Content-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\n{}",
        ]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            for head in heads:
                raw.answers.append(head)
                async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "raw-gpt"}, headers=gw.headers()) as r:
                    assert r.status == 502
                    assert (await r.json())["error"]["type"]
            async with s.get(gw.url + "/healthz") as r:
                assert r.status == 200
        await gw.wait_records(2)
    finally:
        await raw.stop()


# ---------------------------------------------------------------------- item 3 (I3, I4)


def _chat_body(usage: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}], "usage": usage})


@pytest.mark.parametrize("usage,why", [
    ({"prompt_tokens": -5, "completion_tokens": -3, "total_tokens": -8}, "negative"),
    ({"prompt_tokens": 5, "completion_tokens": 10**12, "total_tokens": 10**12 + 5}, "negative, absurd"),
    ({"prompt_tokens": 5, "completion_tokens": 5000, "total_tokens": 5005}, "5000 output tokens for at most 8"),
], ids=["negative", "1e12", "above-max_tokens"])
async def test_i3_i4_implausible_provider_usage_is_replaced_by_the_estimate(gateway, usage, why):
    gw = await gateway()
    gw.upstream.script(Reply(headers={"Content-Type": "application/json"}, chunks=[_chat_body(usage)]))
    async with aiohttp.ClientSession() as s:
        body = {**CHAT, "model": "up-gpt", "max_tokens": 8}
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "Hi there"
    [rec] = await gw.wait_records(1)
    assert rec.estimated and rec.outcome == "ok"
    assert rec.error is not None and rec.error.startswith("implausible_usage") and why in rec.error
    # The estimate: the prompt from the request's size, the answer from what was delivered.
    assert 0 < rec.prompt_tokens < 100 and 0 < rec.completion_tokens <= 8 + 16
    assert 0 < rec.cost_usd < 0.001


async def test_i3_plausible_usage_is_kept_and_n_choices_multiply_the_bound(gateway):
    gw = await gateway()
    gw.upstream.script(Reply(headers={"Content-Type": "application/json"},
                             chunks=[_chat_body({"prompt_tokens": 5, "completion_tokens": 24, "total_tokens": 29})]))
    async with aiohttp.ClientSession() as s:
        body = {**CHAT, "model": "up-gpt", "max_tokens": 8, "n": 3}
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            assert r.status == 200
    [rec] = await gw.wait_records(1)
    assert (rec.estimated, rec.error, rec.prompt_tokens, rec.completion_tokens) == (False, None, 5, 24)


# ---------------------------------------------------------------------- item 6


@pytest.mark.parametrize("extra,param", [
    ({"extra_body": {"api_base": "http://169.254.169.254"}}, "extra_body.api_base"),
    ({"litellm_params": {"nested": [{"api_key": "sk-x"}]}}, "litellm_params.nested[0].api_key"),
    ({"metadata": {"base_url": "http://evil"}}, "metadata.base_url"),
    ({"stream_options": {"include_usage": True, "custom_llm_provider": "x"}}, "stream_options.custom_llm_provider"),
])
async def test_item6_forbidden_fields_are_refused_at_any_depth(gateway, extra, param):
    gw = await gateway()
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, **extra}, headers=gw.headers()) as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["code"] == "unsupported_parameter" and err["param"] == param


async def test_item6_the_same_names_in_message_text_and_tool_schemas_are_just_data(gateway):
    gw = await gateway()
    body = {
        **CHAT,
        "messages": [
            {"role": "user", "content": "set api_base and base_url, my api_key is {\"api_key\": 1}"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function", "function": {
                "name": "connect", "arguments": "{\"base_url\": \"http://x\"}"}}]},
            {"role": "tool", "tool_call_id": "t", "content": "ok"},
        ],
        "tools": [{"type": "function", "function": {"name": "connect", "parameters": {
            "type": "object", "properties": {"api_key": {"type": "string"}, "base_url": {"type": "string"}}}}}],
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            assert r.status == 200, await r.text()
        anthropic = {"model": "mock-claude", "max_tokens": 5, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "c", "input": {"api_key": "k"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}],
            "tools": [{"name": "c", "input_schema": {"type": "object", "properties": {"api_base": {"type": "string"}}}}]}
        async with s.post(gw.url + "/v1/messages", json=anthropic, headers=gw.headers()) as r:
            assert r.status == 200, await r.text()


# ---------------------------------------------------------------------- item 7


async def test_item7_upstream_error_bodies_are_scrubbed_of_the_credential_in_every_form(gateway):
    gw = await gateway()
    key = UPSTREAM_KEY  # sk-upstream-CANARY-7f3e9a1c2b4d6e8f
    forms = [key, key[:4] + "*" * 20 + key[-4:], key[:12] + "...", key[:6] + "..." + key[-4:], key[:16]]
    statuses = [400, 404, 422, 429, 402]
    for status, form in zip(statuses, forms):
        body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {form}. See the docs.", "type": "x"}})
        gw.upstream.script(Reply(status=status, headers={"Content-Type": "application/json"}, chunks=[body]))
    async with aiohttp.ClientSession() as s:
        for status, form in zip(statuses, forms):
            async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "up-gpt"}, headers=gw.headers()) as r:
                got = await r.read()
                assert r.status == status
                assert form.encode() not in got and key[-8:].encode() not in got and b"CANARY" not in got, got
                assert b"Incorrect API key provided: [redacted]" in got and b"See the docs." in got
