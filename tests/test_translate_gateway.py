"""Cross-dialect calls through the gateway: official SDKs against the mock provider
speaking another protocol (issue 22). The mock checks what it receives for its own
protocol (proxy/mock_checks.py), so a bad translation fails here."""

from __future__ import annotations

import base64

import anthropic
import orjson
import pytest

from tests._gateway import gateway, scripted_upstream  # noqa: F401

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a place",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                     "required": ["location"]},
}
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)).decode()


def _anthropic(gw):
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def _last_body(gw, path):
    got = [r for r in gw.mock_stats[__import__("proxy.mock_upstream", fromlist=["mock_stats"]).mock_stats].recent if r.path == path]
    return orjson.loads(got[-1].body)


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_client_on_chat_upstream_text(gateway, stream):
    gw = await gateway()
    async with _anthropic(gw) as client:
        kw = dict(model="mock-gpt", max_tokens=50, system="be brief", messages=[{"role": "user", "content": "hello"}],
                  stop_sequences=["\n\nHuman:"])
        if stream:
            async with client.messages.stream(**kw) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(**kw)
    assert msg.content[0].type == "text" and "mock" in msg.content[0].text
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == 12 and msg.usage.input_tokens > 0
    sent = _last_body(gw, "/v1/chat/completions")
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["max_tokens"] == 50 and sent["stop"] == ["\n\nHuman:"] and sent["model"] == "mock-gpt"
    rec = (await gw.wait_records(1))[0]
    assert rec.completion_tokens == 12 and not rec.estimated and rec.upstream == "mock"
    assert (rec.client_dialect, rec.upstream_protocol) == ("anthropic", "openai")


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_client_two_turn_parallel_tool_loop_with_thinking(gateway, stream):
    gw = await gateway()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is the weather in Paris and Tokyo? Call in parallel."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
    ]}]
    kw = dict(model="mock-gpt", max_tokens=4000, tools=[WEATHER_TOOL], thinking={"type": "enabled", "budget_tokens": 2000})

    async def turn(client):
        if stream:
            async with client.messages.stream(messages=messages, **kw) as s:
                return await s.get_final_message()
        return await client.messages.create(messages=messages, **kw)

    async with _anthropic(gw) as client:
        first = await turn(client)
        kinds = [b.type for b in first.content]
        assert kinds == ["thinking", "tool_use", "tool_use"], kinds
        assert first.stop_reason == "tool_use"
        assert first.content[0].signature.startswith("lpx1.chat.")
        uses = first.content[1:]
        assert len({u.id for u in uses}) == 2 and all(u.input == {"location": "San Francisco, CA", "unit": "celsius"} for u in uses)
        sent = _last_body(gw, "/v1/chat/completions")
        assert sent["reasoning_effort"] == "low"
        assert sent["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": u.id, "content": f"{k}: 21 C"} for k, u in enumerate(uses)
        ]})
        second = await turn(client)
    assert second.stop_reason == "end_turn" and second.content[-1].type == "text"
    sent = _last_body(gw, "/v1/chat/completions")
    assistant, tool1, tool2 = sent["messages"][1:4]
    # The thinking came back as the reasoning_content the upstream requires (P28).
    assert assistant["reasoning_content"] == "The user wants the weather, so I call the tool."
    assert [c["id"] for c in assistant["tool_calls"]] == [u.id for u in uses]
    assert (tool1["tool_call_id"], tool2["tool_call_id"]) == (uses[0].id, uses[1].id)
    recs = await gw.wait_records(2)
    assert all(r.status == 200 and not r.estimated for r in recs)


# ---------------------------------------------------------------------- chat client → Anthropic upstream

OPENAI_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a place",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
}}


def _openai(gw):
    import openai
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_client_on_anthropic_upstream_text(gateway, stream):
    gw = await gateway()
    async with _openai(gw) as client:
        kw = dict(model="mock-claude", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                  temperature=1.5, top_p=0.9, stop="END")
        if stream:
            got = await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
            chunks = [c async for c in got]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[0].choices[0].delta.role == "assistant"
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finish == ["stop"] and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
        else:
            resp = await client.chat.completions.create(**kw)
            text = resp.choices[0].message.content
            assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == 12
    assert "mock" in text
    sent = _last_body(gw, "/v1/messages")
    # No markers from the client: the gateway's own breakpoints (P34).
    assert sent["max_tokens"] == 4096
    assert sent["system"] == [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}]
    assert sent["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert sent["temperature"] == 1.0 and "top_p" not in sent and sent["stop_sequences"] == ["END"]
    rec = (await gw.wait_records(1))[0]
    assert rec.completion_tokens == 12 and not rec.estimated
    assert (rec.client_dialect, rec.upstream_protocol) == ("openai", "anthropic")


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_client_on_anthropic_upstream_tool_loop_keeps_signature(gateway, stream):
    """P1: turn 2 carries turn 1's signed thinking block first, byte-identical, though the
    chat client only echoed its tool call ids."""
    gw = await gateway()
    messages = [{"role": "user", "content": "weather in Paris and Rome? parallel please"}]
    kw = dict(model="mock-claude", tools=[OPENAI_TOOL], reasoning_effort="low")

    async def turn(client):
        if not stream:
            return (await client.chat.completions.create(messages=messages, **kw)).choices[0]
        got = await client.chat.completions.create(messages=messages, stream=True, **kw)
        calls: dict[int, dict] = {}
        finish = None
        async for c in got:
            for tc in c.choices[0].delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": ""}})
                slot["function"]["arguments"] += tc.function.arguments or ""
            finish = c.choices[0].finish_reason or finish
        return {"message": {"role": "assistant", "content": None, "tool_calls": [calls[k] for k in sorted(calls)]}, "finish_reason": finish}

    async with _openai(gw) as client:
        first = await turn(client)
        if stream:
            msg, finish = first["message"], first["finish_reason"]
        else:
            msg, finish = first.message.model_dump(exclude_none=True), first.finish_reason
        assert finish == "tool_calls" and len(msg["tool_calls"]) == 2
        assert all(orjson.loads(c["function"]["arguments"])["location"] for c in msg["tool_calls"])
        messages.append(msg)
        messages.extend({"role": "tool", "tool_call_id": c["id"], "content": "21 C"} for c in msg["tool_calls"])
        second = await turn(client)
    assert (second["finish_reason"] if stream else second.finish_reason) == "stop"
    sent = _last_body(gw, "/v1/messages")
    assistant = sent["messages"][1]
    assert assistant["role"] == "assistant" and assistant["content"][0]["type"] == "thinking"
    assert "thinking" in sent and sent["thinking"]["budget_tokens"] == 2048
    results = sent["messages"][2]["content"]
    assert [r["tool_use_id"] for r in results] == [b["id"] for b in assistant["content"][1:]]
    assert "lpx1" not in orjson.dumps(sent).decode()


# ---------------------------------------------------------------------- Responses client → chat upstream (Codex)

RESPONSES_EVENT_ORDER = ["response.created", "response.in_progress"]


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_client_on_chat_only_upstream_text(gateway, stream):
    gw = await gateway()
    async with _openai(gw) as client:
        kw = dict(model="mock-chatonly", input="hello", instructions="be brief", max_output_tokens=64)
        if stream:
            async with client.responses.stream(**kw) as s:
                kinds = [ev.type async for ev in s]
                final = await s.get_final_response()
            assert kinds[:2] == RESPONSES_EVENT_ORDER and kinds[-1] == "response.completed"
            assert kinds[2:7] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                                  "response.output_text.delta", "response.output_text.delta"]
            assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
        else:
            final = await client.responses.create(**kw)
    assert "mock" in final.output_text and final.status == "completed"
    assert final.usage.output_tokens == 12 and final.usage.input_tokens > 0
    sent = _last_body(gw, "/v1/chat/completions")
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert sent["max_tokens"] == 64
    assert not [r for r in gw.mock_stats[__import__("proxy.mock_upstream", fromlist=["x"]).mock_stats].recent if r.path == "/v1/responses"]


async def test_responses_client_to_responses_upstream_stays_byte_exact(gateway):
    gw = await gateway()
    async with _openai(gw) as client:
        final = await client.responses.create(model="mock-gpt", input="hello")
    assert "mock" in final.output_text
    assert _last_body(gw, "/v1/responses")["input"] == "hello"


@pytest.mark.parametrize("stream", [False, True])
async def test_codex_style_tool_loop_on_chat_only_upstream(gateway, stream):
    """Codex: store false, the full history with reasoning items back each turn; the chat
    upstream's reasoning_content rides in encrypted_content and comes back (P28)."""
    gw = await gateway()
    tools = [{"type": "function", "name": "get_weather", "description": "Weather",
              "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}},
             {"type": "web_search"}]
    history: list = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather? parallel"}]}]
    kw = dict(model="mock-chatonly", tools=tools, store=False, include=["reasoning.encrypted_content"],
              reasoning={"effort": "low"})

    async def turn(client):
        if stream:
            async with client.responses.stream(input=history, **kw) as s:
                return await s.get_final_response()
        return await client.responses.create(input=history, **kw)

    async with _openai(gw) as client:
        first = await turn(client)
        kinds = [item.type for item in first.output]
        assert kinds == ["reasoning", "function_call", "function_call"], kinds
        assert first.output[0].encrypted_content.startswith("lpx1.chat.")
        calls = first.output[1:]
        assert all(orjson.loads(c.arguments)["location"] for c in calls) and len({c.call_id for c in calls}) == 2
        history.extend(item.model_dump(exclude_none=True) for item in first.output)
        history.extend({"type": "function_call_output", "call_id": c.call_id, "output": "21 C"} for c in calls)
        second = await turn(client)
    assert "mock" in second.output_text
    sent = _last_body(gw, "/v1/chat/completions")
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]   # web_search dropped (P23)
    assistant = sent["messages"][1]
    assert assistant["reasoning_content"] and [c["id"] for c in assistant["tool_calls"]] == [c.call_id for c in calls]


# ---------------------------------------------------------------------- Gemini ⇄ the others

from google import genai  # noqa: E402
from google.genai import types as gtypes  # noqa: E402


def _genai(gw):
    return genai.Client(api_key=gw.key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))


GEMINI_TOOL = gtypes.Tool(function_declarations=[gtypes.FunctionDeclaration(
    name="get_weather", description="Weather for a place",
    parameters=gtypes.Schema(type="OBJECT", properties={"location": gtypes.Schema(type="STRING")}, required=["location"]),
)])


@pytest.mark.parametrize("model", ["mock-gpt", "mock-claude"])
async def test_genai_client_on_other_upstreams_text(gateway, model):
    gw = await gateway()
    client = _genai(gw)
    config = gtypes.GenerateContentConfig(system_instruction="be brief", max_output_tokens=64)
    r = await client.aio.models.generate_content(model=model, contents="hello", config=config)
    assert "mock" in r.text and r.usage_metadata.candidates_token_count == 12
    assert r.candidates[0].finish_reason == gtypes.FinishReason.STOP
    chunks = [c async for c in await client.aio.models.generate_content_stream(model=model, contents="hello", config=config)]
    assert "mock" in "".join(c.text or "" for c in chunks)
    assert chunks[-1].candidates[0].finish_reason == gtypes.FinishReason.STOP
    assert all(c.usage_metadata.prompt_token_count > 0 for c in chunks)
    assert chunks[-1].usage_metadata.candidates_token_count == 12
    recs = await gw.wait_records(2)
    assert all(not r.estimated and r.completion_tokens == 12 for r in recs)


@pytest.mark.parametrize("model,path", [("mock-gpt", "/v1/chat/completions"), ("mock-claude", "/v1/messages")])
@pytest.mark.parametrize("stream", [False, True])
async def test_genai_client_tool_loop_on_other_upstreams(gateway, model, path, stream):
    gw = await gateway()
    client = _genai(gw)
    contents: list = [gtypes.Content(role="user", parts=[gtypes.Part(text="weather in Paris and Oslo, parallel")])]
    config = gtypes.GenerateContentConfig(tools=[GEMINI_TOOL])

    async def turn():
        if not stream:
            return (await client.aio.models.generate_content(model=model, contents=contents, config=config)).candidates[0].content
        parts = []
        async for c in await client.aio.models.generate_content_stream(model=model, contents=contents, config=config):
            parts.extend(c.candidates[0].content.parts or [])
        return gtypes.Content(role="model", parts=parts)

    first = await turn()
    calls = [p.function_call for p in first.parts if p.function_call]
    assert len(calls) == 2 and all(c.args == {"location": "San Francisco, CA", "unit": "celsius"} for c in calls)
    contents.append(first)
    contents.append(gtypes.Content(role="user", parts=[
        gtypes.Part(function_response=gtypes.FunctionResponse(name=c.name, id=c.id, response={"output": "21 C"})) for c in calls
    ]))
    second = await turn()
    assert "mock" in "".join(p.text or "" for p in second.parts)
    sent = _last_body(gw, path)
    assert "get_weather" in orjson.dumps(sent).decode()


@pytest.mark.parametrize("stream", [False, True])
async def test_gemini_cli_style_thinking_tool_loop_on_chat_upstream(gateway, stream):
    """Gemini CLI keeps no thought parts in the history it sends back, only the function
    calls as they came: the thinking a DeepSeek-style chat upstream requires back
    (reasoning_content, P28) rides on the first call's id, and the next turn has it."""
    gw = await gateway()
    client = _genai(gw)
    contents: list = [gtypes.Content(role="user", parts=[gtypes.Part(text="weather in Paris and Oslo, parallel")])]
    config = gtypes.GenerateContentConfig(
        tools=[GEMINI_TOOL], thinking_config=gtypes.ThinkingConfig(include_thoughts=True, thinking_budget=1024))

    async def turn():
        if not stream:
            return (await client.aio.models.generate_content(model="mock-gpt", contents=contents, config=config)).candidates[0].content
        parts = []
        async for c in await client.aio.models.generate_content_stream(model="mock-gpt", contents=contents, config=config):
            parts.extend(c.candidates[0].content.parts or [])
        return gtypes.Content(role="model", parts=parts)

    first = await turn()
    assert any(p.thought for p in first.parts)
    calls = [p.function_call for p in first.parts if p.function_call]
    assert len(calls) == 2
    contents.append(gtypes.Content(role="model", parts=[p for p in first.parts if not p.thought]))
    contents.append(gtypes.Content(role="user", parts=[
        gtypes.Part(function_response=gtypes.FunctionResponse(name=c.name, id=c.id, response={"output": "21 C"})) for c in calls
    ]))
    second = await turn()
    assert "mock" in "".join(p.text or "" for p in second.parts if not p.thought)
    assistant = next(m for m in _last_body(gw, "/v1/chat/completions")["messages"] if m["role"] == "assistant")
    assert assistant["reasoning_content"] == "The user wants the weather, so I call the tool."
    assert [c["id"] for c in assistant["tool_calls"]] == [c.id.split("_lpx1_")[0] for c in calls]


LOOSE_SCHEMA_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
                   "properties": {"location": {"type": ["string", "null"]}, "unit": {"const": "c"},
                                  "opts": {"$ref": "#/$defs/Opts"}},
                   "required": ["location", "missing"], "$defs": {"Opts": {"type": "object", "propertyNames": {"pattern": "x"}}}},
}}


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_client_on_gemini_upstream_signature_round_trip(gateway, stream):
    """P4/P6/P19: Claude-Code-like schemas are narrowed to Gemini's subset; the signature on
    the first parallel call comes back on that same call, the second call has none."""
    gw = await gateway()
    messages: list = [{"role": "user", "content": "weather in two cities, parallel"}]
    kw = dict(model="mock-gemini", tools=[LOOSE_SCHEMA_TOOL], reasoning_effort="low")
    async with _openai(gw) as client:
        if stream:
            got = await client.chat.completions.create(messages=messages, stream=True, **kw)
            calls: dict[int, dict] = {}
            async for c in got:
                for tc in c.choices[0].delta.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": ""}})
                    slot["function"]["arguments"] += tc.function.arguments or ""
            msg = {"role": "assistant", "content": None, "tool_calls": [calls[k] for k in sorted(calls)]}
        else:
            msg = (await client.chat.completions.create(messages=messages, **kw)).choices[0].message.model_dump(exclude_none=True)
        assert len(msg["tool_calls"]) == 2
        messages.append(msg)
        messages.extend({"role": "tool", "tool_call_id": c["id"], "content": "21 C"} for c in msg["tool_calls"])
        second = await client.chat.completions.create(messages=messages, **kw)
    assert "mock" in second.choices[0].message.content
    sent = _last_body(gw, "/v1beta/models/mock-gemini:generateContent")
    model_turn = sent["contents"][1]
    calls_sent = [p for p in model_turn["parts"] if "functionCall" in p]
    from proxy.mock_checks import thinking_signature
    assert calls_sent[0]["thoughtSignature"] == thinking_signature("get_weather")
    assert "thoughtSignature" not in calls_sent[1]
    answers = sent["contents"][2]["parts"]
    assert [a["functionResponse"]["name"] for a in answers] == ["get_weather", "get_weather"]
    params = sent["tools"][0]["functionDeclarations"][0]["parameters"]
    assert params["properties"]["location"] == {"type": "string", "nullable": True}
    assert params["properties"]["unit"] == {"enum": ["c"], "type": "string"} and params["required"] == ["location"]


async def test_anthropic_client_on_gemini_upstream_tool_loop(gateway):
    gw = await gateway()
    messages: list = [{"role": "user", "content": "weather? parallel"}]
    kw = dict(model="mock-gemini", max_tokens=3000, tools=[WEATHER_TOOL], thinking={"type": "enabled", "budget_tokens": 1024})
    async with _anthropic(gw) as client:
        async with client.messages.stream(messages=messages, **kw) as s:
            first = await s.get_final_message()
        assert [b.type for b in first.content] == ["thinking", "tool_use", "tool_use"]
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id, "content": "21 C"}
                                                     for b in first.content[1:]]})
        second = await client.messages.create(messages=messages, **kw)
    # The text, then the signature-only thinking block carrying its thoughtSignature.
    assert [b.type for b in second.content] == ["text", "thinking"]
    sent = _last_body(gw, "/v1beta/models/mock-gemini:generateContent")
    from proxy.mock_checks import thinking_signature
    parts = sent["contents"][1]["parts"]
    assert [p.get("thoughtSignature") for p in parts if "functionCall" in p] == [thinking_signature("get_weather"), None]


# ---------------------------------------------------------------------- errors and cuts, in the caller's shape

from tests._gateway import Reply  # noqa: E402

CHAT_CHUNKS = [
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]


async def test_upstream_errors_reach_each_sdk_in_its_own_shape(gateway):
    import openai
    gw = await gateway()
    rate = Reply(status=429, headers={"Content-Type": "application/json", "Retry-After": "3"},
                 chunks=[b'{"error":{"message":"Rate limit reached for gpt","type":"requests","param":null,"code":"rate_limit_exceeded"}}'])
    too_long = Reply(status=400, headers={"Content-Type": "application/json"},
                     chunks=[b'{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 300000 tokens > 200000 maximum"}}'])
    gw.upstream.script(rate, too_long, rate)
    async with _anthropic(gw) as client:
        with pytest.raises(anthropic.RateLimitError) as err:
            await client.messages.create(model="up-gpt", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert "Rate limit reached" in err.value.message and err.value.response.headers["retry-after"] == "3"
    async with _openai(gw) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="up-claude", messages=[{"role": "user", "content": "x"}])
        assert err.value.code == "context_length_exceeded" and "prompt is too long" in err.value.message
    with pytest.raises(genai.errors.APIError) as err:
        await _genai(gw).aio.models.generate_content(model="up-gpt", contents="x")
    assert err.value.code == 429 and err.value.status == "RESOURCE_EXHAUSTED"
    recs = await gw.wait_records(3)
    assert sorted(r.status for r in recs) == [400, 429, 429]


@pytest.mark.parametrize("client_kind", ["anthropic", "responses", "gemini"])
async def test_midstream_cut_raises_in_each_sdk(gateway, client_kind):
    import openai
    gw = await gateway()
    gw.upstream.script(Reply(chunks=CHAT_CHUNKS, cut_after=2))
    model = "up-chatonly"
    with pytest.raises(Exception) as err:
        if client_kind == "anthropic":
            async with _anthropic(gw) as client:
                async with client.messages.stream(model=model, max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
                    await s.get_final_message()
        elif client_kind == "responses":
            async with _openai(gw) as client:
                async with client.responses.stream(model=model, input="x") as s:
                    await s.get_final_response()
        else:
            async for _ in await _genai(gw).aio.models.generate_content_stream(model=model, contents="x"):
                pass
    expected = {"anthropic": anthropic.APIError, "responses": openai.APIError, "gemini": genai.errors.APIError}[client_kind]
    assert isinstance(err.value, expected), repr(err.value)
    rec = (await gw.wait_records(1))[0]
    assert rec.outcome == "upstream_error" and rec.estimated


async def test_translated_stream_is_incremental(gateway):
    """P33: the first client event leaves before the upstream finishes."""
    import asyncio
    gw = await gateway()
    release = asyncio.Event()
    gw.upstream.script(Reply(chunks=CHAT_CHUNKS, wait_for=release))
    body = {"model": "up-gpt", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": gw.key}) as r:
            first = await r.content.readuntil(b"\n\n")
            assert first.startswith(b"event: message_start")
            for _ in range(len(CHAT_CHUNKS)):
                release.set()
                await asyncio.sleep(0)
            rest = await r.read()
    assert rest.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


# ---------------------------------------------------------------------- structured output

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}


async def test_structured_output_crosses_dialects(gateway):
    gw = await gateway()
    async with _openai(gw) as client:
        await client.chat.completions.create(model="mock-claude", messages=[{"role": "user", "content": "x"}],
                                             response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
    assert _last_body(gw, "/v1/messages")["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    async with _openai(gw) as client:
        await client.chat.completions.create(model="mock-gemini", messages=[{"role": "user", "content": "x"}],
                                             response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
    gen = _last_body(gw, "/v1beta/models/mock-gemini:generateContent")["generationConfig"]
    assert gen["responseMimeType"] == "application/json" and "additionalProperties" not in gen["responseSchema"]
    async with _anthropic(gw) as client:
        await client.messages.create(model="mock-gpt", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                                     extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}})
    assert _last_body(gw, "/v1/chat/completions")["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    await _genai(gw).aio.models.generate_content(model="mock-gpt", contents="x", config=gtypes.GenerateContentConfig(
        response_mime_type="application/json", response_schema={"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}))
    assert _last_body(gw, "/v1/chat/completions")["response_format"]["json_schema"]["schema"]["properties"] == {"city": {"type": "string"}}


async def test_untranslatable_is_a_400_in_the_callers_shape(gateway):
    import openai
    gw = await gateway()
    async with _openai(gw) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="mock-claude", n=2, messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "untranslatable" and "'n'" in err.value.message and "mock-anthropic" in err.value.message
    async with _anthropic(gw) as client:
        with pytest.raises(anthropic.BadRequestError) as err2:
            await client.messages.create(model="mock-gpt", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                         tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "web_search_20250305" in err2.value.message
    assert gw.mock_stats[__import__("proxy.mock_upstream", fromlist=["x"]).mock_stats].total == 0
    assert await gw.records() == []   # refused before any upstream: no record of an attempt


# ---------------------------------------------------------------------- Cursor's quirks (issue 22, item 8)


@pytest.mark.parametrize("model,path", [("mock-gpt", "/v1/chat/completions"), ("mock-claude", "/v1/messages"),
                                        ("mock-gemini", "/v1beta/models/mock-gemini:generateContent")])
@pytest.mark.parametrize("stream", [False, True])
async def test_cursor_responses_shaped_body_on_the_chat_route(gateway, model, path, stream):
    """P24: `input`/`instructions`/`reasoning`/`include` on /v1/chat/completions, Chat chunks back."""
    import openai
    gw = await gateway()
    body = {"model": model, "instructions": "be brief", "stream": stream, "reasoning": {"effort": "low"},
            "include": ["reasoning.encrypted_content"], "store": False,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}]}
    async with _openai(gw) as client:
        if stream:
            got = await client.chat.completions.create(model=model, messages=[], stream=True, extra_body=body)
            text = "".join([c.choices[0].delta.content or "" async for c in got if c.choices])
        else:
            resp = await client.chat.completions.create(model=model, messages=[], extra_body=body)
            text = resp.choices[0].message.content
    assert "mock" in text
    sent = orjson.dumps(_last_body(gw, path if not stream or "gemini" not in model else path.replace("generateContent", "streamGenerateContent"))).decode()
    assert "be brief" in sent and "hello" in sent


@pytest.mark.parametrize("model,path", [("mock-claude", "/v1/messages"), ("mock-gemini", "/v1beta/models/mock-gemini:generateContent")])
async def test_cursor_anthropic_flavoured_chat_body(gateway, model, path):
    import openai
    gw = await gateway()
    async with _openai(gw) as client:
        resp = await client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": [{"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}]},
                      {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
            tools=[{**OPENAI_TOOL, "cache_control": {"type": "ephemeral"}}],
            tool_choice={"type": "auto"})   # Cursor's Anthropic-style tool_choice
    assert "mock" in resp.choices[0].message.content
    sent = _last_body(gw, path)
    if model == "mock-claude":   # kept where the upstream honours it (P34)
        assert sent["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert sent["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
        assert sent["tools"][0]["cache_control"] == {"type": "ephemeral"}
        assert sent["tool_choice"] == {"type": "auto"}
    else:
        assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}


async def test_cursor_verify_lists_models_of_every_protocol(gateway):
    import openai
    gw = await gateway()
    async with _openai(gw) as client:
        ids = [m.id async for m in client.models.list()]
    assert {"mock-gpt", "mock-claude", "mock-gemini"} <= set(ids)
