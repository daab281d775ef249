"""The mock provider, driven by the official SDKs over real HTTP, plus raw framing checks."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from proxy.mock_upstream import (
    DEFAULT_WORDS,
    MockOptions,
    MockServer,
    build_mock_app,
    mock_stats,
    prompt_tokens_for,
    run_mock,
    start_mock,
)

Http = aiohttp.ClientSession
OPENAI_KEY = "sk-upstream-openai"
ANTHROPIC_KEY = "sk-ant-upstream"
GOOGLE_KEY = "AIza-upstream"
FULL_TEXT = "".join(DEFAULT_WORDS)  # the default reply: 12 chunks, one per word
TOOL_ARGS = {"location": "San Francisco, CA", "unit": "celsius"}
WEATHER_TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}
OAI = {"Authorization": f"Bearer {OPENAI_KEY}"}
ANT = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
GOO = {"x-goog-api-key": GOOGLE_KEY}
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {
    "model": "mock-claude",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
GEMINI = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = await start_mock()
    yield server
    await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def oai(mock: MockServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        api_key=OPENAI_KEY, base_url=f"{mock.base_url}/v1", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def ant(mock: MockServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        api_key=ANTHROPIC_KEY, base_url=mock.base_url, max_retries=0
    ) as client:
        yield client


def _genai(mock: MockServer, version: str, session: aiohttp.ClientSession) -> genai.Client:
    # Our own session: the SDK's built-in one subclasses ClientSession, which aiohttp
    # 3.14 reports with a DeprecationWarning (an error in this test suite).
    options = genai_types.HttpOptions(
        base_url=mock.base_url, api_version=version, aiohttp_client=session
    )
    return genai.Client(api_key=GOOGLE_KEY, http_options=options)


def _genai_headers(headers: dict[str, str]) -> genai_types.GenerateContentConfig:
    return genai_types.GenerateContentConfig(
        http_options=genai_types.HttpOptions(headers=headers)
    )


def _last_prompt_tokens(mock: MockServer) -> int:
    last = mock.stats.last
    assert last is not None
    return prompt_tokens_for(last.body)


def _sse_events(raw: bytes, sep: bytes = b"\n\n") -> list[bytes]:
    """Split a stream into events; asserts it ends with the blank line."""
    assert raw.endswith(sep), raw[-40:]
    return raw[: -len(sep)].split(sep)


def _data(event: bytes) -> Any:
    lines = event.split(b"\n")
    data = [ln[len(b"data: ") :] for ln in lines if ln.startswith(b"data: ")]
    assert len(data) == 1, event
    return json.loads(data[0])


# --------------------------------------------------------------------------- OpenAI SDK


async def test_openai_chat_non_stream(oai: openai.AsyncOpenAI, mock: MockServer) -> None:
    completion = await oai.chat.completions.create(**CHAT)
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "mock-gpt"
    assert completion.choices[0].message.content == FULL_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens == _last_prompt_tokens(mock)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


async def test_openai_stream_with_usage(oai: openai.AsyncOpenAI, mock: MockServer) -> None:
    stream = await oai.chat.completions.create(
        **CHAT,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-chunks": "5"},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert content == list(DEFAULT_WORDS[:5])
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert final.usage.completion_tokens == len(content) == 5
    assert final.usage.prompt_tokens == _last_prompt_tokens(mock)


async def test_openai_stream_without_usage_has_no_usage_chunk(
    oai: openai.AsyncOpenAI, http: Http, mock: MockServer
) -> None:
    stream = await oai.chat.completions.create(**CHAT, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # On the wire the "usage" key is absent, not null, when usage was not asked for.
    url = f"{mock.base_url}/v1/chat/completions"
    async with http.post(url, headers=OAI, json={**CHAT, "stream": True}) as r:
        raw = await r.read()
    events = _sse_events(raw)
    assert events[-1] == b"data: [DONE]"
    assert all("usage" not in _data(e) for e in events[:-1])


async def test_openai_tool_call_reassembled(oai: openai.AsyncOpenAI) -> None:
    request = {
        "model": "mock-gpt",
        "messages": [{"role": "user", "content": "What's the weather in SF?"}],
        "tools": [WEATHER_TOOL_OPENAI],
    }
    async with oai.chat.completions.stream(**request) as stream:  # type: ignore[arg-type]
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_ARGS
    whole = await oai.chat.completions.create(**request)  # type: ignore[arg-type]
    tool_calls = whole.choices[0].message.tool_calls
    assert tool_calls is not None
    assert json.loads(tool_calls[0].function.arguments) == TOOL_ARGS


async def test_openai_embeddings(oai: openai.AsyncOpenAI, mock: MockServer) -> None:
    first = await oai.embeddings.create(model="mock-embedding", input=["a", "b"])
    assert [d.index for d in first.data] == [0, 1]
    assert len(first.data[0].embedding) == 64
    assert first.usage.prompt_tokens == first.usage.total_tokens == _last_prompt_tokens(mock)
    again = await oai.embeddings.create(model="mock-embedding", input="a", dimensions=8)
    assert len(again.data[0].embedding) == 8
    repeat = await oai.embeddings.create(model="mock-embedding", input=["a", "b"])
    assert repeat.data[1].embedding == first.data[1].embedding  # deterministic
    b64 = await oai.embeddings.create(
        model="mock-embedding", input=["a", "b"], encoding_format="base64"
    )
    vector = b64.data[0].embedding
    if isinstance(vector, str):  # SDK versions differ in whether they decode it
        vector = list(struct.unpack("<64f", base64.b64decode(vector)))
    assert vector == pytest.approx(first.data[0].embedding, rel=1e-6)


async def test_openai_legacy_completions(oai: openai.AsyncOpenAI) -> None:
    whole = await oai.completions.create(model="mock-gpt", prompt="def f(", suffix=")")
    assert whole.choices[0].text == FULL_TEXT
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    stream = await oai.completions.create(
        model="mock-gpt", prompt="x", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == FULL_TEXT
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


async def test_openai_responses(oai: openai.AsyncOpenAI, mock: MockServer) -> None:
    created = await oai.responses.create(model="mock-gpt", input="Hello!")
    assert created.output_text == FULL_TEXT
    assert created.usage is not None and created.usage.output_tokens == 12
    async with oai.responses.stream(
        model="mock-gpt",
        input="Hello!",
        instructions="Be brief.",
        extra_headers={"x-mock-chunks": "4"},
    ) as stream:
        types = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 4
    assert "response.output_item.done" in types
    assert final.output_text == "".join(DEFAULT_WORDS[:4])
    assert final.instructions == "Be brief."
    assert final.usage is not None
    assert final.usage.output_tokens == 4
    assert final.usage.input_tokens == _last_prompt_tokens(mock)
    assert final.usage.total_tokens == final.usage.input_tokens + 4


async def test_openai_models_list(oai: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in oai.models.list()]
    assert "mock-gpt" in ids
    model = await oai.models.retrieve("mock-gpt")
    assert model.object == "model"


async def test_openai_sdk_errors(mock: MockServer, oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as leaked:
        await oai.chat.completions.create(**CHAT, extra_headers={"x-mock-fail": "401-echo"})
    assert OPENAI_KEY in leaked.value.message
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.chat.completions.create(**CHAT, extra_headers={"x-mock-fail": "429"})
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        await oai.chat.completions.create(**CHAT, extra_headers={"x-mock-fail": "500"})


# --------------------------------------------------------------------------- Anthropic SDK


async def test_anthropic_messages_create(ant: anthropic.AsyncAnthropic, mock: MockServer) -> None:
    message = await ant.messages.create(**MESSAGES)
    assert message.id.startswith("msg_")
    assert message.content[0].type == "text" and message.content[0].text == FULL_TEXT
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 12
    assert message.usage.input_tokens == _last_prompt_tokens(mock)
    headers = mock.stats.last_headers
    assert headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"  # how this SDK sends api_key
    assert headers["anthropic-version"]  # recorded, whatever version the SDK speaks


async def test_anthropic_messages_stream(ant: anthropic.AsyncAnthropic, mock: MockServer) -> None:
    async with ant.messages.stream(**MESSAGES, extra_headers={"x-mock-chunks": "3"}) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == list(DEFAULT_WORDS[:3])
    assert final.stop_reason == "end_turn"
    assert final.content[0].type == "text" and final.content[0].text == "".join(texts)
    assert final.usage.output_tokens == 3
    assert final.usage.input_tokens == _last_prompt_tokens(mock)


async def test_anthropic_tool_use_stream(ant: anthropic.AsyncAnthropic, mock: MockServer) -> None:
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    messages = [{"role": "user", "content": "weather in SF?"}]
    request = {**MESSAGES, "messages": messages, "tools": [tool]}
    beta = {"anthropic-beta": "a-1,b-2"}
    async with ant.messages.stream(**request, extra_headers=beta) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == TOOL_ARGS
    assert mock.stats.last_headers["anthropic-beta"] == "a-1,b-2"


async def test_anthropic_count_tokens_and_models(
    ant: anthropic.AsyncAnthropic, mock: MockServer
) -> None:
    counted = await ant.messages.count_tokens(model="mock-claude", messages=MESSAGES["messages"])
    assert counted.input_tokens == _last_prompt_tokens(mock)
    models = [m async for m in ant.models.list()]
    assert [m.type for m in models] == ["model"] * len(models)
    assert "mock-claude" in [m.id for m in models]


async def test_anthropic_sdk_errors(mock: MockServer) -> None:
    async with anthropic.AsyncAnthropic(
        api_key=ANTHROPIC_KEY, base_url=mock.base_url, max_retries=0,
        default_headers={"x-mock-fail": "429"},
    ) as limited:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await limited.messages.create(**MESSAGES)
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.response.headers["x-should-retry"] == "true"
    assert caught.value.request_id == caught.value.response.headers["request-id"]


# --------------------------------------------------------------------------- google-genai


@pytest.mark.parametrize("version", ["v1beta", "v1"])
async def test_genai_generate_content(
    mock: MockServer, http: Http, version: str
) -> None:
    client = _genai(mock, version, http)
    try:
        response = await client.aio.models.generate_content(model="mock-gemini", contents="hi")
        assert response.text == FULL_TEXT
        candidate = response.candidates[0]  # type: ignore[index]
        assert candidate.finish_reason == genai_types.FinishReason.STOP
        usage = response.usage_metadata
        assert usage is not None and usage.candidates_token_count == 12
        assert usage.prompt_token_count == _last_prompt_tokens(mock)

        stream = await client.aio.models.generate_content_stream(
            model="mock-gemini", contents="hi", config=_genai_headers({"x-mock-chunks": "4"})
        )
        chunks = [c async for c in stream]
        assert "".join(c.text or "" for c in chunks) == "".join(DEFAULT_WORDS[:4])
        assert all(c.usage_metadata and c.usage_metadata.total_token_count for c in chunks)
        last = chunks[-1]
        assert last.candidates is not None
        assert last.candidates[0].finish_reason == genai_types.FinishReason.STOP
        assert last.usage_metadata.candidates_token_count == 4  # type: ignore[union-attr]
        assert mock.stats.last is not None
        assert mock.stats.last.path == f"/{version}/models/mock-gemini:streamGenerateContent"
        assert mock.stats.last.query["alt"] == "sse"
    finally:
        await client.aio.aclose()


async def test_genai_function_call_and_models(mock: MockServer, http: Http) -> None:
    client = _genai(mock, "v1beta", http)
    try:
        declaration = genai_types.FunctionDeclaration(name="get_weather")
        tool = genai_types.Tool(function_declarations=[declaration])
        config = genai_types.GenerateContentConfig(tools=[tool])
        stream = await client.aio.models.generate_content_stream(
            model="mock-gemini", contents="weather in SF?", config=config
        )
        chunks = [c async for c in stream]
        assert len(chunks) == 1
        call = chunks[0].function_calls[0]  # type: ignore[index]
        assert call.name == "get_weather" and call.args == TOOL_ARGS
        names = [m.name async for m in await client.aio.models.list()]
        assert "models/mock-gemini" in names
        with pytest.raises(genai_errors.APIError) as caught:
            await client.aio.models.generate_content(
                model="mock-gemini", contents="hi", config=_genai_headers({"x-mock-fail": "429"})
            )
        assert caught.value.code == 429
    finally:
        await client.aio.aclose()


# --------------------------------------------------------------------------- raw wire checks


@pytest.mark.parametrize("version", ["v1beta", "v1"])
async def test_genai_embed_content(mock: MockServer, http: Http, version: str) -> None:
    """google-genai embeds through batchEmbedContents; the vectors are the OpenAI route's."""
    client = _genai(mock, version, http)
    one = await client.aio.models.embed_content(model="mock-embedding", contents="a")
    assert mock.stats.last is not None and mock.stats.last.path == f"/{version}/models/mock-embedding:batchEmbedContents"
    assert one.embeddings is not None and len(one.embeddings[0].values or []) == 64
    assert one.usage_metadata is not None and one.usage_metadata.prompt_token_count == _last_prompt_tokens(mock)
    config = genai_types.EmbedContentConfig(output_dimensionality=8, task_type="RETRIEVAL_DOCUMENT", title="t")
    two = await client.aio.models.embed_content(model="mock-embedding", contents=["a", "b"], config=config)
    assert two.embeddings is not None and [len(e.values or []) for e in two.embeddings] == [8, 8]
    async with openai.AsyncOpenAI(api_key=OPENAI_KEY, base_url=f"{mock.base_url}/v1", max_retries=0) as oai:
        same = await oai.embeddings.create(model="mock-embedding", input="a", encoding_format="float")
    assert one.embeddings[0].values == pytest.approx(same.data[0].embedding)


async def test_gemini_embed_checks(http: Http, mock: MockServer) -> None:
    base = f"{mock.base_url}/v1beta/models/mock-embedding"
    async with http.post(base + ":embedContent", json={"content": {"parts": [{"text": "a"}]}}, headers=GOO) as r:
        doc = await r.json()
        assert r.status == 200 and len(doc["embedding"]["values"]) == 64 and "usageMetadata" in doc
    good = {"model": "models/mock-embedding", "content": {"parts": [{"text": "a"}]}}
    bad = [
        {"requests": []},
        {"requests": [{**good, "model": "models/other"}]},          # must name the URL's model
        {"requests": [{**good, "content": {"parts": [{"inlineData": {}}]}}]},
        {"requests": [{**good, "taskType": "NOPE"}]},
        {"requests": [{**good, "outputDimensionality": 0}]},
        {"requests": [good] * 101},                                 # more than one batch holds
    ]
    for body in bad:
        async with http.post(base + ":batchEmbedContents", json=body, headers=GOO) as r:
            assert r.status == 400 and (await r.json())["error"]["status"] == "INVALID_ARGUMENT", body
    async with http.post(base + ":batchEmbedContents", json={"requests": [good]},
                         headers={**GOO, "x-mock-fail": "no-usage"}) as r:
        assert r.status == 200 and "usageMetadata" not in await r.json()


async def test_gemini_sse_framing_is_crlf(http: Http, mock: MockServer) -> None:
    method = "mock-gemini:streamGenerateContent"
    url = f"{mock.base_url}/v1beta/models/{method}?alt=sse&key={GOOGLE_KEY}"
    async with http.post(url, json=GEMINI, headers={"x-mock-chunks": "3"}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        raw = await r.read()
    events = _sse_events(raw, b"\r\n\r\n")
    assert len(events) == 3
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in events)
    docs = [json.loads(e[len(b"data: ") :]) for e in events]
    for doc in docs[:-1]:  # every chunk has usage, only the last one the candidates count
        assert "candidatesTokenCount" not in doc["usageMetadata"]
    assert docs[-1]["candidates"][0]["finishReason"] == "STOP"
    assert docs[-1]["usageMetadata"]["candidatesTokenCount"] == 3
    assert mock.stats.last is not None and mock.stats.last.query["key"] == GOOGLE_KEY


async def test_gemini_json_array_stream(http: Http, mock: MockServer) -> None:
    url = f"{mock.base_url}/v1/models/mock-gemini:streamGenerateContent"
    async with http.post(url, json=GEMINI, headers={**GOO, "x-mock-chunks": "3"}) as r:
        raw = await r.read()
    assert raw.startswith(b"[{") and raw.endswith(b"}\r\n]") and raw.count(b"\r\n,{") == 2
    docs = json.loads(raw)
    texts = [d["candidates"][0]["content"]["parts"][0]["text"] for d in docs]
    assert texts == list(DEFAULT_WORDS[:3])


async def test_anthropic_raw_event_order(http: Http, mock: MockServer) -> None:
    url = f"{mock.base_url}/v1/messages?beta=true"  # Claude Code's form of the path
    async with http.post(url, headers=ANT, json={**MESSAGES, "stream": True}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Length" not in r.headers
        raw = await r.read()
    events = _sse_events(raw)
    names = [e.split(b"\n")[0].removeprefix(b"event: ").decode() for e in events]
    assert names == [
        "message_start", "content_block_start", "ping",
        *["content_block_delta"] * 12,
        "content_block_stop", "message_delta", "message_stop",
    ]
    assert all(_data(e)["type"] == name for e, name in zip(events, names))


async def test_openai_raw_framing(http: Http, mock: MockServer) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{mock.base_url}/v1/chat/completions", headers=OAI, json=body) as r:
        raw = await r.read()
    events = _sse_events(raw)
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    assert events[-1] == b"data: [DONE]"
    docs = [_data(e) for e in events[:-1]]
    order = ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert list(docs[0]) == order
    assert docs[-1]["choices"] == [] and docs[-1]["usage"]["completion_tokens"] == 12


async def test_missing_credentials_native_shapes(http: Http, mock: MockServer) -> None:
    base = mock.base_url
    async with http.post(f"{base}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 401
        error = (await r.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
    async with http.post(f"{base}/v1/messages", json=MESSAGES, headers={"x-api-key": ""}) as r:
        assert r.status == 401
        body = await r.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    async with http.post(f"{base}/v1beta/models/mock-gemini:generateContent", json=GEMINI) as r:
        assert r.status == 403
        assert (await r.json())["error"]["status"] == "PERMISSION_DENIED"


async def test_fail_500_and_429_shapes(http: Http, mock: MockServer) -> None:
    base = mock.base_url
    gemini_url = f"{base}/v1beta/models/mock-gemini:generateContent"
    for url, headers, body in [
        (f"{base}/v1/chat/completions", OAI, CHAT),
        (f"{base}/v1/messages", ANT, MESSAGES),
        (gemini_url, GOO, GEMINI),
    ]:
        async with http.post(url, headers={**headers, "x-mock-fail": "500"}, json=body) as r:
            assert r.status == 500
            assert "error" in await r.json()
        async with http.post(url, headers={**headers, "x-mock-fail": "429"}, json=body) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "7"
            error = (await r.json())["error"]
    assert error["status"] == "RESOURCE_EXHAUSTED"  # the Gemini one, last in the loop
    assert error["details"][0]["retryDelay"] == "7s" and "Please retry in 7s" in error["message"]


async def test_fail_401_echo_leaks_the_key(http: Http, mock: MockServer) -> None:
    headers = {**OAI, "x-mock-fail": "401-echo"}
    async with http.post(f"{mock.base_url}/v1/chat/completions", headers=headers, json=CHAT) as r:
        assert r.status == 401
        assert OPENAI_KEY in (await r.json())["error"]["message"]
    url = f"{mock.base_url}/v1beta/models/mock-gemini:generateContent"
    async with http.post(url, headers={**GOO, "x-mock-fail": "401-echo"}, json=GEMINI) as r:
        assert r.status == 401 and GOOGLE_KEY in await r.text()


async def test_fail_midstream_cuts_after_three_events(http: Http, mock: MockServer) -> None:
    headers = {**OAI, "x-mock-fail": "midstream"}
    received = b""
    async with http.post(
        f"{mock.base_url}/v1/chat/completions", headers=headers, json={**CHAT, "stream": True}
    ) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for piece in r.content.iter_any():
                received += piece
    assert received.count(b"data: ") == 3 and received.endswith(b"\n\n")
    async with http.post(f"{mock.base_url}/v1/chat/completions", headers=headers, json=CHAT) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # a JSON body announced in full but cut in half


async def test_fail_hang_returns_when_client_leaves(http: Http, mock: MockServer) -> None:
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            f"{mock.base_url}/v1/messages",
            headers={**ANT, "x-mock-fail": "hang"},
            json=MESSAGES,
            timeout=timeout,
        )
    await _until(lambda: mock.stats.disconnects == 1)


async def test_fail_stall_sends_two_events_then_nothing(http: Http, mock: MockServer) -> None:
    headers = {**ANT, "x-mock-fail": "stall"}
    url = f"{mock.base_url}/v1/messages"
    async with http.post(url, headers=headers, json={**MESSAGES, "stream": True}) as r:
        assert r.status == 200
        received = b""
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.3):
                async for piece in r.content.iter_any():
                    received += piece
        r.close()
    names = [e.split(b"\n")[0] for e in _sse_events(received)]
    assert names == [b"event: message_start", b"event: content_block_start"]
    await _until(lambda: mock.stats.disconnects == 1)


async def test_fail_no_usage(http: Http, mock: MockServer) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    headers = {**OAI, "x-mock-fail": "no-usage"}
    async with http.post(f"{mock.base_url}/v1/chat/completions", headers=headers, json=body) as r:
        docs = [_data(e) for e in _sse_events(await r.read())[:-1]]
    assert all(d["choices"] for d in docs) and all(d["usage"] is None for d in docs)
    url = f"{mock.base_url}/v1beta/models/mock-gemini:streamGenerateContent?alt=sse"
    async with http.post(url, headers={**GOO, "x-mock-fail": "no-usage"}, json=GEMINI) as r:
        raw = await r.read()
    assert b"usageMetadata" not in raw and b'"finishReason":"STOP"' in raw


async def test_delay_and_ttfb_controls(http: Http, mock: MockServer) -> None:
    headers = {**OAI, "x-mock-chunks": "3", "x-mock-delay-ms": "60", "x-mock-ttfb-ms": "150"}
    started = time.monotonic()
    arrivals: list[float] = []
    async with http.post(
        f"{mock.base_url}/v1/chat/completions", headers=headers, json={**CHAT, "stream": True}
    ) as r:
        headers_at = time.monotonic() - started
        async for _ in r.content:  # one line at a time
            arrivals.append(time.monotonic() - started)
    assert headers_at >= 0.14
    assert arrivals[-1] - arrivals[0] >= 0.25  # 6 events, 5 gaps of 60 ms: not one burst


async def test_bad_control_header_is_400(http: Http, mock: MockServer) -> None:
    for name, value in [("x-mock-chunks", "0"), ("x-mock-fail", "nope"), ("x-mock-delay-ms", "x")]:
        async with http.post(
            f"{mock.base_url}/v1/chat/completions", headers={**OAI, name: value}, json=CHAT
        ) as r:
            assert r.status == 400


async def test_stats_endpoint(http: Http, mock: MockServer) -> None:
    await http.post(f"{mock.base_url}/v1/chat/completions", headers=OAI, json=CHAT)
    await http.post(f"{mock.base_url}/v1/chat/completions", headers=OAI, json=CHAT)
    async with http.get(f"{mock.base_url}/_mock/stats") as r:
        stats = await r.json()
    assert stats["requests"] == {"/v1/chat/completions": 2} and stats["total"] == 2
    assert stats["last_headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert stats["last"]["body"]["model"] == "mock-gpt"
    async with http.delete(f"{mock.base_url}/_mock/stats") as r:
        assert (await r.json())["total"] == 0
    assert mock.app[mock_stats].total == 0


async def test_unknown_path_is_json_404(http: Http, mock: MockServer) -> None:
    async with http.post(f"{mock.base_url}/api/event_logging/batch", json={}) as r:
        assert r.status == 404 and "error" in await r.json()


async def test_options_and_test_server(aiohttp_client: Any) -> None:
    """build_mock_app also works under aiohttp's own test server, with custom options."""
    client = await aiohttp_client(build_mock_app(MockOptions(chunks=2, words=("a", "b", "c"))))
    r = await client.post("/v1/chat/completions", headers=OAI, json=CHAT)
    assert (await r.json())["choices"][0]["message"]["content"] == "ab"


async def test_run_mock_serves_until_cancelled() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task = asyncio.create_task(run_mock("127.0.0.1", port, MockOptions()))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/v1/models", headers=OAI) as r:
                        assert r.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("run_mock never started listening")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _until(predicate: Any, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)
