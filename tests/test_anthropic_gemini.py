"""Native Anthropic Messages and Gemini surfaces: official SDKs, byte-exact vectors, errors."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import anthropic
import orjson
import pytest
from google import genai
from google.genai import types as gtypes

from _gateway import UPSTREAM_KEY, Reply
from proxy.config import UpstreamConfig
from proxy.http1.headers import Headers
from proxy.upstream import UpstreamPool, request_head
from fixtures.vectors.load_vector import iter_sse, load

VECTORS = Path(__file__).parent / "fixtures" / "vectors"
# Streams are relayed byte for byte, their last bytes as received: several SDK fixtures end
# without the last blank line, and the gateway no longer completes it (issue 25 item 11:
# an event the upstream never finished must not be dispatched by the client).


ANTHROPIC_STREAMS = sorted(p.name for p in (VECTORS / "anthropic").glob("*.sse"))
GEMINI_STREAMS = sorted(p.name for p in (VECTORS / "gemini").glob("*.sse"))


# ---------------------------------------------------------------------- Anthropic SDK


async def test_anthropic_sdk_create_stream_count_tokens(gateway):
    gw = await gateway()
    for client in (
        anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0),          # x-api-key
        anthropic.AsyncAnthropic(base_url=gw.url, auth_token=gw.key, max_retries=0),       # Bearer
    ):
        async with client:
            msg = await client.messages.create(model="mock-claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
            assert msg.content[0].type == "text" and msg.usage.output_tokens > 0
            async with client.messages.stream(model="mock-claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as s:
                final = await s.get_final_message()
            assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
            count = await client.messages.count_tokens(model="mock-claude", messages=[{"role": "user", "content": "hi"}])
            assert count.input_tokens > 0
    recs = await gw.wait_records(6)
    streamed = [r for r in recs if r.stream]
    assert len(streamed) == 2 and all(r.completion_tokens > 0 and not r.estimated for r in streamed)


async def test_anthropic_headers_and_beta_query_forwarded(gateway):
    gw = await gateway()
    _, payload = load("anthropic/messages_stream_basic_text.sse")
    gw.upstream.script(Reply(chunks=[payload]))
    headers = {"x-api-key": gw.key, "anthropic-version": "2026-10-21", "anthropic-beta": "a-2025,b-2026",
               "x-stainless-lang": "python", "X-Claude-Code-Session-Id": "s1"}
    body = {"model": "up-claude", "max_tokens": 10, "stream": True, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
            "context_management": {"x": 1}}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages?beta=true", json=body, headers=headers) as r:
            assert r.status == 200
            assert await r.read() == payload
    got = gw.upstream.received[0]
    assert got.path == "/v1/messages" and got.query == "beta=true"
    lowered = {k.lower(): v for k, v in got.headers.items()}
    assert lowered["anthropic-version"] == "2026-10-21" and lowered["anthropic-beta"] == "a-2025,b-2026"
    assert lowered["x-api-key"] == UPSTREAM_KEY
    assert orjson.loads(got.body)["context_management"] == {"x": 1}


async def test_upstream_head_has_one_line_per_header_and_ours_win() -> None:
    """A forwarded client header that the operator (or the credential) also sets goes
    out once, with the operator's value; the request id only when nobody set it."""
    pool = UpstreamPool()
    config = UpstreamConfig("u", "http://127.0.0.1:9", "anthropic", "sk-up",
                            headers={"Anthropic-Beta": "operator-beta", "User-Agent": "gateway/1"})
    target = pool.add(config, config.base_url, config.api_key)
    try:
        client = Headers({"anthropic-version": "2023-06-01", "anthropic-beta": "client-beta",
                          "user-agent": "sdk/2", "x-api-key": "sk-client"})
        lines = request_head(client, target, "req_1").decode().split("\r\n")[:-1]
        names = [line.split(":", 1)[0].lower() for line in lines]
        assert len(names) == len(set(names)), lines
        got = dict(line.split(": ", 1) for line in lines)
        assert got["Anthropic-Beta"] == "operator-beta" and got["User-Agent"] == "gateway/1"
        assert got["anthropic-version"] == "2023-06-01" and got["x-api-key"] == "sk-up"
        assert got["X-Request-Id"] == "req_1"
    finally:
        await pool.close()


@pytest.mark.parametrize("name", ANTHROPIC_STREAMS)
async def test_anthropic_vector_byte_identical_and_metered(gateway, name):
    gw = await gateway()
    _, payload = load(f"anthropic/{name}")
    gw.upstream.script(Reply(chunks=[payload[i : i + 61] for i in range(0, len(payload), 61)]))
    # max_tokens above every vector's output: a count past it would be implausible (item 3).
    body = {"model": "up-claude", "max_tokens": 4096, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": gw.key}) as r:
            assert r.status == 200
            assert await r.read() == payload
    rec = (await gw.wait_records(1))[0]
    start = next((orjson.loads(d) for e, d in iter_sse(payload) if e == "message_start"), None)
    deltas = [orjson.loads(d) for e, d in iter_sse(payload) if e == "message_delta"]
    if start and "usage" in start["message"] and deltas and "usage" in deltas[-1]:
        u = start["message"]["usage"]
        prompt = u["input_tokens"] + u.get("cache_read_input_tokens", 0) + u.get("cache_creation_input_tokens", 0)
        assert (rec.prompt_tokens, rec.completion_tokens) == (prompt, deltas[-1]["usage"]["output_tokens"])
        assert not rec.estimated
    else:
        assert rec.estimated


async def test_anthropic_errors_in_anthropic_shape(gateway):
    gw = await gateway()
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages", json={"model": "mock-claude"}) as r:
            body = await r.json()
            assert r.status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
            assert body["request_id"] == r.headers["request-id"]
        # count_tokens on a model served over OpenAI's protocol is estimated, but a body
        # with nothing to count is refused as Anthropic refuses it (tests/test_count_tokens.py).
        async with s.post(gw.url + "/v1/messages/count_tokens", json={"model": "mock-gpt", "messages": []}, headers={"x-api-key": gw.key}) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["type"] == "invalid_request_error"
            assert "messages" in body["error"]["message"]
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-bad", max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(model="mock-claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])


async def test_anthropic_midstream_error_event(gateway):
    gw = await gateway()
    _, payload = load("anthropic/messages_stream_basic_text.sse")
    events = [e + b"\n\n" for e in payload.split(b"\n\n") if e][:4]
    gw.upstream.script(Reply(chunks=events, cut_after=2))
    body = {"model": "up-claude", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": gw.key}) as r:
            raw = await r.read()
    last = raw.rstrip(b"\n").split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ") and raw.endswith(b"\n\n")
    assert orjson.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "api_error"


# ---------------------------------------------------------------------- Gemini SDK


@pytest.mark.parametrize("version", ["v1beta", "v1"])
async def test_genai_sdk_both_versions(gateway, version):
    gw = await gateway()
    client = genai.Client(api_key=gw.key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version=version))
    r = await client.aio.models.generate_content(model="mock-gemini", contents="hello")
    assert r.text and r.usage_metadata.total_token_count > 0
    chunks = [c async for c in await client.aio.models.generate_content_stream(model="mock-gemini", contents="hello")]
    assert chunks[-1].candidates[0].finish_reason == gtypes.FinishReason.STOP
    assert chunks[-1].usage_metadata.total_token_count > 0
    models = [m.name async for m in await client.aio.models.list()]
    assert "models/mock-gemini" in models
    recs = await gw.wait_records(2)
    assert all(not r.estimated and r.completion_tokens > 0 for r in recs)


@pytest.mark.parametrize("name", GEMINI_STREAMS)
async def test_gemini_vector_byte_identical(gateway, name):
    gw = await gateway()
    _, payload = load(f"gemini/{name}")
    gw.upstream.script(Reply(chunks=[payload[i : i + 41] for i in range(0, len(payload), 41)]))
    async with aiohttp.ClientSession() as s:
        url = gw.url + f"/v1beta/models/up-gemini:streamGenerateContent?alt=sse&key={gw.key}"
        async with s.post(url, json={"contents": [{"parts": [{"text": "x"}]}]}) as r:
            assert r.status == 200
            assert await r.read() == payload
    got = gw.upstream.received[0]
    assert got.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent" and got.query == "alt=sse"
    assert gw.key not in got.query
    rec = (await gw.wait_records(1))[0]
    metas = [orjson.loads(d)["usageMetadata"] for _, d in iter_sse(payload) if "usageMetadata" in d]
    if metas:
        assert rec.prompt_tokens == metas[-1]["promptTokenCount"] and not rec.estimated
    else:
        assert rec.estimated


async def test_gemini_errors_and_auth_styles(gateway):
    gw = await gateway()
    async with aiohttp.ClientSession() as s:
        path = "/v1beta/models/mock-gemini:generateContent"
        body = {"contents": [{"parts": [{"text": "x"}]}]}
        async with s.post(gw.url + path, json=body) as r:
            err = await r.json()
            assert r.status == 401 and err["error"]["status"] == "UNAUTHENTICATED"
            assert next(iter(err)) == "error"
        for headers, query in (({"x-goog-api-key": gw.key}, ""), ({"Authorization": f"Bearer {gw.key}"}, ""), ({}, f"?key={gw.key}")):
            async with s.post(gw.url + path + query, json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
        async with s.post(gw.url + "/v1beta/models/models/mock-gemini:generateContent", json=body, headers={"x-goog-api-key": gw.key}) as r:
            assert r.status == 200
        async with s.post(gw.url + "/v1beta/models/nope:generateContent", json=body, headers={"x-goog-api-key": gw.key}) as r:
            assert r.status == 404 and (await r.json())["error"]["status"] == "NOT_FOUND"
        # ?key= is accepted on Gemini routes only (/v1/models?key= is google-genai's v1 list).
        async with s.post(gw.url + f"/v1/chat/completions?key={gw.key}", json={"model": "mock-gpt", "messages": []}) as r:
            assert r.status == 401


# ---------------------------------------------------------------------- keep-alives, CORS


async def test_keepalives_per_dialect(gateway):
    from proxy.config import ServerConfig

    gw = await gateway(server=ServerConfig(stream_keepalive_s=0.1, shutdown_grace_s=1))
    oa = [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]
    an = [b'event: message_start\ndata: {"type":"message_start"}\n\n', b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
    ge = [b'data: {"candidates":[]}\r\n\r\n', b'data: {"candidates":[]}\r\n\r\n']
    gw.upstream.script(Reply(chunks=oa, delay_s=0.35), Reply(chunks=an, delay_s=0.35), Reply(chunks=ge, delay_s=0.35))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json={"model": "up-gpt", "stream": True, "messages": [], "stream_options": {"include_usage": True}}, headers=gw.headers()) as r:
            raw = await r.read()
        assert b": keep-alive\n\n" in raw and b": ping" not in raw
        assert raw.replace(b": keep-alive\n\n", b"") == b"".join(oa)
        async with s.post(gw.url + "/v1/messages", json={"model": "up-claude", "stream": True, "max_tokens": 1, "messages": []}, headers={"x-api-key": gw.key}) as r:
            raw = await r.read()
        assert b'event: ping\ndata: {"type": "ping"}\n\n' in raw
        async with s.post(gw.url + "/v1beta/models/up-gemini:streamGenerateContent?alt=sse", json={}, headers={"x-goog-api-key": gw.key}) as r:
            assert await r.read() == b"".join(ge)


async def test_cors_preflight_and_stream_headers(gateway):
    gw = await gateway()
    async with aiohttp.ClientSession() as s:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"}
        async with s.options(gw.url + "/v1/chat/completions", headers=pre) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.headers["Access-Control-Allow-Headers"] == "authorization,content-type,x-stainless-os"
        body = {"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers={**gw.headers(), "Origin": "https://app.example"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            await r.read()
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers={"Origin": "https://app.example"}) as r:
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_models_list_shapes(gateway):
    gw = await gateway()
    limited = await gw.create_key("claude-only", models=("mock-claude",))
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/v1/models", headers=gw.headers(limited)) as r:
            body = await r.json()
            assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["mock-claude"]
        async with s.get(gw.url + "/v1/models?limit=1000", headers={"x-api-key": limited, "anthropic-version": "2023-06-01"}) as r:
            body = await r.json()
            assert body["data"][0]["type"] == "model" and body["has_more"] is False
        async with s.get(gw.url + "/v1beta/models", headers={"x-goog-api-key": limited}) as r:
            assert (await r.json())["models"][0]["name"] == "models/mock-claude"
        async with s.get(gw.url + "/models", headers=gw.headers()) as r:
            assert r.status == 200



async def test_gemini_json_array_stream_without_alt_sse(gateway):
    gw = await gateway()
    async with aiohttp.ClientSession() as s:
        url = gw.url + "/v1beta/models/mock-gemini:streamGenerateContent"
        async with s.post(url, json={"contents": [{"parts": [{"text": "x"}]}]}, headers={"x-goog-api-key": gw.key}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
            items = orjson.loads(await r.read())
    assert items[-1]["candidates"][0]["finishReason"] == "STOP"
    rec = (await gw.wait_records(1))[0]
    assert rec.stream and not rec.estimated
    assert rec.completion_tokens == items[-1]["usageMetadata"]["candidatesTokenCount"]


async def test_gemini_json_array_stream_cut_mid_way_stays_one_json_document(gateway):
    """Same dialect, no alt=sse: the upstream's array is relayed as it comes; when the
    upstream cuts it, the gateway's error is the array's last element and closes it (an
    SSE line there would leave the client a body that does not parse)."""
    gw = await gateway()

    def element(text: str) -> bytes:
        return orjson.dumps({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}],
                             "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}})

    gw.upstream.script(Reply(headers={"Content-Type": "application/json"},
                             chunks=[b"[" + element("Hel"), b",\r\n" + element("lo"), b",\r\n" + element("!"), b"]"],
                             cut_after=2))
    async with aiohttp.ClientSession() as s:
        url = gw.url + "/v1beta/models/up-gemini:streamGenerateContent"
        async with s.post(url, json={"contents": [{"parts": [{"text": "x"}]}]}, headers={"x-goog-api-key": gw.key}) as r:
            assert r.status == 200
            body = await r.read()
    assert gw.upstream.received[-1].path.endswith(":streamGenerateContent")   # no alt=sse asked upstream
    items = orjson.loads(body)
    assert [i["candidates"][0]["content"]["parts"][0]["text"] for i in items[:2]] == ["Hel", "lo"]
    assert list(items[-1]) == ["error"] and items[-1]["error"]["code"] >= 500
    rec = (await gw.wait_records(1))[0]
    assert rec.outcome == "upstream_error"
