"""CLIENTS.md drop-in checklist: the items other test files do not already cover.

Each test names the checklist items it checks ("item N"). Items covered elsewhere are
mapped to their tests in the report to the lead; this file
does not repeat them. Vectors are replayed by the scripted upstream and consumed by the
official SDKs (openai, anthropic, google-genai) through the gateway (item 58).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from google import genai
from google.genai import errors as gerrors
from google.genai import types as gtypes

from _gateway import Reply
from fixtures.vectors.load_vector import iter_sse, load
from proxy.config import ServerConfig, Timeouts
from proxy.errors import ProxyError

VECTORS = Path(__file__).parent / "fixtures" / "vectors"
OPENAI_CHAT_STREAMS = sorted(p.name for p in (VECTORS / "openai").glob("chat_stream_*.sse"))
OPENAI_CHAT_JSON = sorted(
    p.name for p in (VECTORS / "openai").glob("*.json") if p.name.startswith(("chat_completion_", "docs_chat_completion"))
)
ANTHROPIC_STREAMS = sorted(p.name for p in (VECTORS / "anthropic").glob("*.sse"))
GEMINI_STREAMS = sorted(p.name for p in (VECTORS / "gemini").glob("*.sse"))
GEMINI_ERRORS = sorted(p.name for p in (VECTORS / "gemini").glob("error_*.json"))

USER = {"role": "user", "content": "x"}
SSE_HEADERS = {"Content-Type": "text/event-stream"}
CODEX_RE = re.compile(r"(?i)try again in\s*(\d+(?:\.\d+)?)\s*(s|ms|seconds?)")
GEMINI_CLI_RE = re.compile(r"Please retry in ([0-9.]+(?:ms|s))")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


# ---------------------------------------------------------------------- helpers


def oai(gw: Any, key: str | None = None, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key or gw.key, **{"max_retries": 0, **kw})


def ant(gw: Any, key: str | None = None, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key or gw.key, **{"max_retries": 0, **kw})


def gem(gw: Any, key: str | None = None, version: str = "v1beta") -> genai.Client:
    return genai.Client(api_key=key or gw.key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version=version))


def terminated(payload: bytes) -> bytes:
    """What a real server sends: the last event ends with a blank line (vectors README)."""
    if payload.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")):
        return payload
    if payload.endswith(b"\r\n"):
        return payload + b"\r\n"
    return payload + (b"\n" if payload.endswith(b"\n") else b"\n\n")


def sse_reply(payload: bytes, size: int = 97) -> Reply:
    return Reply(headers=dict(SSE_HEADERS), chunks=[payload[i : i + size] for i in range(0, len(payload), size)])


def json_reply(rel: str) -> Reply:
    meta, payload = load(rel)
    headers = {"Content-Type": "application/json"}
    for line in meta.get("http-header", []):
        name, _, value = line.partition(": ")
        if name.lower() in ("x-should-retry", "retry-after"):
            headers[name] = value
    return Reply(status=int(meta.get("http-status", ["200"])[0]), headers=headers, chunks=[payload])


def events_of(payload: bytes) -> list[tuple[str | None, Any]]:
    return [(e, orjson.loads(d)) for e, d in iter_sse(payload) if d and d != "[DONE]"]


async def raw(gw: Any, method: str, path: str, **kw: Any) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path, allow_redirects=False, **kw) as r:
            return r.status, r.headers.copy(), await r.read()


def count_admissions(gw: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Statuses of every request that reached admission (429s never reach an upstream)."""
    seen: list[int] = []
    admission = gw.state.admission
    real, real_now = admission.admit, admission.admit_now

    async def counting(*args: Any, **kw: Any) -> Any:
        try:
            out = await real(*args, **kw)
        except ProxyError as exc:
            seen.append(exc.status)
            raise
        seen.append(200)
        return out

    def counting_now(*args: Any, **kw: Any) -> Any:
        try:
            out = real_now(*args, **kw)
        except ProxyError as exc:
            seen.append(exc.status)
            raise
        if out is not None:   # None: admission goes on in admit()
            seen.append(200)
        return out

    monkeypatch.setattr(admission, "admit", counting)
    monkeypatch.setattr(admission, "admit_now", counting_now)
    return seen


def no_sleep(client: Any, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the SDK's computed retry delays and skip the actual waiting."""
    delays: list[float] = []
    real = client._calculate_retry_timeout

    def calc(*args: Any, **kw: Any) -> float:
        delays.append(real(*args, **kw))
        return 0.0

    monkeypatch.setattr(client, "_calculate_retry_timeout", calc)
    return delays


# ---------------------------------------------------------------------- A. routing (items 1, 4, 5, 8)


async def test_count_tokens_beta_query_and_vector(gateway):
    """Items 1, 36: count_tokens?beta=true routes like the plain path; the SDK reads the vector."""
    gw = await gateway()
    gw.upstream.script(json_reply("anthropic/docs_count_tokens_response.json"), json_reply("anthropic/docs_count_tokens_response.json"))
    # Claude Code's form (anthropic-python 2.14's beta namespace no longer adds the query).
    status, _, data = await raw(gw, "POST", "/v1/messages/count_tokens?beta=true", json={"model": "up-claude", "messages": [USER]},
                                headers={"x-api-key": gw.key, "anthropic-beta": "token-counting-2024-11-01"})
    assert status == 200 and orjson.loads(data) == {"input_tokens": 14}
    async with ant(gw) as client:
        plain = await client.messages.count_tokens(model="up-claude", messages=[USER])
    assert plain.input_tokens == 14
    got = gw.upstream.received
    assert [(r.path, r.query) for r in got] == [("/v1/messages/count_tokens", "beta=true"), ("/v1/messages/count_tokens", "")]


async def test_slashes_aliases_and_probes_never_redirect_or_hang(gateway):
    """Items 4, 5, 8: duplicate/trailing slashes → 200 or JSON 404 (never 3xx); un-versioned aliases; probes."""
    gw = await gateway()
    chat = {"model": "mock-gpt", "messages": [USER]}
    for method, path, kw in (
        ("POST", "//v1//chat/completions", {"json": chat}),
        ("GET", "/v1/models/", {}),
        ("POST", "/v1/chat/completions/", {"json": chat}),
    ):
        status, headers, body = await raw(gw, method, path, headers=gw.headers(), **kw)
        assert status in (200, 404), (path, status)
        if status == 404:
            assert headers["Content-Type"].startswith("application/json") and orjson.loads(body)["error"]
    status, _, body = await raw(gw, "POST", "/chat/completions", json=chat, headers=gw.headers())
    assert status == 200 and orjson.loads(body)["choices"]
    msg = {"model": "mock-claude", "max_tokens": 8, "messages": [USER]}
    status, _, body = await raw(gw, "POST", "/messages", json=msg, headers={"x-api-key": gw.key})
    assert status == 200 and orjson.loads(body)["type"] == "message"
    t0 = time.monotonic()
    for method, path in (("HEAD", "/"), ("GET", "/"), ("POST", "/api/event_logging/batch"), ("POST", "/v1/oauth/token")):
        status, _, _ = await raw(gw, method, path, json={} if method == "POST" else None)
        assert status in (200, 204, 401, 404), (method, path, status)
    assert time.monotonic() - t0 < 2


# ---------------------------------------------------------------------- B. auth (items 11, 13)


async def test_anthropic_version_and_beta_forwarded_unchanged(gateway):
    """Item 11 (complements test_anthropic_headers_and_beta_query_forwarded: 2026-10-21)."""
    gw = await gateway()
    gw.upstream.script(json_reply("anthropic/messages_response_text.json"), json_reply("anthropic/messages_response_text.json"))
    body = {"model": "up-claude", "max_tokens": 8, "messages": [USER]}
    for version, beta in (("2023-06-01", "x-2025-01-01, y-2026-02-02"), ("1999-01-01-anything", "z")):
        headers = {"x-api-key": gw.key, "anthropic-version": version, "anthropic-beta": beta}
        status, _, _ = await raw(gw, "POST", "/v1/messages", json=body, headers=headers)
        assert status == 200
        got = {k.lower(): v for k, v in gw.upstream.received[-1].headers.items()}
        assert (got["anthropic-version"], got["anthropic-beta"]) == (version, beta)


async def test_missing_or_invalid_key_raises_each_sdks_auth_error(gateway):
    """Item 13 through the SDKs (the anthropic one is in test_anthropic_errors_in_anthropic_shape)."""
    gw = await gateway()
    async with oai(gw, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as oe:
            await client.chat.completions.create(model="mock-gpt", messages=[USER])
    assert oe.value.status_code == 401 and oe.value.code == "invalid_api_key" and oe.value.type == "authentication_error"
    assert oe.value.request_id and oe.value.body["param"] is None  # all four OpenAI error keys
    client = gem(gw, key="sk-wrong")
    try:
        with pytest.raises(gerrors.ClientError) as ge:
            await client.aio.models.generate_content(model="mock-gemini", contents="x")
        with pytest.raises(gerrors.ClientError) as gs:
            async for _ in await client.aio.models.generate_content_stream(model="mock-gemini", contents="x"):
                pass
    finally:
        await client.aio.aclose()
    for err in (ge.value, gs.value):
        assert err.code in (400, 401) and err.status in ("INVALID_ARGUMENT", "UNAUTHENTICATED") and err.message
        assert set(err.details["error"]) >= {"code", "message", "status", "details"}


# ---------------------------------------------------------------------- C. OpenAI stream (items 15-23, 57)


STREAM_PATHS = {
    "openai": ("/v1/chat/completions", {"model": "mock-gpt", "stream": True, "messages": [USER]}, "Authorization"),
    "anthropic": ("/v1/messages", {"model": "mock-claude", "stream": True, "max_tokens": 16, "messages": [USER]}, "x-api-key"),
    "gemini": ("/v1beta/models/mock-gemini:streamGenerateContent?alt=sse", {"contents": [{"parts": [{"text": "x"}]}]}, "x-goog-api-key"),
}


@pytest.mark.parametrize("dialect", STREAM_PATHS)
async def test_stream_headers_despite_accept_json_and_gzip(gateway, dialect):
    """Items 15, 16: SSE headers, no Content-Length/-Encoding, X-Accel-Buffering; Accept: application/json still streams."""
    gw = await gateway()
    path, body, auth = STREAM_PATHS[dialect]
    headers = {auth: (f"Bearer {gw.key}" if auth == "Authorization" else gw.key),
               "Accept": "application/json", "Accept-Encoding": "gzip, deflate, br"}
    status, h, data = await raw(gw, "POST", path, json=body, headers=headers)
    assert status == 200
    assert h["Content-Type"].startswith("text/event-stream")
    assert h["Cache-Control"] == "no-cache" and h["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in h and "Content-Encoding" not in h
    assert data.startswith((b"data: ", b"event: ")) and data.endswith((b"\n\n", b"\r\n\r\n"))  # item 57


async def test_no_stream_field_means_one_json_document(gateway):
    """Item 17: `stream` absent, false or null → application/json, never SSE (both body dialects)."""
    gw = await gateway()
    for variant in ({}, {"stream": False}, {"stream": None}):
        for path, body, headers in (
            ("/v1/chat/completions", {"model": "mock-gpt", "messages": [USER], **variant}, gw.headers()),
            ("/v1/messages", {"model": "mock-claude", "max_tokens": 8, "messages": [USER], **variant}, {"x-api-key": gw.key}),
        ):
            status, h, data = await raw(gw, "POST", path, json=body, headers={**headers, "Accept": "text/event-stream"})
            assert status == 200 and h["Content-Type"].startswith("application/json"), (path, variant)
            assert isinstance(orjson.loads(data), dict)


async def test_openai_stream_framing_ends_with_done_and_closes(gateway):
    """Items 18, 57: `data: <one-line JSON>\\n\\n` only, no event:/empty data, `data: [DONE]\\n\\n`, then EOF."""
    gw = await gateway()
    for extra in ({}, {"stream_options": {"include_usage": True}}):
        body = {"model": "mock-gpt", "stream": True, "messages": [USER], **extra}
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers()) as r:
                data = await asyncio.wait_for(r.read(), 3)  # returns only once the response has ended
        assert data.endswith(b"data: [DONE]\n\n") and data.count(b"[DONE]") == 1
        events = data.split(b"\n\n")
        assert events[-1] == b""
        for ev in events[:-2]:
            assert ev.startswith(b"data: {") and b"\n" not in ev and b"event:" not in ev
            orjson.loads(ev[6:])


@pytest.mark.parametrize("name", OPENAI_CHAT_STREAMS)
async def test_openai_stream_vector_through_sdk(gateway, name):
    """Items 19-23, 58: each chat stream vector relayed to ChatCompletionStream.get_final_completion()."""
    gw = await gateway()
    _, payload = load(f"openai/{name}")
    expected = [d for _, d in events_of(payload)]
    gw.upstream.script(sse_reply(payload))
    async with oai(gw) as client:
        async with client.chat.completions.stream(
            model="up-gpt", messages=[USER], stream_options={"include_usage": True}
        ) as stream:
            chunks = [e.chunk async for e in stream if e.type == "chunk"]
            if name == "chat_stream_finish_length.sse":
                # The helper refuses to "parse" a truncated answer; the completion rides on the error.
                with pytest.raises(openai.LengthFinishReasonError) as err:
                    await stream.get_final_completion()
                final = err.value.completion
            else:
                final = await stream.get_final_completion()
    assert [c.to_dict() for c in chunks] == expected  # nothing lost, added or altered
    # Item 19: role first; one id/object/created/model throughout.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({(c.id, c.object, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].object == "chat.completion.chunk"
    # Item 21: exactly one usage chunk, last, with choices == [].
    assert [i for i, c in enumerate(chunks) if not c.choices] == [len(chunks) - 1]
    usage = expected[-1]["usage"]
    assert chunks[-1].usage.total_tokens == usage["total_tokens"] == final.usage.total_tokens
    # Item 23: the finish chunk has an empty delta and a known reason.
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].delta.to_dict() == {}
    reason = finish[0].choices[0].finish_reason
    assert reason in ("stop", "length", "tool_calls", "content_filter") and final.choices[0].finish_reason == reason
    if name == "chat_stream_finish_length.sse":
        assert reason == "length"
    # Item 20: tool-call deltas in OpenAI's exact shape; arguments reassembled by the SDK.
    calls: dict[int, list[dict[str, Any]]] = {}
    for d in expected:
        for choice in d["choices"]:
            for tc in choice["delta"].get("tool_calls") or []:
                calls.setdefault(tc["index"], []).append(tc)
    assert list(calls) == sorted(calls)
    got = final.choices[0].message.tool_calls or []
    assert len(got) == len(calls)
    for i, deltas in calls.items():
        first, rest = deltas[0], deltas[1:]
        assert isinstance(first["id"], str) and first["type"] == "function" and isinstance(first["function"]["name"], str)
        assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
        args = "".join(d["function"]["arguments"] for d in deltas)
        assert got[i].id == first["id"] and got[i].function.name == first["function"]["name"]
        assert got[i].function.arguments == args and isinstance(orjson.loads(args), dict)
    if calls:
        assert reason == "tool_calls"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (final.choices[0].message.content or "") == text
    refusal = "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)
    assert (final.choices[0].message.refusal or "") == refusal


@pytest.mark.parametrize("name", OPENAI_CHAT_JSON)
async def test_openai_non_stream_vector_through_sdk(gateway, name):
    """Items 17, 58: non-stream chat vectors arrive intact; `_request_id` is the gateway's (item 49)."""
    gw = await gateway()
    _, payload = load(f"openai/{name}")
    gw.upstream.script(json_reply(f"openai/{name}"))
    async with oai(gw) as client:
        resp = await client.chat.completions.with_raw_response.create(model="up-gpt", messages=[USER])
        r = resp.parse()
    assert r.to_dict() == orjson.loads(payload)
    assert r._request_id == resp.headers["x-request-id"] and r._request_id.startswith("req_")
    for call in r.choices[0].message.tool_calls or []:
        assert isinstance(orjson.loads(call.function.arguments), dict)


async def test_openai_responses_and_quota_vectors_through_sdk(gateway):
    """Items 7, 58: Responses stream/JSON vectors; the upstream's insufficient_quota 429 (items 46, 47)."""
    gw = await gateway()
    _, stream_payload = load("openai/docs_responses_stream_text.sse")
    _, body = load("openai/responses_create_text.json")
    gw.upstream.script(sse_reply(terminated(stream_payload)), json_reply("openai/responses_create_text.json"),
                       json_reply("openai/error_429_insufficient_quota.json"))
    async with oai(gw) as client:
        events = [e async for e in await client.responses.create(model="up-gpt", input="x", stream=True)]
        r = await client.responses.create(model="up-gpt", input="x")
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="up-gpt", messages=[USER])
    assert [e.type for e in events] == [d["type"] for _, d in events_of(stream_payload)]
    done = events[-1]
    assert done.type == "response.completed" and done.response.id
    assert done.response.usage.total_tokens == done.response.usage.input_tokens + done.response.usage.output_tokens
    assert sum(e.type == "response.output_item.done" for e in events) == len(done.response.output)
    assert r.output_text == orjson.loads(body)["output"][0]["content"][0]["text"] and r.usage.total_tokens
    assert err.value.type == "insufficient_quota" and err.value.status_code == 429


async def test_utf8_split_at_every_byte_arrives_identical(gateway):
    """Item 56: CJK/emoji streamed one byte per TCP write arrive byte-identical and decode in the SDK."""
    gw = await gateway()
    texts = ["你好，世界", "🙂👩‍💻", "Ωμέγα ✓", "中文🚀"]
    base = {"id": "chatcmpl-u", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-08-06"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in texts]
    chunks += [{**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    payload = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    gw.upstream.script(sse_reply(payload, size=1), sse_reply(payload, size=1))
    body = {"model": "up-gpt", "stream": True, "messages": [USER], "stream_options": {"include_usage": True}}
    status, _, data = await raw(gw, "POST", "/v1/chat/completions", json=body, headers=gw.headers())
    assert status == 200 and data == payload
    async with oai(gw) as client:
        got = [c async for c in await client.chat.completions.create(model="up-gpt", messages=[USER], stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in got) == "".join(texts)


@pytest.mark.parametrize(
    "rel,path,body",
    [
        ("anthropic/messages_stream_basic_text.sse", "/v1/messages", {"model": "up-claude", "stream": True, "max_tokens": 8, "messages": [USER]}),
        ("openai/docs_responses_stream_text.sse", "/v1/responses", {"model": "up-gpt", "stream": True, "input": "x"}),
        ("gemini/stream_prompt_blocked.sse", "/v1beta/models/up-gemini:streamGenerateContent?alt=sse", {"contents": []}),
    ],
)
async def test_last_sse_event_relayed_as_received(gateway, rel, path, body):
    """Item 57 binds the events the gateway writes (errors, shutdown notices: see
    test_http_robustness.py). An upstream's own last event is relayed as received, even
    without its blank line (issue 25 item 11, which overrides the earlier rule of
    completing it): adding the blank line made clients dispatch an event the upstream
    never completed; a client that drops an unterminated last event loses what the
    provider itself failed to finish."""
    gw = await gateway()
    _, payload = load(rel)
    assert not payload.endswith((b"\n\n", b"\r\n\r\n"))
    gw.upstream.script(sse_reply(payload))
    status, _, data = await raw(gw, "POST", path, json=body, headers={**gw.headers(), "x-goog-api-key": gw.key})
    assert status == 200 and data == payload


# ---------------------------------------------------------------------- D. Anthropic (items 26-31, 36, 37)


def _with_usage(payload: bytes) -> bytes:
    """The docs thinking example plus the usage a real server always sends."""
    out = b""
    for event, data in events_of(payload):
        if event == "message_start":
            data["message"]["usage"] = {"input_tokens": 12, "output_tokens": 1}
        if event == "message_delta":
            data["usage"] = {"output_tokens": 40}
        out += b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    return out


@pytest.mark.parametrize("name", ANTHROPIC_STREAMS + ["docs_messages_stream_thinking.sse+usage"])
async def test_anthropic_stream_vector_through_sdk(gateway, name):
    """Items 26-31, 58: `messages.stream().get_final_message()` on every vector, relayed by the gateway."""
    gw = await gateway()
    _, payload = load("anthropic/" + name.removesuffix("+usage"))
    if name.endswith("+usage"):
        payload = _with_usage(payload)
    gw.upstream.script(sse_reply(terminated(payload), size=61))
    events = events_of(payload)
    async with ant(gw) as client:
        stream = client.messages.stream(model="up-claude", max_tokens=64, messages=[USER])
        if name == "docs_messages_stream_error_event.sse":
            # Item 31: the SDK raises, typed from error.type (a 200 stream: APIStatusError).
            with pytest.raises(anthropic.APIStatusError) as err:
                async with stream as s:
                    await s.get_final_message()
            assert err.value.body["error"]["type"] == "overloaded_error"
            return
        if name == "docs_messages_stream_thinking.sse":
            # Known negative vector (README): no usage anywhere; the SDK itself crashes on it.
            with pytest.raises((AttributeError, TypeError)):
                async with stream as s:
                    await s.get_final_message()
            return
        async with stream as s:
            final = await s.get_final_message()
    start = next(d for e, d in events if e == "message_start")["message"]
    delta = [d for e, d in events if e == "message_delta"][-1]
    blocks = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert final.id == start["id"] and final.model == start["model"] and final.role == "assistant"
    assert final.stop_reason == delta["delta"]["stop_reason"]
    assert final.usage.output_tokens == delta["usage"]["output_tokens"]  # item 28
    assert [b.type for b in final.content] == [b["type"] for b in blocks]
    for i, block in enumerate(final.content):
        parts = [d["delta"] for e, d in events if e == "content_block_delta" and d["index"] == i]
        if block.type == "tool_use":  # item 29
            assert block.id.startswith("toolu_") and block.name == blocks[i]["name"]
            assert block.input == orjson.loads("".join(p["partial_json"] for p in parts) or "{}")
            assert final.stop_reason == "tool_use"
        elif block.type == "text":
            assert block.text == "".join(p["text"] for p in parts)
        elif block.type == "thinking":  # item 30
            assert block.thinking == "".join(p.get("thinking", "") for p in parts)
            assert parts[-1]["type"] == "signature_delta" and block.signature == parts[-1]["signature"]


async def test_anthropic_raw_stream_names_order_usage(gateway):
    """Items 26-28 on the gateway's own output (mock-claude, text and tool_use)."""
    gw = await gateway()
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    for extra in ({}, {"tools": tools, "messages": [{"role": "user", "content": "weather in Paris?"}]}):
        body = {"model": "mock-claude", "stream": True, "max_tokens": 32, "messages": [USER], **extra}
        status, _, data = await raw(gw, "POST", "/v1/messages", json=body, headers={"x-api-key": gw.key})
        assert status == 200 and data.endswith(b"\n\n")
        events = [(e, d) for e, d in events_of(data) if e != "ping"]
        assert all(e == d["type"] for e, d in events)  # item 26
        names = [e for e, _ in events]
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
        opened = [d["index"] for e, d in events if e == "content_block_start"]
        assert opened == list(range(len(opened)))
        msg = events[0][1]["message"]
        assert msg["id"].startswith("msg_") and msg["type"] == "message" and msg["role"] == "assistant"
        assert msg["content"] == [] and msg["stop_reason"] is None and msg["stop_sequence"] is None
        assert {"input_tokens", "output_tokens"} <= set(msg["usage"])
        delta = events[-2][1]
        assert "stop_sequence" in delta["delta"] and isinstance(delta["usage"]["output_tokens"], int)


async def test_anthropic_json_vectors_through_sdk(gateway):
    """Items 37, 46, 58: non-stream Message vector; upstream 404/429 error vectors keep status and type."""
    gw = await gateway()
    _, message = load("anthropic/messages_response_text.json")
    gw.upstream.script(
        json_reply("anthropic/messages_response_text.json"),
        json_reply("anthropic/messages_response_text.json"),
        json_reply("anthropic/docs_error_shape_not_found.json"),
        json_reply("anthropic/messages_error_429_rate_limit.json"),
    )
    body = {"model": "up-claude", "max_tokens": 8, "messages": [USER]}
    status, _, data = await raw(gw, "POST", "/v1/messages", json=body, headers={"x-api-key": gw.key})
    assert status == 200
    doc = orjson.loads(data)
    assert set(doc) >= {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    assert doc == orjson.loads(message)
    async with ant(gw) as client:
        msg = await client.messages.create(**body)
        assert msg.type == "message" and msg.content[0].type == "text" and msg.stop_reason == "end_turn"
        assert msg._request_id and msg._request_id.startswith("req_")  # item 49
        with pytest.raises(anthropic.NotFoundError) as nf:
            await client.messages.create(**body)
        assert nf.value.body["error"]["type"] == "not_found_error"
        with pytest.raises(anthropic.RateLimitError) as rl:
            await client.messages.create(**body)
    assert rl.value.body["error"]["type"] == "rate_limit_error"
    assert rl.value.response.headers["x-should-retry"] == "true"  # passed through (item 47)


# ---------------------------------------------------------------------- E. Gemini (items 38-42)


@pytest.mark.parametrize("name", GEMINI_STREAMS)
async def test_gemini_stream_vector_through_genai(gateway, name):
    """Items 38-40, 58: every Gemini stream vector through google-genai's generate_content_stream."""
    gw = await gateway()
    _, payload = load(f"gemini/{name}")
    docs = [d for _, d in events_of(payload)]
    gw.upstream.script(sse_reply(terminated(payload), size=41))
    client = gem(gw)
    try:
        chunks = [c async for c in await client.aio.models.generate_content_stream(model="up-gemini", contents="x")]
    finally:
        await client.aio.aclose()
    assert len(chunks) == len(docs)
    last, last_doc = chunks[-1], docs[-1]
    if "promptFeedback" in last_doc:
        assert last.prompt_feedback.block_reason == gtypes.BlockedReason.SAFETY and not last.candidates
        return
    assert last.candidates[0].finish_reason == gtypes.FinishReason.STOP  # item 39
    assert last.usage_metadata.total_token_count == last_doc["usageMetadata"]["totalTokenCount"]
    assert all(c.usage_metadata.prompt_token_count and c.usage_metadata.total_token_count for c in chunks)
    assert last.usage_metadata.candidates_token_count == last_doc["usageMetadata"]["candidatesTokenCount"]
    raw_part = last_doc["candidates"][0]["content"]["parts"][-1]
    if "functionCall" in raw_part:  # item 40: whole call in one part, signature preserved
        part = last.candidates[0].content.parts[-1]
        assert part.function_call.name == raw_part["functionCall"]["name"]
        assert part.function_call.args == raw_part["functionCall"]["args"]
        assert part.thought_signature == base64.b64decode(raw_part["thoughtSignature"])
    else:
        text = "".join(p["text"] for d in docs for p in d["candidates"][0]["content"]["parts"])
        assert "".join(c.text or "" for c in chunks) == text


async def test_gemini_json_vectors_through_genai(gateway):
    """Items 41, 46, 58: generateContent vectors and the upstream error vectors through google-genai."""
    gw = await gateway()
    _, text_doc = load("gemini/generate_content_text.json")
    _, call_doc = load("gemini/generate_content_function_call_thinking.json")
    gw.upstream.script(json_reply("gemini/generate_content_text.json"),
                       json_reply("gemini/generate_content_function_call_thinking.json"),
                       *(json_reply(f"gemini/{n}") for n in GEMINI_ERRORS))
    client = gem(gw)
    try:
        r = await client.aio.models.generate_content(model="up-gemini", contents="x")
        expected = orjson.loads(text_doc)
        assert r.text == expected["candidates"][0]["content"]["parts"][0]["text"]
        assert r.candidates[0].finish_reason == gtypes.FinishReason.STOP
        assert r.usage_metadata.total_token_count == expected["usageMetadata"]["totalTokenCount"]
        r = await client.aio.models.generate_content(model="up-gemini", contents="x")
        raw_call = orjson.loads(call_doc)["candidates"][0]["content"]["parts"][-1]
        assert r.function_calls[0].name == raw_call["functionCall"]["name"]
        assert r.candidates[0].content.parts[-1].thought_signature == base64.b64decode(raw_call["thoughtSignature"])
        for name in GEMINI_ERRORS:
            meta, body = load(f"gemini/{name}")
            upstream = orjson.loads(body)["error"]
            with pytest.raises(gerrors.APIError) as err:
                await client.aio.models.generate_content(model="up-gemini", contents="x")
            if upstream["code"] == 403:
                # By design the gateway reports a provider's credential refusal as its own 502.
                assert (err.value.code, err.value.status) == (502, "UNAVAILABLE"), name
            else:
                assert (err.value.code, err.value.status, err.value.message) == (upstream["code"], upstream["status"], upstream["message"]), name
    finally:
        await client.aio.aclose()


async def test_gateway_429_in_gemini_shape_with_retry_info(gateway):
    """Item 41: the gateway's own 429 on Gemini routes: RESOURCE_EXHAUSTED + RetryInfo = Retry-After."""
    gw = await gateway()
    key = await gw.create_key("gemini-rpm1", rpm=1)
    path = "/v1beta/models/mock-gemini:generateContent"
    body = {"contents": [{"parts": [{"text": "x"}]}]}
    assert (await raw(gw, "POST", path, json=body, headers={"x-goog-api-key": key}))[0] == 200
    status, headers, data = await raw(gw, "POST", path, json=body, headers={"x-goog-api-key": key})
    err = orjson.loads(data)["error"]
    assert status == 429 and err["code"] == 429 and err["status"] == "RESOURCE_EXHAUSTED"
    retry = [d for d in err["details"] if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"]
    assert retry and retry[0]["retryDelay"] == headers["Retry-After"] + "s" and 1 <= int(headers["Retry-After"]) <= 60
    client = gem(gw, key=key)
    try:
        with pytest.raises(gerrors.ClientError) as ce:
            await client.aio.models.generate_content(model="mock-gemini", contents="x")
    finally:
        await client.aio.aclose()
    assert ce.value.code == 429 and ce.value.status == "RESOURCE_EXHAUSTED"


async def test_gateway_429_gemini_wording(gateway):
    """Item 48 (Gemini half): gemini-cli's regex extracts the delay from the message."""
    gw = await gateway()
    key = await gw.create_key("gemini-rpm1", rpm=1)
    path = "/v1beta/models/mock-gemini:generateContent"
    body = {"contents": [{"parts": [{"text": "x"}]}]}
    await raw(gw, "POST", path, json=body, headers={"x-goog-api-key": key})
    status, headers, data = await raw(gw, "POST", path, json=body, headers={"x-goog-api-key": key})
    assert status == 429
    match = GEMINI_CLI_RE.search(orjson.loads(data)["error"]["message"])
    assert match and match.group(1) == headers["Retry-After"] + "s"


async def test_midstream_failure_raises_in_every_sdk(gateway):
    """Items 24, 31, 42: the gateway's error event after an upstream cut makes each SDK raise."""
    gw = await gateway()
    _, oa = load("openai/chat_stream_text_with_usage.sse")
    _, an = load("anthropic/docs_messages_stream_basic.sse")
    _, ge = load("gemini/stream_text_usage_short.sse")
    gw.upstream.script(
        Reply(headers=dict(SSE_HEADERS), chunks=[e + b"\n\n" for e in oa.split(b"\n\n")[:3]], cut_after=2),
        Reply(headers=dict(SSE_HEADERS), chunks=[e + b"\n\n" for e in an.split(b"\n\n")[:3]], cut_after=2),
        Reply(headers=dict(SSE_HEADERS), chunks=[e + b"\r\n\r\n" for e in ge.split(b"\r\n\r\n")[:2]], cut_after=1),
    )
    async with oai(gw) as client:
        with pytest.raises(openai.APIError) as oe:
            async for _ in await client.chat.completions.create(model="up-gpt", messages=[USER], stream=True):
                pass
    assert oe.value.message == "The upstream connection failed mid-stream."
    async with ant(gw) as client:
        with pytest.raises(anthropic.APIStatusError) as ae:
            async with client.messages.stream(model="up-claude", max_tokens=8, messages=[USER]) as s:
                await s.get_final_message()
    assert ae.value.body["error"]["type"] == "api_error" and ae.value.body["request_id"]
    client = gem(gw)
    try:
        with pytest.raises(gerrors.APIError) as ge_err:
            async for _ in await client.aio.models.generate_content_stream(model="up-gemini", contents="x"):
                pass
    finally:
        await client.aio.aclose()
    assert ge_err.value.code == 502 and ge_err.value.status == "UNAVAILABLE"


# ---------------------------------------------------------------------- F. models (items 43-45)


async def test_model_lists_in_each_shape(gateway):
    """Items 43-45: OpenAI list fields within 3 s; Anthropic list via its SDK, limit, unknown params; genai list."""
    gw = await gateway()
    t0 = time.monotonic()
    status, _, data = await raw(gw, "GET", "/v1/models", headers=gw.headers())
    assert status == 200 and time.monotonic() - t0 < 3
    doc = orjson.loads(data)
    assert doc["object"] == "list" and doc["data"]
    for m in doc["data"]:
        assert set(m) >= {"id", "object", "created", "owned_by"} and m["object"] == "model"
        assert isinstance(m["created"], int) and isinstance(m["owned_by"], str)
    all_ids = [m["id"] for m in doc["data"]]
    for headers in ({"x-api-key": gw.key}, {**gw.headers(), "anthropic-version": "2023-06-01"}):
        status, _, data = await raw(gw, "GET", "/v1/models?limit=1000&beta=true&foo=bar", headers=headers)
        page = orjson.loads(data)
        assert status == 200 and page["has_more"] is False and [m["id"] for m in page["data"]] == all_ids
        assert page["first_id"] == all_ids[0] and page["last_id"] == all_ids[-1]
        assert all(m["type"] == "model" and m["display_name"] and RFC3339.match(m["created_at"]) for m in page["data"])
    status, _, data = await raw(gw, "GET", "/v1/models?limit=1", headers={"x-api-key": gw.key})
    page = orjson.loads(data)
    assert page["has_more"] is True and page["first_id"] == page["last_id"] == all_ids[0]
    async with ant(gw) as client:
        listed = [m async for m in client.models.list()]
    assert [m.id for m in listed] == all_ids and all(m.type == "model" and m.created_at for m in listed)
    client = gem(gw)
    try:
        models = [m async for m in await client.aio.models.list()]
    finally:
        await client.aio.aclose()
    assert {m.name for m in models} == {f"models/{i}" for i in all_ids}
    assert all("generateContent" in (m.supported_actions or []) for m in models)


async def test_anthropic_models_pagination_terminates(gateway):
    """Item 44: `limit` is honoured, so `after_id` must be too (the SDK follows has_more/last_id)."""
    gw = await gateway()
    _, _, data = await raw(gw, "GET", "/v1/models", headers=gw.headers())
    all_ids = [m["id"] for m in orjson.loads(data)["data"]]
    seen: list[str] = []
    async with ant(gw) as client:
        async for m in client.models.list(limit=3):
            seen.append(m.id)
            if len(seen) > 3 * len(all_ids):
                break  # without this guard the bug loops forever
    assert seen == all_ids


# ---------------------------------------------------------------------- G. errors, retries, ids (items 46-49)


async def test_statuses_map_to_sdk_exception_classes(gateway):
    """Item 46: gateway-made 400/403/404/502 reach each SDK as the matching exception class."""
    gw = await gateway()
    limited = await gw.create_key("claude-only", models=("mock-claude",))
    gw.upstream.script(Reply(status=500, headers={"Content-Type": "application/json"}, chunks=[b'{"type":"error"}']))
    async with oai(gw) as client:
        for exc, kw in (
            (openai.BadRequestError, {"model": "mock-gpt", "extra_body": {"api_base": "http://x"}}),
            (openai.NotFoundError, {"model": "no-such-model"}),
            (openai.InternalServerError, {"model": "dead-gpt"}),
        ):
            with pytest.raises(exc) as err:
                await client.chat.completions.create(messages=[USER], **kw)
            assert err.value.request_id
    async with oai(gw, key=limited) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="mock-gpt", messages=[USER])
    async with ant(gw) as client:
        for exc, kw in ((anthropic.BadRequestError, {"model": "mock-claude", "extra_body": {"api_base": "http://x"}}),
                        (anthropic.NotFoundError, {"model": "no-such-model"}),
                        (anthropic.InternalServerError, {"model": "up-claude"})):
            with pytest.raises(exc) as err:
                await client.messages.create(max_tokens=8, messages=[USER], **kw)
            assert err.value.request_id == err.value.body["request_id"]  # item 49
    async with ant(gw, key=limited) as client:
        with pytest.raises(anthropic.PermissionDeniedError):
            await client.messages.create(model="mock-gpt", max_tokens=8, messages=[USER])


async def test_upstream_overloaded_keeps_its_status(gateway):
    """Item 46: Anthropic's 529 overloaded_error stays 529 so the SDK raises OverloadedError."""
    gw = await gateway()
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_up"}'
    gw.upstream.script(Reply(status=529, headers={"Content-Type": "application/json"}, chunks=[body]))
    async with ant(gw) as client:
        with pytest.raises(anthropic.OverloadedError) as err:
            await client.messages.create(model="up-claude", max_tokens=8, messages=[USER])
    assert err.value.body["error"]["type"] == "overloaded_error"


async def test_openai_sdk_retries_429_exactly_twice(gateway, monkeypatch):
    """Items 47, 48: max_retries=2 → exactly 3 attempts, each SDK delay == Retry-After (≤ 60); Codex regex."""
    gw = await gateway()
    key = await gw.create_key("rpm1", rpm=1)
    attempts = count_admissions(gw, monkeypatch)
    async with oai(gw, key=key, max_retries=2) as client:
        delays = no_sleep(client, monkeypatch)
        await client.chat.completions.create(model="mock-gpt", messages=[USER])
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="mock-gpt", messages=[USER])
    assert attempts == [200, 429, 429, 429]
    retry_after = int(err.value.response.headers["Retry-After"])
    assert 1 <= retry_after <= 60 and len(delays) == 2
    assert all(abs(d - retry_after) <= 1 for d in delays), (delays, retry_after)
    assert err.value.code == "rate_limit_exceeded"
    match = CODEX_RE.search(err.value.message)
    assert match and abs(float(match.group(1)) - retry_after) <= 1


async def test_anthropic_sdk_retries_429_exactly_twice(gateway, monkeypatch):
    """Item 47 for the anthropic SDK (it ignores Retry-After above 60 s)."""
    gw = await gateway()
    key = await gw.create_key("rpm1", rpm=1)
    attempts = count_admissions(gw, monkeypatch)
    async with ant(gw, key=key, max_retries=2) as client:
        delays = no_sleep(client, monkeypatch)
        await client.messages.create(model="mock-claude", max_tokens=8, messages=[USER])
        with pytest.raises(anthropic.RateLimitError) as err:
            await client.messages.create(model="mock-claude", max_tokens=8, messages=[USER])
    assert attempts == [200, 429, 429, 429]
    retry_after = int(err.value.response.headers["Retry-After"])
    assert 1 <= retry_after <= 60 and all(abs(d - retry_after) <= 1 for d in delays) and len(delays) == 2
    assert err.value.request_id == err.value.body["request_id"]


async def test_exhausted_budget_says_do_not_retry(gateway, monkeypatch):
    """Item 47: insufficient_quota carries `x-should-retry: false`, so the SDK makes one attempt only."""
    gw = await gateway()
    key = await gw.create_key("broke", budget_usd=1e-9)
    for _ in range(20):  # the first request may be admitted (one request of overspend)
        status, headers, _ = await raw(gw, "POST", "/v1/chat/completions", json={"model": "mock-gpt", "messages": [USER]},
                                       headers=gw.headers(key))
        if status == 429:
            break
        await asyncio.sleep(0.05)
    assert status == 429 and headers["x-should-retry"] == "false"
    attempts = count_admissions(gw, monkeypatch)
    async with oai(gw, key=key, max_retries=2) as client:
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="mock-gpt", messages=[USER])
    assert attempts == [429] and err.value.code == "insufficient_quota"


async def test_request_ids_on_success_in_every_dialect(gateway):
    """Item 49: x-request-id and request-id on every answer; the SDKs expose them."""
    gw = await gateway()
    async with oai(gw) as client:
        r = await client.chat.completions.create(model="mock-gpt", messages=[USER])
        assert r._request_id and r._request_id.startswith("req_")
    async with ant(gw) as client:
        m = await client.messages.create(model="mock-claude", max_tokens=8, messages=[USER])
        assert m._request_id and m._request_id.startswith("req_")
    _, headers, _ = await raw(gw, "POST", "/v1beta/models/mock-gemini:streamGenerateContent?alt=sse",
                              json={"contents": [{"parts": [{"text": "x"}]}]}, headers={"x-goog-api-key": gw.key})
    assert headers["x-request-id"] == headers["request-id"]


async def test_relayed_anthropic_error_request_id_matches_header(gateway):
    gw = await gateway()
    gw.upstream.script(json_reply("anthropic/messages_error_429_rate_limit.json"))
    async with ant(gw) as client:
        with pytest.raises(anthropic.RateLimitError) as err:
            await client.messages.create(model="up-claude", max_tokens=8, messages=[USER])
    assert err.value.request_id == err.value.body["request_id"]


# ---------------------------------------------------------------------- H. transport (items 32, 53, 54)


async def test_stream_timeouts_defaults_keepalive_and_no_total_timeout(gateway):
    """Items 32, 53: pings at most every 30 s by default; no total timeout on upstream streams."""
    assert ServerConfig().stream_keepalive_s <= 30
    # A stream longer than the first-byte and idle timeouts together, with no gap over
    # either, runs to its end: nothing bounds a stream's total time.
    gw = await gateway(timeouts=Timeouts(connect_s=2, first_byte_s=0.5, idle_s=0.5))
    events = [b'data: {"n":%d}\n\n' % i for i in range(6)] + [b"data: [DONE]\n\n"]
    gw.upstream.script(Reply(headers=dict(SSE_HEADERS), chunks=events, delay_s=0.25))
    async with aiohttp.ClientSession() as s:
        body = {"model": "up-gpt", "stream": True, "messages": [USER], "stream_options": {"include_usage": True}}
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            raw = await r.read()
    assert raw.replace(b": keep-alive\n\n", b"") == b"".join(events)


def test_default_idle_timeout_outlasts_a_120s_upstream_pause():
    assert Timeouts().idle_s > 120


CLIENT_HEADERS = {
    "x-stainless-lang": "python", "x-stainless-package-version": "3.57.0", "x-stainless-os": "Linux",
    "x-stainless-arch": "x64", "x-stainless-runtime": "CPython", "x-stainless-runtime-version": "3.11.7",
    "x-stainless-async": "async:asyncio", "x-stainless-retry-count": "0", "x-stainless-read-timeout": "600",
    "x-stainless-timeout": "600", "x-stainless-helper-method": "stream",
    "X-Claude-Code-Session-Id": "3f1c2b9a-session", "x-claude-code-agent-id": "agent-7",
    "Idempotency-Key": "stainless-python-retry-2b5f", "OpenAI-Organization": "org-client", "OpenAI-Project": "proj_client",
    "User-Agent": "claude-cli/2.1.240 (external, cli)", "anthropic-dangerous-direct-browser-access": "true",
    "x-goog-api-client": "google-genai-sdk/3.6.1 gl-python/3.11.7", "x-gemini-api-privileged-user-id": "u-1",
    "Accept": "application/json", "Accept-Encoding": "gzip, deflate",
}


async def test_client_side_headers_are_accepted_and_not_leaked_upstream(gateway):
    """Item 54: every client-side header family gets 200 on all three surfaces; only safe ones go upstream."""
    gw = await gateway()
    gw.upstream.script(json_reply("openai/chat_completion_text.json"))
    auth = {**CLIENT_HEADERS, "Authorization": f"Bearer {gw.key}"}
    for path, body in (
        ("/v1/chat/completions", {"model": "mock-gpt", "messages": [USER]}),
        ("/v1/chat/completions", {"model": "up-gpt", "messages": [USER]}),
        ("/v1/messages?beta=true", {"model": "mock-claude", "max_tokens": 8, "messages": [USER]}),
        ("/v1beta/models/mock-gemini:generateContent", {"contents": [{"parts": [{"text": "x"}]}]}),
    ):
        status, _, data = await raw(gw, "POST", path, json=body, headers=auth)
        assert status == 200, (path, data)
    sent = {k.lower(): v for k, v in gw.upstream.received[0].headers.items()}
    assert sent["user-agent"] == CLIENT_HEADERS["User-Agent"] and sent["idempotency-key"] == CLIENT_HEADERS["Idempotency-Key"]
    assert not [k for k in sent if k.startswith(("x-stainless", "x-claude-code", "openai-organization", "openai-project"))]
    # The headers anthropic-python really sent (recorded), replayed as they are.
    _, recorded = load("anthropic/sdk_request_headers_python_0.82.json")
    headers = {k: v for k, v in orjson.loads(recorded).items() if k not in ("host", "content-length", "connection")}
    status, _, _ = await raw(gw, "POST", "/v1/messages", json={"model": "mock-claude", "max_tokens": 8, "messages": [USER]},
                             headers={**headers, "x-api-key": gw.key})
    assert status == 200
