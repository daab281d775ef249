"""Issue 23: the providers people run, each against a mock reproducing its quirks, called
through the gateway with the official OpenAI SDK.

- Azure OpenAI (`kind: azure`): deployment URLs, `api-version`, the key in `api-key`, its
  429 shape with `retry-after-ms`.
- vLLM (an older one): rejects `stream_options` (400, `{"object": "error", ...}`).
- Ollama: `api_key: ollama` (any key), ignores `stream_options`: no usage chunk.
- DeepSeek: base URL without /v1, `: keep-alive` comments while queued, cache-hit
  usage fields, 503 "Server overloaded".
- OpenRouter: `: OPENROUTER PROCESSING` comments, usage always sent, errors with `metadata`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from _gateway import PRICE, Gateway, Reply, ScriptedUpstream
from proxy.config import ModelConfig, RouteConfig, Timeouts, UpstreamConfig

AZURE_KEY = "azure-key-CANARY-0a1b2c3d4e5f6a7b"
VERSION = "2024-10-21"


def _chunk(content: str | None = None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                           "choices": [] if usage else [{"index": 0, "delta": {"content": content} if content else {},
                                                         "finish_reason": finish}]}
    if usage:
        doc["usage"] = usage
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def _completion(usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}


class Provider:
    """One quirky provider: what it got, and its quirks as handlers."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.got: list[web.Request] = []
        self.bodies: list[dict[str, Any]] = []
        self.fail_next: tuple[int, dict[str, str], bytes] | None = None
        self.runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read() or b"{}")
        self.got.append(request)
        self.bodies.append(body)
        if self.fail_next is not None:
            status, headers, data = self.fail_next
            self.fail_next = None
            return web.Response(status=status, headers=headers, body=data, content_type="application/json")
        return await getattr(self, self.kind)(request, body)

    # --------------------------------------------------------------- the providers

    async def azure(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if request.query.get("api-version") != VERSION:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        if request.headers.get("api-key") != AZURE_KEY or "Authorization" in request.headers:
            return web.json_response({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}, status=401)
        if request.path != "/openai/deployments/my-gpt4o/chat/completions":
            return web.json_response({"error": {"code": "DeploymentNotFound", "message": "nope"}}, status=404)
        usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        if not body.get("stream"):
            return web.json_response(_completion(usage))
        chunks = [_chunk("hi"), _chunk(finish="stop")]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(_chunk(usage=usage))
        return await _sse(request, chunks + [b"data: [DONE]\n\n"])

    async def vllm(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if "stream_options" in body:
            return web.json_response({"object": "error", "message": "stream_options: Extra inputs are not permitted",
                                      "type": "BadRequestError", "param": None, "code": 400}, status=400)
        if body.get("temperature", 0) > 2:
            return web.json_response({"object": "error", "message": "temperature must be <= 2",
                                      "type": "BadRequestError", "param": None, "code": 400}, status=400)
        return await _sse(request, [_chunk("a"), _chunk("b"), _chunk(finish="stop"), b"data: [DONE]\n\n"])

    async def ollama(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if body.get("model") != "llama3.2":
            return web.json_response({"error": {"message": f'model "{body.get("model")}" not found, try pulling it first',
                                                "type": "api_error", "param": None, "code": None}}, status=404)
        return await _sse(request, [_chunk("a"), _chunk(finish="stop"), b"data: [DONE]\n\n"])

    async def deepseek(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "prompt_cache_hit_tokens": 8,
                 "prompt_cache_miss_tokens": 2, "prompt_tokens_details": {"cached_tokens": 8}}
        return await _sse(request, [b": keep-alive\n\n", b": keep-alive\n\n", _chunk("a"), _chunk("b", "stop"),
                                    _chunk(usage=usage), b"data: [DONE]\n\n"])

    async def openrouter(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        usage = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8, "cost": 0.0001}
        return await _sse(request, [b": OPENROUTER PROCESSING\n\n", _chunk("a", "stop"), _chunk(usage=usage),
                                    b"data: [DONE]\n\n"])


async def _sse(request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for c in chunks:
        await resp.write(c)
    await resp.write_eof()
    return resp


@pytest.fixture
async def provider() -> AsyncIterator[Any]:
    made: list[Provider] = []

    async def make(kind: str) -> Provider:
        p = Provider(kind)
        await p.start()
        made.append(p)
        return p

    yield make
    for p in made:
        assert p.runner is not None
        await p.runner.cleanup()


async def _gw(gateway: Any, upstream: UpstreamConfig, model: str, *more: RouteConfig) -> Gateway:
    gw: Gateway = await gateway(
        upstreams=(upstream, UpstreamConfig("backup", "http://127.0.0.1:1/v1", "openai", "k")),
        models=(ModelConfig("m", (RouteConfig(upstream.name, model), *more), (), PRICE),),
    )
    gw.audit = False   # the scripted upstream is not used here
    return gw


def _client(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)


MSG = [{"role": "user", "content": "hi"}]


def _backup(up: ScriptedUpstream) -> UpstreamConfig:
    """The second route: the scripted upstream, answering as model "backup-model"."""
    doc = {**_completion({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}), "model": "backup-model"}
    up.default = Reply(headers={"Content-Type": "application/json"}, chunks=[orjson.dumps(doc)])
    return UpstreamConfig("backup", up.base + "/v1", "openai", "sk-backup", T)
T = Timeouts(connect_s=1, first_byte_s=5, idle_s=5)


async def test_azure_openai_deployments(gateway, provider, scripted_upstream):
    az = await provider("azure")
    up = UpstreamConfig("azure", az.base, "openai", AZURE_KEY, T, kind="azure", api_version=VERSION)
    gw: Gateway = await gateway(
        upstreams=(up, _backup(scripted_upstream)),
        models=(ModelConfig("m", (RouteConfig("azure", "my-gpt4o"), RouteConfig("backup", "b", priority=1)), (), PRICE),),
    )
    gw.audit = False
    async with _client(gw) as client:
        done = await client.chat.completions.create(model="m", messages=MSG)
        assert done.choices[0].message.content == "hi" and done.usage.total_tokens == 6
        stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
        got = [c async for c in stream]
        assert [c.choices[0].delta.content for c in got if c.choices] == ["hi", None] and not any(c.usage for c in got)
        # Azure's 429 (its own shape, retry-after-ms): the next route serves.
        az.fail_next = (429, {"retry-after-ms": "7000", "retry-after": "7"},
                        b'{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded the rate limit. Please retry after 7 seconds."}}')
        done = await client.chat.completions.create(model="m", messages=MSG)
        assert done.model == "backup-model"
    assert [r.query["api-version"] for r in az.got] == [VERSION] * 3
    assert az.bodies[1]["stream_options"] == {"include_usage": True}
    recs = sorted(await gw.wait_records(4), key=lambda r: r.ts)
    assert recs[1].completion_tokens == 1 and not recs[1].estimated   # Azure's usage chunk, not shown to the client
    view = gw.state.health.view(("azure", "my-gpt4o"))
    assert view.state == "cooldown" and view.cooldown_until is not None


async def test_vllm_without_stream_options_and_its_error_shape(gateway, provider):
    vllm = await provider("vllm")
    gw = await _gw(gateway, UpstreamConfig("vllm", vllm.base + "/v1", "openai", "EMPTY", T), "Qwen/Qwen2.5-7B")
    async with _client(gw) as client:
        stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "ab"
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="m", messages=MSG, temperature=3)
        assert err.value.body["message"] == "temperature must be <= 2"   # its own shape, passed through
        stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
        assert len([c async for c in stream]) == 3
    # Refused once, then asked without it (remembered): 4 requests for 3 calls.
    assert ["stream_options" in b for b in vllm.bodies] == [True, False, False, False]
    # One record per upstream request (issue 25 item 10): the refused attempt has its own.
    recs = await gw.wait_records(4)
    assert len(recs) == 4
    refused = [r for r in recs if r.status == 400 and r.stream]
    assert len(refused) == 1 and refused[0].prompt_tokens == refused[0].completion_tokens == 0
    streams = [r for r in recs if r.stream and r.status == 200]
    assert len(streams) == 2 and all(r.estimated and r.completion_tokens > 0 for r in streams)


async def test_ollama_with_stream_usage_off(gateway, provider):
    ol = await provider("ollama")
    gw = await _gw(gateway, UpstreamConfig("ollama", ol.base + "/v1", "openai", "ollama", T, stream_usage=False), "llama3.2")
    async with _client(gw) as client:
        stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
        assert len([c async for c in stream]) == 2
    assert "stream_options" not in ol.bodies[0] and ol.got[0].headers["Authorization"] == "Bearer ollama"
    rec = (await gw.wait_records(1))[0]
    assert rec.estimated and rec.completion_tokens > 0


async def test_ollama_model_not_pulled_passes_through(gateway, provider):
    ol = await provider("ollama")
    gw = await _gw(gateway, UpstreamConfig("ollama", ol.base + "/v1", "openai", "ollama", T), "mistral")
    async with _client(gw) as client:
        with pytest.raises(openai.NotFoundError) as err:
            await client.chat.completions.create(model="m", messages=MSG)
    assert "try pulling it first" in err.value.message
    assert len(ol.got) == 1   # a 404 is the provider's answer, not a route failure


async def test_deepseek_keepalives_cache_hits_and_overload(gateway, provider, scripted_upstream):
    ds = await provider("deepseek")
    up = UpstreamConfig("deepseek", ds.base, "openai", "sk-ds", T)
    gw: Gateway = await gateway(
        upstreams=(up, _backup(scripted_upstream)),
        models=(ModelConfig("m", (RouteConfig("deepseek", "deepseek-chat"), RouteConfig("backup", "b", priority=1)), (), PRICE),),
    )
    gw.audit = False
    async with _client(gw) as client:
        stream = await client.chat.completions.create(model="m", messages=MSG, stream=True, stream_options={"include_usage": True})
        got = [c async for c in stream]
        assert got[-1].usage.prompt_tokens_details.cached_tokens == 8
        ds.fail_next = (503, {}, b'{"error":{"message":"Server overloaded, please retry shortly.","type":"service_unavailable_error"}}')
        done = await client.chat.completions.create(model="m", messages=MSG)
        assert done.model == "backup-model"
    assert ds.got[0].path == "/chat/completions"
    recs = sorted(await gw.wait_records(3), key=lambda r: r.ts)
    assert (recs[0].prompt_tokens, recs[0].cached_tokens, recs[0].completion_tokens) == (10, 8, 2)
    assert (recs[1].upstream, recs[1].status, recs[1].error) == ("deepseek", 503, "upstream_503")


async def test_openrouter_comments_pass_through_byte_for_byte(gateway, provider):
    orr = await provider("openrouter")
    gw = await _gw(gateway, UpstreamConfig("openrouter", orr.base + "/api/v1", "openai", "sk-or", T), "openai/gpt-4o-mini")
    body = {"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            raw = await r.read()
    assert raw.startswith(b": OPENROUTER PROCESSING\n\n") and raw.endswith(b"data: [DONE]\n\n")
    assert orr.got[0].path == "/api/v1/chat/completions"
    rec = (await gw.wait_records(1))[0]
    assert (rec.prompt_tokens, rec.completion_tokens, rec.estimated) == (7, 1, False)
    orr.fail_next = (429, {"Retry-After": "3"}, b'{"error":{"code":429,"message":"Rate limit exceeded: free-models-per-min","metadata":{"headers":{"X-RateLimit-Limit":"20"}}}}')
    async with _client(gw) as client:
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="m", messages=MSG)
    assert "free-models-per-min" in err.value.message and err.value.response.headers["retry-after"] == "3"


@pytest.mark.fast
@pytest.mark.parametrize(
    "extra,message",
    [("kind: azure", "kind azure needs protocol openai and an api_version"),
     ("kind: bedrock", "kind must be one of azure"),
     ("{kind: azure, api_version: '2024-10-21', protocol: anthropic}", "needs protocol openai")],
)
def test_kinds_are_checked(extra, message):
    from proxy.config import ConfigError, parse_config

    if extra.startswith("{"):
        item = "  - " + extra[:-1] + ", name: a, base_url: 'https://x.openai.azure.com'}"
    else:
        item = f"  - {{name: a, base_url: 'https://x.openai.azure.com', {extra}}}"
    with pytest.raises(ConfigError, match=message):
        parse_config("upstreams:\n" + item + "\n")
