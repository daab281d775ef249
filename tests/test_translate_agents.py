"""Agent-style tool loops across dialects, where a peer gateway's translation breaks:
tool names one upstream refuses (P20, P39), Gemini's thoughtSignature on text parts,
and Gemini's JSON-array stream (no `alt=sse`) as a translated client surface.

The official SDKs are the clients and the built-in mock is the upstream; the mock
refuses what the real API refuses (proxy/mock_checks.py: function names per protocol, a
forced tool that is not in the list, a signature that is not the one it issued), so
a translation mistake fails here."""

from __future__ import annotations

import anthropic
import openai
import orjson
import pytest
from google import genai
from google.genai import types as gtypes

from proxy.mock_checks import thinking_signature
from proxy.mock_upstream import mock_stats
from proxy.translate.names import short_name
from tests._gateway import gateway, scripted_upstream  # noqa: F401

# Claude Code names MCP tools mcp__<plugin>_<server>__<tool>: this one is 78 characters,
# over the 64 OpenAI and Gemini take.
MCP_NAME = "mcp__plugin_weather-tools-plugin_forecasts__get_weather_forecast_for_location"
GEMINI_NAME = "weather.lookup:city"         # valid for Gemini only (dots and colons)
DIGIT_NAME = "7day_weather_forecast"        # valid for OpenAI, refused by Gemini (first character)
SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}


def _last_body(gw, path: str) -> dict:
    got = [r for r in gw.mock_stats[mock_stats].recent if r.path == path]
    return orjson.loads(got[-1].body)


def _anthropic(gw):
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def _openai(gw):
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)


def _genai(gw):
    return genai.Client(api_key=gw.key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))


# ---------------------------------------------------------------------- tool names (P20, P39)


@pytest.mark.parametrize("model,path,tools_of,name_of", [
    ("mock-gpt", "/v1/chat/completions", lambda b: [t["function"]["name"] for t in b["tools"]],
     lambda b: [c["function"]["name"] for m in b["messages"] for c in m.get("tool_calls") or []]),
    ("mock-gemini", "/v1beta/models/mock-gemini:generateContent",
     lambda b: [d["name"] for d in b["tools"][0]["functionDeclarations"]],
     lambda b: [p["functionCall"]["name"] for c in b["contents"] for p in c["parts"] if "functionCall" in p]),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_claude_code_mcp_tool_names_over_64_on_other_upstreams(gateway, model, path, tools_of, name_of, stream):
    """Claude Code's long MCP name, forced by tool_choice: the upstream sees one valid short
    form in the tools, the tool choice and the replayed history; the client only its own."""
    gw = await gateway()
    tools = [{"name": MCP_NAME, "description": "Forecast", "input_schema": SCHEMA},
             {"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {}}}]
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=model, max_tokens=500, tools=tools, tool_choice={"type": "tool", "name": MCP_NAME})

    async def turn(client):
        if stream:
            async with client.messages.stream(messages=messages, **kw) as s:
                return await s.get_final_message()
        return await client.messages.create(messages=messages, **kw)

    async with _anthropic(gw) as client:
        first = await turn(client)
        uses = [b for b in first.content if b.type == "tool_use"]
        assert [u.name for u in uses] == [MCP_NAME] and first.stop_reason == "tool_use"
        sent = _last_body(gw, path.replace("generateContent", "streamGenerateContent") if stream else path)
        short = tools_of(sent)[0]
        assert short == short_name(MCP_NAME) and len(short) <= 64 and tools_of(sent)[1] == "Read"
        assert MCP_NAME not in orjson.dumps(sent).decode()
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "21 C"} for u in uses]})
        second = await turn(client)
    assert second.content[-1].type == "text"
    sent = _last_body(gw, path.replace("generateContent", "streamGenerateContent") if stream else path)
    assert name_of(sent) == [short]   # the same short form on the next turn's history
    recs = await gw.wait_records(2)
    assert [r.status for r in recs] == [200, 200]


@pytest.mark.parametrize("model,path", [("mock-gpt", "/v1/chat/completions"), ("mock-claude", "/v1/messages")])
@pytest.mark.parametrize("stream", [False, True])
async def test_gemini_client_dotted_tool_names_on_openai_and_anthropic(gateway, model, path, stream):
    """A Gemini client's `weather.lookup:city` is refused by OpenAI and Anthropic: mapped
    there, restored in the functionCall google-genai reads, and mapped again in turn 2."""
    gw = await gateway()
    client = _genai(gw)
    tool = gtypes.Tool(function_declarations=[gtypes.FunctionDeclaration(
        name=GEMINI_NAME, description="Weather", parameters=gtypes.Schema(
            type="OBJECT", properties={"location": gtypes.Schema(type="STRING")}, required=["location"]))])
    config = gtypes.GenerateContentConfig(tools=[tool], automatic_function_calling=gtypes.AutomaticFunctionCallingConfig(disable=True))
    contents: list = [gtypes.Content(role="user", parts=[gtypes.Part(text="weather in Paris and Rome? parallel")])]

    async def turn():
        if stream:
            parts = []
            async for c in await client.aio.models.generate_content_stream(model=model, contents=contents, config=config):
                parts.extend(c.candidates[0].content.parts or [])
            return parts
        r = await client.aio.models.generate_content(model=model, contents=contents, config=config)
        return r.candidates[0].content.parts

    parts = await turn()
    calls = [p.function_call for p in parts if p.function_call]
    assert [c.name for c in calls] == [GEMINI_NAME, GEMINI_NAME]
    sent = _last_body(gw, path)
    short = sent["tools"][0]["function"]["name"] if "function" in sent["tools"][0] else sent["tools"][0]["name"]
    assert short == short_name(GEMINI_NAME)
    contents.append(gtypes.Content(role="model", parts=parts))
    contents.append(gtypes.Content(role="user", parts=[
        gtypes.Part(function_response=gtypes.FunctionResponse(name=c.name, id=c.id, response={"output": "21 C"})) for c in calls]))
    second = await turn()
    assert "mock" in "".join(p.text or "" for p in second)
    dumped = orjson.dumps(_last_body(gw, path)).decode()
    assert GEMINI_NAME not in dumped and dumped.count(short) >= 3   # the tool, and both calls of the history


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_name_starting_with_a_digit_on_gemini_with_signatures(gateway, stream):
    """Gemini refuses a function name that starts with a digit; its signature is issued for
    the short form, which comes back the same next turn, so the signature stays valid."""
    gw = await gateway()
    tool = {"type": "function", "function": {"name": DIGIT_NAME, "description": "Forecast", "parameters": SCHEMA}}
    messages: list = [{"role": "user", "content": "weather in Oslo?"}]
    kw = dict(model="mock-gemini", tools=[tool], reasoning_effort="low",
              tool_choice={"type": "function", "function": {"name": DIGIT_NAME}})
    async with _openai(gw) as client:
        if stream:
            calls: dict[int, dict] = {}
            async for c in await client.chat.completions.create(messages=messages, stream=True, **kw):
                for tc in c.choices[0].delta.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"id": tc.id, "type": "function",
                                                       "function": {"name": tc.function.name, "arguments": ""}})
                    slot["function"]["arguments"] += tc.function.arguments or ""
            msg = {"role": "assistant", "content": None, "tool_calls": [calls[k] for k in sorted(calls)]}
        else:
            msg = (await client.chat.completions.create(messages=messages, **kw)).choices[0].message.model_dump(exclude_none=True)
        assert [c["function"]["name"] for c in msg["tool_calls"]] == [DIGIT_NAME]
        messages.append(msg)
        messages.append({"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "3 C"})
        second = await client.chat.completions.create(messages=messages, **kw)
    assert "mock" in second.choices[0].message.content
    sent = _last_body(gw, "/v1beta/models/mock-gemini:generateContent")
    short = short_name(DIGIT_NAME)
    assert sent["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"] == [short]
    call = next(p for p in sent["contents"][1]["parts"] if "functionCall" in p)
    assert call["functionCall"]["name"] == short and call["thoughtSignature"] == thinking_signature(short)
    assert sent["contents"][2]["parts"][0]["functionResponse"]["name"] == short


# ---------------------------------------------------------------------- Gemini signatures on text parts


@pytest.mark.parametrize("stream", [False, True])
async def test_gemini_text_signature_comes_back_from_an_anthropic_client(gateway, stream):
    """Gemini signs a text-only turn on its text (streamed: on a trailing empty part). An
    Anthropic client has no slot on text: a signature-only thinking block after the text
    carries it, and turn 2 puts it back on the text part, intact."""
    gw = await gateway()
    messages: list = [{"role": "user", "content": "hello"}]
    kw = dict(model="mock-gemini", max_tokens=3000, thinking={"type": "enabled", "budget_tokens": 1024})
    async with _anthropic(gw) as client:
        if stream:
            async with client.messages.stream(messages=messages, **kw) as s:
                first = await s.get_final_message()
        else:
            first = await client.messages.create(messages=messages, **kw)
        assert [b.type for b in first.content] == ["text", "thinking"]
        text = first.content[0].text
        assert first.content[1].signature.startswith("lpx1.gemini+text.")
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
        messages.append({"role": "user", "content": "and tomorrow?"})
        await client.messages.create(messages=messages, **kw)
    sent = _last_body(gw, "/v1beta/models/mock-gemini:generateContent")
    assert sent["contents"][1] == {"role": "model", "parts": [{"text": text, "thoughtSignature": thinking_signature(text)}]}


@pytest.mark.parametrize("stream", [False, True])
async def test_gemini_text_signature_comes_back_from_a_responses_client(gateway, stream):
    """Codex-style (store false, the full history back): the text's signature rides on a
    reasoning item's encrypted_content after the message, and returns to the text."""
    gw = await gateway()
    history: list = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}]
    kw = dict(model="mock-gemini", store=False, include=["reasoning.encrypted_content"], reasoning={"effort": "low"})
    async with _openai(gw) as client:
        if stream:
            async with client.responses.stream(input=history, **kw) as s:
                first = await s.get_final_response()
        else:
            first = await client.responses.create(input=history, **kw)
        assert [item.type for item in first.output] == ["message", "reasoning"]
        text = first.output_text
        assert first.output[1].encrypted_content.startswith("lpx1.gemini+text.")
        history.extend(item.model_dump(exclude_none=True) for item in first.output)
        history.append({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and tomorrow?"}]})
        await client.responses.create(input=history, **kw)
    sent = _last_body(gw, "/v1beta/models/mock-gemini:generateContent")
    assert sent["contents"][1] == {"role": "model", "parts": [{"text": text, "thoughtSignature": thinking_signature(text)}]}


# ---------------------------------------------------------------------- P4 for Responses clients


@pytest.mark.parametrize("stream", [False, True])
async def test_codex_tool_loop_on_gemini_keeps_the_call_signature(gateway, stream):
    """P4 for a Responses client: a call_id (≤ 64) cannot hold Gemini's signature, so a
    reasoning item right before the call carries it; turn 2 puts it back on that call
    (not the skip value), and the second parallel call still has none (P6)."""
    gw = await gateway()
    tools = [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": SCHEMA}]
    history: list = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather in two cities? parallel"}]}]
    kw = dict(model="mock-gemini", tools=tools, store=False, include=["reasoning.encrypted_content"], reasoning={"effort": "low"})

    async def turn(client):
        if stream:
            async with client.responses.stream(input=history, **kw) as s:
                return await s.get_final_response()
        return await client.responses.create(input=history, **kw)

    async with _openai(gw) as client:
        first = await turn(client)
        assert [i.type for i in first.output] == ["reasoning", "reasoning", "function_call", "function_call"]
        assert first.output[1].encrypted_content.startswith("lpx1.gemini+call.")
        calls = first.output[2:]
        history.extend(item.model_dump(exclude_none=True) for item in first.output)
        history.extend({"type": "function_call_output", "call_id": c.call_id, "output": "21 C"} for c in calls)
        second = await turn(client)
    assert "mock" in second.output_text
    sent = _last_body(gw, "/v1beta/models/mock-gemini:" + ("streamGenerateContent" if stream else "generateContent"))
    parts = [p for p in sent["contents"][1]["parts"] if "functionCall" in p]
    assert [p.get("thoughtSignature") for p in parts] == [thinking_signature("get_weather"), None]


# ---------------------------------------------------------------------- Gemini's JSON-array stream (no alt=sse)

import asyncio  # noqa: E402

import aiohttp  # noqa: E402

from tests._gateway import Reply  # noqa: E402


def _chat_chunk(delta: dict, finish: str | None = None) -> bytes:
    doc = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


CHAT_STREAM = [_chat_chunk({"role": "assistant", "content": ""}), _chat_chunk({"content": "Hel"}),
               _chat_chunk({"content": "lo"}), _chat_chunk({}, "stop"), b"data: [DONE]\n\n"]


async def _read_element(r: aiohttp.ClientResponse, buf: bytes) -> bytes:
    """Bytes until they hold a whole array element (the opening `[` or `,` first)."""
    while True:
        try:
            orjson.loads(buf.lstrip(b"[,\r\n"))
            return buf
        except orjson.JSONDecodeError:
            more = await asyncio.wait_for(r.content.readany(), 5)
            assert more, buf
            buf += more


async def test_gemini_json_array_stream_is_translated_incrementally(gateway):
    """streamGenerateContent without alt=sse on a chat-protocol model: the array opens
    with the first element, which leaves before the upstream's next event; the rest
    follow as they are decided, and `]` closes it at the end."""
    gw = await gateway()
    release = asyncio.Event()
    release.set()   # the role chunk and "Hel" go at once; each later chunk waits for a set
    gw.upstream.script(Reply(chunks=CHAT_STREAM, wait_for=release))
    url = gw.url + "/v1beta/models/up-gpt:streamGenerateContent"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"contents": [{"role": "user", "parts": [{"text": "x"}]}]},
                          headers={"x-goog-api-key": gw.key}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
            first = await _read_element(r, b"")
            assert first.startswith(b"[") and not first.rstrip().endswith(b"]")
            assert orjson.loads(first[1:])["candidates"][0]["content"]["parts"] == [{"text": "Hel"}]
            for _ in range(len(CHAT_STREAM)):
                release.set()
                await asyncio.sleep(0)
            rest = await r.read()
    items = orjson.loads(first + rest)
    assert "".join(p["text"] for i in items for p in i["candidates"][0]["content"]["parts"]) == "Hello"
    assert [i["candidates"][0].get("finishReason") for i in items][-1] == "STOP"
    assert not any(i["candidates"][0].get("finishReason") for i in items[:-1])
    rec = (await gw.wait_records(1))[0]
    assert rec.status == 200 and rec.stream and (rec.client_dialect, rec.upstream_protocol) == ("gemini", "openai")


async def test_gemini_json_array_stream_cut_mid_way_ends_with_an_error_element(gateway):
    """An upstream cut after the array opened: the gateway's error closes the array as
    one more element (`{"error": ...}` first key), so the body stays one JSON document."""
    gw = await gateway()
    gw.upstream.script(Reply(chunks=CHAT_STREAM, cut_after=2))
    url = gw.url + "/v1beta/models/up-gpt:streamGenerateContent"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"contents": [{"role": "user", "parts": [{"text": "x"}]}]},
                          headers={"x-goog-api-key": gw.key}) as r:
            assert r.status == 200
            body = await r.read()
    items = orjson.loads(body)
    assert items[0]["candidates"][0]["content"]["parts"] == [{"text": "Hel"}]
    assert list(items[-1]) == ["error"] and items[-1]["error"]["code"] >= 500
    rec = (await gw.wait_records(1))[0]
    assert rec.outcome == "upstream_error"


@pytest.mark.parametrize("model", ["mock-gpt", "mock-claude"])
async def test_gemini_json_array_stream_on_the_mock_of_each_protocol(gateway, model):
    gw = await gateway()
    url = gw.url + f"/v1beta/models/{model}:streamGenerateContent"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"contents": [{"role": "user", "parts": [{"text": "hello"}]}],
                                     "systemInstruction": {"parts": [{"text": "be brief"}]}},
                          headers={"x-goog-api-key": gw.key}) as r:
            assert r.headers["Content-Type"].startswith("application/json")
            items = orjson.loads(await r.read())
    assert "mock" in "".join(p.get("text", "") for i in items for p in i["candidates"][0]["content"]["parts"])
    assert items[-1]["candidates"][0]["finishReason"] == "STOP" and items[-1]["usageMetadata"]["candidatesTokenCount"] == 12
    rec = (await gw.wait_records(1))[0]
    assert rec.completion_tokens == 12 and not rec.estimated
