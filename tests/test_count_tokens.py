"""Token counting across dialects through the gateway (issue 22 item 7): the official
anthropic and google-genai SDKs count against the mock provider speaking each protocol.
The mock checks what its counters receive (proxy/mock_checks.py: count_tokens refuses
extra inputs such as max_tokens, countTokens unknown fields and a wrapped request that
names another model), so a bad translation fails here. Its count is
`prompt_tokens_for(body it received)`, which the tests compare with what the SDK got."""

from __future__ import annotations

import aiohttp
import anthropic
import orjson
import pytest
from google import genai
from google.genai import types as gtypes

from proxy.mock_upstream import mock_stats, prompt_tokens_for
from tests._gateway import Reply, gateway, scripted_upstream  # noqa: F401

TOOL = {"name": "get_weather", "description": "Weather for a place",
        "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}
TEXT = "How is the weather in Paris today? " * 20   # 700 bytes


def _anthropic(gw):
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def _received(gw, path):
    return [r for r in gw.mock_stats[mock_stats].recent if r.path == path]


@pytest.mark.parametrize("model,path", [
    ("mock-claude", "/v1/messages/count_tokens"),
    ("mock-gemini", "/v1beta/models/mock-gemini:countTokens"),
])
async def test_anthropic_sdk_counts_on_upstreams_with_a_counter(gateway, model, path):
    gw = await gateway()
    async with _anthropic(gw) as client:
        raw = await client.messages.with_raw_response.count_tokens(
            model=model, system="be brief", tools=[TOOL], messages=[{"role": "user", "content": TEXT}])
    count = await raw.parse()
    sent = _received(gw, path)[-1]
    # The upstream's own number, in Anthropic's shape; not marked as an estimate.
    assert count.input_tokens == prompt_tokens_for(sent.body) > 0
    assert "x-llm-proxy-estimated" not in raw.headers
    body = orjson.loads(sent.body)
    if model == "mock-gemini":   # the wrapped form: system prompt and tools are counted too
        inner = body["generateContentRequest"]
        assert inner["model"] == "models/mock-gemini" and inner["systemInstruction"]["parts"][0]["text"] == "be brief"
        assert inner["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    (rec,) = await gw.wait_records(1)
    assert (rec.endpoint, rec.status, rec.prompt_tokens, rec.completion_tokens, rec.cost_usd) == ("count_tokens", 200, 0, 0, 0)
    assert (rec.client_dialect, rec.upstream_protocol, rec.estimated) == ("anthropic", model.split("-")[1].replace("claude", "anthropic"), False)


async def test_anthropic_sdk_count_on_openai_upstream_is_estimated_locally(gateway):
    gw = await gateway()
    async with _anthropic(gw) as client:
        raw = await client.messages.with_raw_response.count_tokens(
            model="mock-gpt", system="be brief", tools=[TOOL], messages=[{"role": "user", "content": TEXT}])
        # Claude Code's form of the call.
        beta = await client.beta.messages.count_tokens(model="mock-gpt", messages=[{"role": "user", "content": TEXT}])
    assert raw.headers["x-llm-proxy-estimated"] == "true"
    n = (await raw.parse()).input_tokens
    assert 175 + 20 < n < 400   # 700 bytes of text ≈ 175 tokens, plus system, tool and framing
    assert 175 <= beta.input_tokens < n
    # No upstream was asked, so there is no usage record of an attempt.
    assert gw.mock_stats[mock_stats].total == 0
    assert await gw.records() == []


@pytest.mark.parametrize("version", ["v1beta", "v1"])
async def test_genai_sdk_counts_on_gemini_upstream_byte_exact(gateway, genai_client, version):
    gw = await gateway()
    got = await genai_client(gw, version).models.count_tokens(model="mock-gemini", contents=TEXT)
    sent = _received(gw, "/v1beta/models/mock-gemini:countTokens")[-1]
    assert got.total_tokens == prompt_tokens_for(sent.body) > 0
    assert orjson.loads(sent.body) == {"contents": [{"parts": [{"text": TEXT}], "role": "user"}]}
    (rec,) = await gw.wait_records(1)
    assert (rec.endpoint, rec.client_dialect, rec.upstream_protocol, rec.prompt_tokens, rec.cost_usd) == (
        "countTokens", "gemini", "gemini", 0, 0)


async def test_genai_sdk_counts_on_anthropic_upstream(gateway, genai_client):
    gw = await gateway()
    client = genai_client(gw)
    contents = [gtypes.Content(role="user", parts=[gtypes.Part(text=TEXT)]),
                gtypes.Content(role="model", parts=[gtypes.Part(text="Sunny.")]),
                gtypes.Content(role="user", parts=[gtypes.Part(text="And tomorrow?")])]
    got = await client.models.count_tokens(model="mock-claude", contents=contents)
    sent = _received(gw, "/v1/messages/count_tokens")[-1]
    assert got.total_tokens == prompt_tokens_for(sent.body) > 0
    body = orjson.loads(sent.body)
    assert body["model"] == "mock-claude" and [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert "max_tokens" not in body
    (rec,) = await gw.wait_records(1)
    assert (rec.endpoint, rec.client_dialect, rec.upstream_protocol, rec.cost_usd) == ("countTokens", "gemini", "anthropic", 0)


async def test_genai_sdk_count_on_openai_upstream_is_estimated_locally(gateway, genai_client):
    gw = await gateway()
    got = await genai_client(gw).models.count_tokens(model="mock-gpt", contents=TEXT)
    assert 175 <= got.total_tokens < 260
    assert got.sdk_http_response.headers["x-llm-proxy-estimated"] == "true"
    assert gw.mock_stats[mock_stats].total == 0 and await gw.records() == []


async def test_wrapped_gemini_count_reaches_anthropic_with_system_and_tools(gateway):
    gw = await gateway()
    body = {"generateContentRequest": {
        "model": "models/mock-claude", "systemInstruction": {"parts": [{"text": "be brief"}]},
        "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": {
            "type": "OBJECT", "properties": {"location": {"type": "STRING"}}}}]}],
        "generationConfig": {"maxOutputTokens": 20, "temperature": 0.2},
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1beta/models/mock-claude:countTokens", json=body, headers={"x-goog-api-key": gw.key}) as r:
            assert r.status == 200, await r.text()
            got = await r.json()
    sent = orjson.loads(_received(gw, "/v1/messages/count_tokens")[-1].body)
    assert sent["system"][0]["text"] == "be brief" and sent["tools"][0]["name"] == "get_weather"
    assert got == {"totalTokens": prompt_tokens_for(orjson.dumps(sent))}


async def test_bad_count_bodies_are_a_400_in_the_callers_dialect(gateway):
    gw = await gateway()
    async with _anthropic(gw) as client:
        for model in ("mock-gemini", "mock-gpt"):
            with pytest.raises(anthropic.BadRequestError) as err:
                await client.messages.count_tokens(model=model, messages=[])
            assert err.value.status_code == 400 and err.value.body["error"]["type"] == "invalid_request_error"
            assert "at least one message" in err.value.message
    async with aiohttp.ClientSession() as s:
        for model in ("mock-claude", "mock-gpt"):
            for body in ({"contents": "hi"}, {"contents": [{"role": "user", "parts": [{"text": "x"}]}], "generateContentRequest": {}}):
                async with s.post(f"{gw.url}/v1beta/models/{model}:countTokens", json=body, headers={"x-goog-api-key": gw.key}) as r:
                    err = await r.json()
                    assert r.status == 400 and err["error"]["status"] == "INVALID_ARGUMENT", err
            async with s.post(f"{gw.url}/v1beta/models/{model}:countTokens", data=b"{", headers={"x-goog-api-key": gw.key}) as r:
                assert r.status == 400 and (await r.json())["error"]["status"] == "INVALID_ARGUMENT"
    # Refused before any upstream was asked: no record of an attempt.
    assert gw.mock_stats[mock_stats].total == 0 and await gw.records() == []


async def test_upstream_count_error_reaches_the_caller_in_its_shape(gateway, genai_client):
    gw = await gateway()
    rate = Reply(status=429, headers={"Content-Type": "application/json"}, chunks=[
        b'{"error":{"code":429,"message":"Quota exceeded for metric: requests per minute","status":"RESOURCE_EXHAUSTED"}}'])
    bad = Reply(status=400, headers={"Content-Type": "application/json"}, chunks=[
        b'{"type":"error","error":{"type":"invalid_request_error","message":"messages.0: bad block"}}'])
    gw.upstream.script(rate, bad)
    async with _anthropic(gw) as client:
        with pytest.raises(anthropic.RateLimitError) as err:
            await client.messages.count_tokens(model="up-gemini", messages=[{"role": "user", "content": "x"}])
    assert "requests per minute" in err.value.message
    with pytest.raises(genai.errors.ClientError) as gerr:
        await genai_client(gw).models.count_tokens(model="up-claude", contents="x")
    assert gerr.value.code == 400 and "bad block" in gerr.value.message
    assert [r.path for r in gw.upstream.received] == ["/v1beta/models/gemini-2.5-flash:countTokens", "/v1/messages/count_tokens"]
    recs = await gw.wait_records(2)
    assert sorted((r.endpoint, r.status) for r in recs) == [("countTokens", 400), ("count_tokens", 429)]


async def test_count_the_upstream_counter_cannot_take_is_estimated(gateway):
    """An image URL cannot go to Gemini (the gateway fetches nothing): where a generate
    call would be refused, Claude Code's count still gets an answer, marked an estimate."""
    gw = await gateway()
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    async with _anthropic(gw) as client:
        raw = await client.messages.with_raw_response.count_tokens(
            model="mock-gemini", messages=[{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}])
    assert raw.headers["x-llm-proxy-estimated"] == "true" and (await raw.parse()).input_tokens >= 1600
    assert gw.mock_stats[mock_stats].total == 0 and await gw.records() == []


async def test_wrapped_gemini_count_names_the_upstreams_model(gateway):
    """`generateContentRequest.model` is required and names the model: the upstream's,
    not the name the client called (up-gemini is gemini-2.5-flash upstream)."""
    gw = await gateway()
    gw.upstream.script(Reply(headers={"Content-Type": "application/json"}, chunks=[b'{"totalTokens": 9, "cachedContentTokenCount": 2}']))
    body = {"generateContentRequest": {"model": "models/up-gemini", "safetySettings": [],
                                       "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1beta/models/up-gemini:countTokens", json=body, headers={"x-goog-api-key": gw.key}) as r:
            assert r.status == 200 and await r.json() == {"totalTokens": 9, "cachedContentTokenCount": 2}
    (got,) = gw.upstream.received
    assert got.path == "/v1beta/models/gemini-2.5-flash:countTokens"
    assert orjson.loads(got.body) == {"generateContentRequest": {**body["generateContentRequest"], "model": "models/gemini-2.5-flash"}}
    (rec,) = await gw.wait_records(1)
    assert (rec.endpoint, rec.status, rec.upstream_protocol, rec.cost_usd) == ("countTokens", 200, "gemini", 0)


async def test_a_count_is_free_under_a_tight_tpm(gateway):
    """Counting costs the provider nothing: a key whose tpm a message call would exceed
    may still count (no tokens reserved, a zero record)."""
    gw = await gateway()
    key = await gw.create_key("tpm50", tpm=50)
    messages = [{"role": "user", "content": TEXT}]
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(model="mock-claude", max_tokens=16, messages=messages)
        for _ in range(3):
            counted = await client.messages.count_tokens(model="mock-claude", messages=messages)
            assert counted.input_tokens > 50
    recs = await gw.wait_records(3)
    assert all(r.endpoint == "count_tokens" and r.prompt_tokens == 0 and r.completion_tokens == 0 for r in recs)
