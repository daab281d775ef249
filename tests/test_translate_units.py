"""The translators without sockets: the shared vectors replayed through every
translation, the peers' bugs (TRANSLATION.md §6) as cases, and property tests that no
valid input makes a translator raise."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.vectors.load_vector import load
from proxy.config import UpstreamConfig
from proxy.translate import CLIENT_CODECS, UPSTREAM_CODECS, Codec, translation_for
from proxy.translate import anthropic as anth
from proxy.translate import carrier, gemini
from proxy.translate.common import ClientContext, UpstreamOptions
from proxy.translate.hub import BadInput, Untranslatable
from proxy.translate.names import short_name

pytestmark = pytest.mark.fast

UPSTREAMS = {p: UpstreamConfig(f"up-{p}", "http://x", p, "k", responses=False) for p in ("openai", "anthropic", "gemini")}
CLIENT_ENDPOINTS = ["chat.completions", "responses", "messages", "streamGenerateContent"]
STREAM_VECTORS = {
    "openai": ["chat_stream_text_with_usage.sse", "chat_stream_tool_call.sse", "chat_stream_parallel_tool_calls.sse",
               "chat_stream_refusal.sse", "chat_stream_finish_length.sse"],
    "anthropic": ["messages_stream_basic_text.sse", "messages_stream_tool_use.sse", "docs_messages_stream_tool_use.sse",
                  "docs_messages_stream_thinking.sse", "docs_messages_stream_error_event.sse", "docs_messages_stream_basic.sse"],
    "gemini": ["stream_text_usage_short.sse", "stream_function_call_thought_signature.sse", "stream_prompt_blocked.sse"],
}
BODY_VECTORS = {
    "openai": ["chat_completion_text.json", "chat_completion_tool_call.json", "chat_completion_finish_length.json",
               "docs_chat_completion_default.json"],
    "anthropic": ["messages_response_text.json"],
    "gemini": ["generate_content_text.json", "generate_content_function_call_thinking.json"],
}
VECTOR_DIR = {"openai": "openai", "anthropic": "anthropic", "gemini": "gemini"}


def _translated_stream(endpoint: str, protocol: str, payload: bytes, size: int = 7, include_usage: bool = True,
                       query: str = "alt=sse") -> bytes:
    translation = translation_for(endpoint, UPSTREAMS[protocol])
    assert translation is not None
    translation._include_usage = include_usage
    relay = translation.stream(translation.context("alias", True, 42, query))
    out = b"".join(relay.feed(payload[i:i + size]) for i in range(0, len(payload), size))
    return out + relay.flush()


def _events(out: bytes) -> list[tuple[str | None, Any]]:
    found = []
    for raw in out.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not raw.strip():
            continue
        name = None
        data = b""
        for line in raw.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        found.append((name, data.decode() if data == b"[DONE]" else orjson.loads(data)))
    return found


# --------------------------------------------------------------------------- client grammars


def check_anthropic_stream(events: list[tuple[str | None, Any]]) -> None:
    if events[0][0] == "error":
        assert len(events) == 1
        return
    assert events[0][0] == "message_start"
    usage = events[0][1]["message"]["usage"]
    assert usage["input_tokens"] > 0 and isinstance(usage["cache_read_input_tokens"], int)   # P11, P12
    started: set[int] = set()
    stopped: set[int] = set()
    for name, doc in events[1:]:
        assert doc["type"] == name
        if name == "content_block_start":
            assert doc["index"] == len(started) and doc["index"] not in started   # P9
            started.add(doc["index"])
        elif name == "content_block_delta":
            assert doc["index"] in started and doc["index"] not in stopped       # P10
        elif name == "content_block_stop":
            assert doc["index"] in started and doc["index"] not in stopped
            stopped.add(doc["index"])
    last = events[-1][0]
    assert last in ("message_stop", "error")
    if last == "message_stop":
        assert events[-2][0] == "message_delta" and "output_tokens" in events[-2][1]["usage"]
        assert started == stopped


def check_chat_stream(events: list[tuple[str | None, Any]]) -> None:
    assert all(name is None for name, _ in events)
    if "error" in events[0][1]:
        assert len(events) == 1
        return
    assert events[0][1]["choices"][0]["delta"]["role"] == "assistant"
    if "error" in events[-1][1]:
        return
    assert events[-1][1] == "[DONE]"
    finishes = [c["finish_reason"] for _, d in events[:-1] for c in d["choices"] if c["finish_reason"]]
    assert len(finishes) == 1
    seen: dict[int, bool] = {}
    for _, doc in events[:-1]:
        for choice in doc["choices"]:
            for call in choice["delta"].get("tool_calls") or []:
                if call["index"] not in seen:
                    assert call["index"] == len(seen) and call["id"] and call["function"]["name"]   # P8
                    seen[call["index"]] = True


def check_responses_stream(events: list[tuple[str | None, Any]]) -> None:
    assert [doc["sequence_number"] for _, doc in events] == list(range(len(events)))
    if events[0][0] == "error":
        assert len(events) == 1
        return
    assert events[0][0] == "response.created" and events[1][0] == "response.in_progress"
    assert events[-1][0] in ("response.completed", "response.incomplete", "error")
    added = [d["output_index"] for n, d in events if n == "response.output_item.added"]
    done = [d["output_index"] for n, d in events if n == "response.output_item.done"]
    assert added == list(range(len(added)))
    if events[-1][0] != "error":
        assert done == added and len(events[-1][1]["response"]["output"]) >= len(done)


def check_gemini_stream(events: list[tuple[str | None, Any]]) -> None:
    docs = [doc for _, doc in events]
    if "error" in docs[-1]:
        assert next(iter(docs[-1])) == "error"
        return
    finishes = [d["candidates"][0].get("finishReason") for d in docs]
    assert finishes[-1] and not any(finishes[:-1])                 # P31
    assert all(d["usageMetadata"]["promptTokenCount"] > 0 for d in docs)


CHECKS = {"messages": check_anthropic_stream, "chat.completions": check_chat_stream,
          "responses": check_responses_stream, "streamGenerateContent": check_gemini_stream}


def _pairs(vectors: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """(client endpoint, upstream protocol, vector) for every pair that is translated."""
    return [(e, p, n) for e in CLIENT_ENDPOINTS for p, names in vectors.items() for n in names
            if translation_for(e, UPSTREAMS[p]) is not None]


@pytest.mark.parametrize("endpoint,protocol,name", _pairs(STREAM_VECTORS))
def test_stream_vectors_through_every_translation(endpoint, protocol, name):
    _, payload = load(f"{VECTOR_DIR[protocol]}/{name}")
    for size in (1, 7, len(payload)):
        CHECKS[endpoint](_events(_translated_stream(endpoint, protocol, payload, size)))


@pytest.mark.parametrize("protocol,name", [(p, n) for _, p, n in _pairs(STREAM_VECTORS) if _ == "streamGenerateContent"])
def test_stream_vectors_as_gemini_json_arrays(protocol, name):
    """streamGenerateContent without alt=sse: one JSON array, whatever the cut points."""
    _, payload = load(f"{VECTOR_DIR[protocol]}/{name}")
    for size in (1, 7, len(payload)):
        out = _translated_stream("streamGenerateContent", protocol, payload, size, query="")
        items = orjson.loads(out)
        assert isinstance(items, list) and items
        check_gemini_stream([(None, item) for item in items])


@pytest.mark.parametrize("endpoint,protocol,name", _pairs(BODY_VECTORS))
def test_body_vectors_through_every_translation(endpoint, protocol, name):
    translation = translation_for(endpoint, UPSTREAMS[protocol])
    assert translation is not None
    _, payload = load(f"{VECTOR_DIR[protocol]}/{name}")
    out = orjson.loads(translation.response(payload, ClientContext("alias", False, prompt_estimate=3)))
    assert out


# --------------------------------------------------------------------------- the peers' bugs (TRANSLATION §6)


def test_p8_anthropic_text_then_tool_gives_chat_tool_index_0():
    _, payload = load("anthropic/messages_stream_tool_use.sse")
    events = _events(_translated_stream("chat.completions", "anthropic", payload + b"\n"))
    calls = [c for _, d in events[:-1] for ch in d["choices"] for c in ch["delta"].get("tool_calls") or []]
    assert {c["index"] for c in calls} == {0}
    args = "".join(c["function"].get("arguments", "") for c in calls)
    assert isinstance(orjson.loads(args), dict)


def test_p9_parallel_chat_calls_become_two_anthropic_blocks():
    _, payload = load("openai/chat_stream_parallel_tool_calls.sse")
    events = _events(_translated_stream("messages", "openai", payload))
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["tool_use", "tool_use"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_interleaved_parallel_chat_deltas_are_sequenced_for_anthropic():
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"
    stream = b"".join([
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{\"y\":"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "2}"}}]}),
        chunk({}, "tool_calls"), b"data: [DONE]\n\n",
    ])
    events = _events(_translated_stream("messages", "openai", stream))
    check_anthropic_stream(events)
    args: dict[int, str] = {}
    for name, doc in events:
        if name == "content_block_delta":
            args[doc["index"]] = args.get(doc["index"], "") + doc["delta"]["partial_json"]
    assert args == {0: '{"x":1}', 1: '{"y":2}'}


def test_p29_refusal_is_not_an_empty_stop():
    _, payload = load("openai/chat_stream_refusal.sse")
    events = _events(_translated_stream("messages", "openai", payload))
    assert events[-2][1]["delta"]["stop_reason"] == "refusal"
    _, doc = load("anthropic/messages_response_text.json")
    body = orjson.loads(doc)
    body["stop_reason"] = "refusal"
    out = orjson.loads(translation_for("chat.completions", UPSTREAMS["anthropic"]).response(orjson.dumps(body), ClientContext("m", False)))
    assert out["choices"][0]["finish_reason"] == "content_filter"


def test_p30_p31_gemini_finish_without_content_and_only_on_last_chunk():
    body = {"candidates": [{"finishReason": "MALFORMED_FUNCTION_CALL"}]}
    out = orjson.loads(translation_for("chat.completions", UPSTREAMS["gemini"]).response(orjson.dumps(body), ClientContext("m", False)))
    assert len(out["choices"]) == 1 and "MALFORMED_FUNCTION_CALL" in out["choices"][0]["message"]["content"]
    _, payload = load("gemini/stream_prompt_blocked.sse")
    events = _events(_translated_stream("chat.completions", "gemini", payload))
    assert [c["finish_reason"] for _, d in events[:-1] for c in d["choices"] if c["finish_reason"]] == ["content_filter"]


def test_p32_midstream_cut_becomes_the_client_error_event():
    _, payload = load("openai/chat_stream_text_with_usage.sse")
    cut = payload[: len(payload) // 3]
    for endpoint in ("messages", "responses", "streamGenerateContent"):
        events = _events(_translated_stream(endpoint, "openai", cut))
        name, doc = events[-1]
        assert name == "error" or "error" in doc, (endpoint, events[-1])


def test_p36_anthropic_cache_usage_reaches_chat_and_gemini():
    _, doc = load("anthropic/messages_response_text.json")
    body = orjson.loads(doc)
    body["usage"] = {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5, "output_tokens": 7}
    chat_out = orjson.loads(translation_for("chat.completions", UPSTREAMS["anthropic"]).response(orjson.dumps(body), ClientContext("m", False)))
    assert chat_out["usage"]["prompt_tokens"] == 115 and chat_out["usage"]["prompt_tokens_details"]["cached_tokens"] == 100
    gem_out = orjson.loads(translation_for("generateContent", UPSTREAMS["anthropic"]).response(orjson.dumps(body), ClientContext("m", False)))
    assert gem_out["usageMetadata"]["promptTokenCount"] == 115 and gem_out["usageMetadata"]["cachedContentTokenCount"] == 100


def _to_anthropic(chat_body: dict) -> dict:
    translation = translation_for("chat.completions", UPSTREAMS["anthropic"])
    return orjson.loads(translation.request(chat_body, "claude", False))


def test_p3_p18_p13_chat_history_to_anthropic():
    body = {"model": "x", "messages": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.Bash:0", "type": "function", "function": {"name": "Bash", "arguments": "{\"cmd\":\"ls\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "Bash", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "functions.Bash:0", "content": "a"},
        {"role": "user", "content": "note"},
        {"role": "tool", "tool_call_id": "call_2", "content": "b"},
    ]}
    out = _to_anthropic(body)
    assert "system" not in out
    dumped = orjson.dumps(out).decode()
    assert '"text":""' not in dumped                                    # P3
    assistant, results = out["messages"][1], out["messages"][2]
    assert [b["type"] for b in assistant["content"]] == ["tool_use", "tool_use"]
    ids = [b["id"] for b in assistant["content"]]
    assert ids[0] != "functions.Bash:0" and ids[0] == _to_anthropic(body)["messages"][1]["content"][0]["id"]   # P13: stable
    assert [b.get("tool_use_id") for b in results["content"]] == [*ids, None]                               # P18
    assert results["content"][2] == {"type": "text", "text": "note", "cache_control": {"type": "ephemeral"}}   # P34
    assert assistant["content"][1]["input"] == {}


def test_p34_cursor_cache_control_and_anthropic_tool_choice_on_chat_route():
    body = {"model": "x", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "tool", "name": "f"}}
    out = _to_anthropic(body)
    assert out["system"] == [{"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}]
    assert out["tool_choice"] == {"type": "tool", "name": "f"}


def test_untranslatable_features_are_refused_by_name():
    translation = translation_for("chat.completions", UPSTREAMS["anthropic"])
    for extra, name in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs")):
        with pytest.raises(Exception) as err:
            translation.request({"model": "x", "messages": [{"role": "user", "content": "hi"}], **extra}, "claude", False)
        assert err.value.status == 400 and name in err.value.message and "up-anthropic" in err.value.message
    responses = translation_for("responses", UPSTREAMS["openai"])
    with pytest.raises(Exception) as err:
        responses.request({"model": "x", "input": "hi", "previous_response_id": "resp_1"}, "m", False)
    assert err.value.status == 400 and "previous_response_id" in err.value.message


def test_p16_p17_chat_results_to_gemini_carry_names_and_counts():
    body = {"model": "x", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{k}", "type": "function", "function": {"name": name, "arguments": "{}"}}
            for k, name in enumerate(["read", "read", "write"])]},
        {"role": "tool", "tool_call_id": "c0", "content": "1"},
        {"role": "user", "content": "wait"},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ]}
    out = orjson.loads(translation_for("chat.completions", UPSTREAMS["gemini"]).request(body, "g", False))
    answers = out["contents"][2]["parts"]
    responses = [p["functionResponse"] for p in answers if "functionResponse" in p]
    assert [r["name"] for r in responses] == ["read", "read", "write"]
    assert responses[2]["response"] == {"error": "tool call was cancelled"}
    assert answers[-1] == {"text": "wait"}
    # A history from another provider: Gemini 3's documented skip value (P7).
    assert out["contents"][1]["parts"][0]["thoughtSignature"] == gemini.SKIP_SIGNATURE


def test_p15_gemini_minted_ids_are_distinct_across_turns():
    _, payload = load("gemini/stream_function_call_thought_signature.sse")
    ids = set()
    for _ in range(2):
        events = _events(_translated_stream("messages", "gemini", payload))
        ids |= {d["content_block"]["id"] for n, d in events if n == "content_block_start" and d["content_block"]["type"] == "tool_use"}
    assert len(ids) == 2


def test_p2_signature_only_thinking_survives():
    thinking = [{"type": "thinking", "thinking": "", "signature": "SIG"}]
    body = {"content": [*thinking, {"type": "tool_use", "id": "t1", "name": "f", "input": {}}], "stop_reason": "tool_use",
            "usage": {"input_tokens": 1, "output_tokens": 1}}
    chat = orjson.loads(translation_for("chat.completions", UPSTREAMS["anthropic"]).response(orjson.dumps(body), ClientContext("m", False)))
    call_id = chat["choices"][0]["message"]["tool_calls"][0]["id"]
    original, payload = carrier.split_id(call_id)
    assert original == "t1" and carrier.thinking_from_payload(payload["t"])[0].sig.value == "SIG"
    resp = orjson.loads(translation_for("responses", UPSTREAMS["anthropic"]).response(orjson.dumps(body), ClientContext("m", False)))
    assert resp["output"][0]["encrypted_content"] == "lpx1.anthropic.SIG"


def test_p19_gemini_schema_sanitizer_keeps_only_allowed_keys():
    from proxy.mock_checks import _schema_problem
    schema = {"$schema": "x", "type": "object", "additionalProperties": False, "propertyNames": {"pattern": "a"},
              "properties": {"a": {"type": ["integer", "null"], "exclusiveMinimum": 0, "format": "uri"},
                             "b": {"oneOf": [{"const": 1}, {"type": "string", "examples": ["x"]}]},
                             "c": {"$ref": "#/$defs/C"}, "d": {"allOf": [{"type": "string"}, {"description": "d"}]}},
              "$defs": {"C": {"type": "array", "items": {"$ref": "#/$defs/C"}}}}
    out = gemini.gemini_schema(schema)
    assert _schema_problem(out, "p") is None
    assert out["properties"]["a"] == {"type": "integer", "nullable": True}
    assert out["properties"]["b"]["anyOf"][0] == {"enum": ["1"], "type": "string"}


def test_p20_p39_long_tool_names_pass_unchanged_between_chat_and_anthropic():
    name = "mcp__server__" + "x" * 50
    out = _to_anthropic({"model": "m", "messages": [{"role": "user", "content": "x"}],
                         "tools": [{"type": "function", "function": {"name": name, "parameters": {}}}],
                         "tool_choice": {"type": "function", "function": {"name": name}}})
    assert out["tools"][0]["name"] == name and out["tool_choice"]["name"] == name


def test_p20_p39_names_over_64_are_mapped_in_tools_choice_and_history():
    name = "mcp__plugin_" + "y" * 70 + ".search"
    body = {"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
        "tools": [{"type": "function", "function": {"name": name, "parameters": {}}}],
        "tool_choice": {"type": "function", "function": {"name": name}}}
    short = short_name(name)
    out = _to_anthropic(body)
    assert out["tools"][0]["name"] == short and out["tool_choice"]["name"] == short
    assert out["messages"][1]["content"][0]["name"] == short
    gem = orjson.loads(translation_for("chat.completions", UPSTREAMS["gemini"]).request(body, "g", False))
    assert gem["contents"][2]["parts"][0]["functionResponse"]["name"] == short
    from proxy.mock_checks import check_anthropic, check_gemini
    assert check_anthropic(out) is None and check_gemini(gem) is None


@pytest.mark.parametrize("name", ["mcp__plugin_x_" + "z" * 80, "a.b:c", "7day", "", "x" * 300, "ünï cødé/tool", "_" * 64])
def test_p20_short_names_are_valid_for_every_upstream_and_deterministic(name):
    short = short_name(name)
    assert all(codec.tool_name.fullmatch(short) for codec in UPSTREAM_CODECS.values() if codec.tool_name)
    assert short == short_name(name) and short != short_name(name + "2")


def test_p20_p22_long_codex_namespace_members_come_back_whole():
    """Codex flattens namespace members to <ns>__<name>: over 64 for a chat upstream, the
    call still comes back as {namespace, name} (stream and body)."""
    translation = translation_for("responses", UPSTREAMS["openai"])
    ns, member = "mcp__documentation_server_for_the_whole_team", "search_the_documentation_index"
    body = {"model": "m", "input": "find it", "tools": [
        {"type": "namespace", "name": ns, "tools": [{"type": "function", "name": member, "parameters": {"type": "object"}}]}]}
    out = orjson.loads(translation.request(body, "m", True))
    short = out["tools"][0]["function"]["name"]
    assert short == short_name(f"{ns}__{member}") and len(short) <= 64
    ctx = translation.context("m", True, 1)
    stream = b"".join(b"data: " + orjson.dumps(d) + b"\n\n" for d in [
        {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": 0, "id": "a", "function": {"name": short, "arguments": "{}"}}]}, "finish_reason": None}]},
        {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]) + b"data: [DONE]\n\n"
    relay = translation.stream(ctx)
    events = _events(relay.feed(stream) + relay.flush())
    item = events[-1][1]["response"]["output"][0]
    assert (item["namespace"], item["name"]) == (ns, member)
    whole = {"id": "c", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": short, "arguments": "{}"}}]}}]}
    item = orjson.loads(translation.response(orjson.dumps(whole), ctx))["output"][0]
    assert (item["namespace"], item["name"]) == (ns, member)


def test_p41_unknown_blocks_in_tool_results_become_text():
    translation = translation_for("messages", UPSTREAMS["openai"])
    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "tool_reference", "tool_name": "y"}]}]},
    ]}
    out = orjson.loads(translation.request(body, "m", False))
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "t", "content": "[unsupported block: tool_reference]"}


def test_p21_p22_codex_custom_and_namespace_tools():
    translation = translation_for("responses", UPSTREAMS["openai"])
    body = {"model": "m", "input": "patch it", "tools": [
        {"type": "custom", "name": "apply_patch", "description": "Patch", "format": {"type": "grammar", "syntax": "lark", "definition": "start: x"}},
        {"type": "namespace", "name": "mcp__docs", "tools": [{"type": "function", "name": "search", "parameters": {"type": "object"}}]},
        {"type": "web_search"}]}
    out = orjson.loads(translation.request(body, "m", True))
    assert [t["function"]["name"] for t in out["tools"]] == ["apply_patch", "mcp__docs__search"]
    assert "start: x" in out["tools"][0]["function"]["description"]
    ctx = translation.context("m", True, 1)

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"
    patch = "*** Begin Patch\n*** End Patch"
    stream = b"".join([
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "a", "function": {"name": "apply_patch", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": orjson.dumps({"input": patch}).decode()}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "mcp__docs__search", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"), b"data: [DONE]\n\n"])
    relay = translation.stream(ctx)
    events = _events(relay.feed(stream) + relay.flush())
    check_responses_stream(events)
    items = events[-1][1]["response"]["output"]
    assert items[0]["type"] == "custom_tool_call" and items[0]["input"] == patch
    assert (items[1]["namespace"], items[1]["name"]) == ("mcp__docs", "search")
    assert any(n == "response.custom_tool_call_input.delta" for n, _ in events)


def test_p27_reasoning_items_always_carry_a_summary_list():
    _, payload = load("anthropic/docs_messages_stream_thinking.sse")
    events = _events(_translated_stream("responses", "anthropic", payload + b"\n"))
    reasoning = [d["item"] for n, d in events if n == "response.output_item.done" and d["item"]["type"] == "reasoning"]
    assert reasoning and all(isinstance(r["summary"], list) and r["encrypted_content"].startswith("lpx1.anthropic.") for r in reasoning)


def test_p5_gemini_signature_on_a_thought_part_comes_back_on_it():
    _, doc = load("gemini/generate_content_function_call_thinking.json")
    body = orjson.loads(doc)
    out = orjson.loads(translation_for("generateContent", UPSTREAMS["anthropic"]).response(doc, ClientContext("m", False)))
    sig_parts = [p for p in out["candidates"][0]["content"]["parts"] if p.get("thoughtSignature")]
    upstream_sigs = [p["thoughtSignature"] for p in body["candidates"][0]["content"]["parts"] if p.get("thoughtSignature")]
    assert sig_parts == [] or upstream_sigs   # sanity: the vector carries one
    # Gemini → Anthropic client → Gemini again: the signature returns on the same call.
    anthropic_out = orjson.loads(translation_for("messages", UPSTREAMS["gemini"]).response(doc, ClientContext("m", False)))
    history = {"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": anthropic_out["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": b["id"], "content": "ok"}
                                     for b in anthropic_out["content"] if b["type"] == "tool_use"]}]}
    back = orjson.loads(translation_for("messages", UPSTREAMS["gemini"]).request(history, "g", False))
    sent = [p.get("thoughtSignature") for p in back["contents"][1]["parts"] if p.get("thoughtSignature")]
    assert sent == upstream_sigs


def test_p4_gemini_text_part_signature_crosses_to_anthropic_and_responses_clients():
    """A Gemini text-only turn signed on a trailing empty part (streamed) or on its text
    (body): Anthropic and Responses clients get a carrier after the text that returns the
    signature to the text part; every stream still follows its grammar."""
    def chunk(parts: list, finish: bool = False) -> bytes:
        cand = {"content": {"role": "model", "parts": parts}, **({"finishReason": "STOP"} if finish else {})}
        return b"data: " + orjson.dumps({"candidates": [cand], "usageMetadata": {"promptTokenCount": 3}}) + b"\r\n\r\n"
    stream = chunk([{"text": "Hel"}]) + chunk([{"text": "lo"}, {"text": "", "thoughtSignature": "U0lH"}], True)
    events = _events(_translated_stream("messages", "gemini", stream))
    check_anthropic_stream(events)
    blocks = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    sigs = [d["delta"]["signature"] for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "signature_delta"]
    assert blocks == ["text", "thinking"] and sigs == ["lpx1.gemini+text.U0lH"]
    events = _events(_translated_stream("responses", "gemini", stream))
    check_responses_stream(events)
    output = events[-1][1]["response"]["output"]
    assert [i["type"] for i in output] == ["message", "reasoning"] and output[1]["encrypted_content"] == "lpx1.gemini+text.U0lH"
    body = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hello", "thoughtSignature": "U0lH"}]}, "finishReason": "STOP"}]}
    content = orjson.loads(translation_for("messages", UPSTREAMS["gemini"]).response(orjson.dumps(body), ClientContext("m", False)))["content"]
    history = {"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": content}, {"role": "user", "content": "more"}]}
    back = orjson.loads(translation_for("messages", UPSTREAMS["gemini"]).request(history, "g", False))
    assert back["contents"][1]["parts"] == [{"text": "Hello", "thoughtSignature": "U0lH"}]
    # Another upstream never gets it (providers check their own signatures).
    to_chat = orjson.loads(translation_for("messages", UPSTREAMS["openai"]).request(history, "m", False))
    assert "U0lH" not in orjson.dumps(to_chat).decode()


# --------------------------------------------------------------------------- properties

_text = st.text(max_size=12)
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), _text)
_args = st.dictionaries(st.sampled_from(["a", "b"]), _json_scalar, max_size=2)


def _chat_messages() -> st.SearchStrategy[list[dict[str, Any]]]:
    call = st.builds(lambda i, n, a: {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": orjson.dumps(a).decode()}},
                     st.integers(0, 3), st.sampled_from(["f", "g"]), _args)
    message = st.one_of(
        st.builds(lambda t: {"role": "user", "content": t}, _text),
        st.builds(lambda t: {"role": "system", "content": t}, _text),
        st.builds(lambda t, c: {"role": "assistant", "content": t, "tool_calls": c}, st.one_of(st.none(), _text), st.lists(call, max_size=2)),
        st.builds(lambda i, t: {"role": "tool", "tool_call_id": f"call_{i}", "content": t}, st.integers(0, 3), _text),
        st.builds(lambda t: {"role": "user", "content": [{"type": "text", "text": t},
                                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}, _text),
    )
    return st.lists(message, max_size=6)


def _anthropic_messages() -> st.SearchStrategy[list[dict[str, Any]]]:
    block = st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, _text),
        st.builds(lambda i, a: {"type": "tool_use", "id": f"t{i}", "name": "f", "input": a}, st.integers(0, 3), _args),
        st.builds(lambda i, t, e: {"type": "tool_result", "tool_use_id": f"t{i}", "content": t, "is_error": e},
                  st.integers(0, 3), _text, st.booleans()),
        st.builds(lambda t, s: {"type": "thinking", "thinking": t, "signature": s}, _text,
                  st.sampled_from(["sig", "lpx1.chat.", "lpx1.gemini.abc", "lpx1.none."])),
    )
    message = st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["user", "assistant"]),
                        st.one_of(_text, st.lists(block, max_size=3)))
    return st.lists(message, max_size=6)


def _gemini_contents() -> st.SearchStrategy[list[dict[str, Any]]]:
    part = st.one_of(
        st.builds(lambda t: {"text": t}, _text),
        st.builds(lambda t, s: {"text": t, "thought": True, **({"thoughtSignature": s} if s else {})}, _text, st.one_of(st.none(), _text)),
        st.builds(lambda n, a: {"functionCall": {"name": n, "args": a}}, st.sampled_from(["f", "g"]), _args),
        st.builds(lambda n, r: {"functionResponse": {"name": n, "response": r}}, st.sampled_from(["f", "g"]), _args),
        st.just({"inlineData": {"mimeType": "image/png", "data": "AAAA"}}),
    )
    content = st.builds(lambda r, p: {"role": r, "parts": p}, st.sampled_from(["user", "model"]), st.lists(part, min_size=1, max_size=3))
    return st.lists(content, max_size=5)


def _responses_input() -> st.SearchStrategy[list[dict[str, Any]]]:
    item = st.one_of(
        st.builds(lambda r, t: {"type": "message", "role": r, "content": [{"type": "input_text" if r != "assistant" else "output_text", "text": t}]},
                  st.sampled_from(["user", "assistant", "developer"]), _text),
        st.builds(lambda i, a: {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": orjson.dumps(a).decode()},
                  st.integers(0, 3), _args),
        st.builds(lambda i, t: {"type": "function_call_output", "call_id": f"c{i}", "output": t}, st.integers(0, 3), _text),
        st.builds(lambda t, e: {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": t}],
                                **({"encrypted_content": e} if e else {})}, _text, st.sampled_from([None, "lpx1.chat.", "opaque"])),
    )
    return st.lists(item, max_size=6)


BODIES = {
    "chat.completions": st.builds(lambda m, s, e: {"model": "x", "messages": m, "stream": s,
                                                   **({"reasoning_effort": e} if e else {}),
                                                   "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
                                  _chat_messages(), st.booleans(), st.sampled_from([None, "low", "high"])),
    "messages": st.builds(lambda m, t: {"model": "x", "max_tokens": 2000, "messages": m,
                                        **({"thinking": {"type": "enabled", "budget_tokens": 1024}} if t else {}),
                                        "tools": [{"name": "f", "input_schema": {"type": "object"}}]},
                          _anthropic_messages(), st.booleans()),
    "generateContent": st.builds(lambda c: {"contents": c, "tools": [{"functionDeclarations": [{"name": "f", "parameters": {"type": "OBJECT"}}]}]},
                                 _gemini_contents()),
    "responses": st.builds(lambda i: {"model": "x", "input": i, "tools": [{"type": "function", "name": "f", "parameters": {}}]},
                           _responses_input()),
}


@pytest.mark.parametrize("endpoint", list(BODIES))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_valid_request_makes_a_translator_raise(endpoint, data):
    body = data.draw(BODIES[endpoint])
    for protocol, upstream in UPSTREAMS.items():
        translation = translation_for(endpoint, upstream)
        if translation is None:
            continue
        try:
            out = orjson.loads(translation.request(body, "m", bool(body.get("stream"))))
        except Exception as exc:   # only the two refusals a caller can be given, as 400s
            assert getattr(exc, "status", None) == 400, repr(exc)
            continue
        assert isinstance(out, dict)
        from proxy.mock_checks import check_anthropic, check_chat, check_gemini
        if protocol == "anthropic":
            problem = check_anthropic({**out, "messages": [m for m in out["messages"]]})
            # Signatures the mock did not issue are the only refusal allowed here.
            assert problem is None or "signature" in problem, (problem, out)
        elif protocol == "openai" and out["messages"] and _distinct_call_ids(out["messages"]):
            # What the chat API refuses (tool messages that answer no call, calls left
            # unanswered...); a DeepSeek-style upstream's demand for reasoning_content
            # back is allowed: the history may hold no reasoning to give.
            problem = check_chat(out)
            assert problem is None or "reasoning_content" in problem, (problem, out)
        elif protocol == "gemini":
            problem = check_gemini(out)
            assert problem is None or "signature" in problem, (problem, out)


def _distinct_call_ids(messages: list[dict[str, Any]]) -> bool:
    """Drawn histories may repeat a call id inside one turn, which no client sends."""
    ids = [[c["id"] for c in m.get("tool_calls") or []] for m in messages]
    return all(len(set(turn)) == len(turn) for turn in ids)


_upstream_event = st.one_of(
    st.builds(lambda d: b"data: " + orjson.dumps(d) + b"\n\n",
              st.dictionaries(st.sampled_from(["choices", "type", "candidates", "usage", "delta", "index", "error"]),
                              st.one_of(_json_scalar, st.lists(st.dictionaries(_text, _json_scalar, max_size=3), max_size=2),
                                        st.dictionaries(_text, _json_scalar, max_size=3)), max_size=4)),
    st.sampled_from([b"data: [DONE]\n\n", b": ping\n\n", b"event: ping\ndata: {}\n\n", b"data: {not json\n\n"]),
)


@pytest.mark.parametrize("protocol", list(UPSTREAM_CODECS))
@settings(max_examples=60, deadline=None, derandomize=True)
@given(events=st.lists(_upstream_event, max_size=8), cut=st.integers(1, 50))
def test_no_upstream_stream_makes_a_stream_translator_raise(protocol, events, cut):
    payload = b"".join(events)
    for endpoint in CLIENT_ENDPOINTS:
        translation = translation_for(endpoint, UPSTREAMS[protocol])
        if translation is None:
            continue
        relay = translation.stream(translation.context("m", True, 1, "alt=sse"))
        out = b"".join(relay.feed(payload[i:i + cut]) for i in range(0, len(payload), cut)) + relay.flush()
        assert isinstance(out, bytes)


def test_codec_tables_cover_every_pair():
    pairs = list(itertools.product(CLIENT_CODECS.values(), UPSTREAM_CODECS.values()))
    assert all(isinstance(c, Codec) and c.encode_response and c.encoder for c, _ in pairs)
    assert UpstreamOptions("m").default_max_tokens == 4096
    assert anth.client_signature(None) == "lpx1.none."
    with pytest.raises(BadInput):
        CLIENT_CODECS["messages"].decode_request({"messages": "nope"})
    assert issubclass(Untranslatable, Exception)


def test_gemini_carrier_is_base64_and_a_native_signature_passes_through():
    """google-genai types thoughtSignature as bytes: a carrier that is not base64 fails
    its response validation, so the Gemini slot holds base64 of the carrier."""
    import base64

    from proxy.translate.hub import Sig

    wrapped = carrier.wrap_base64(Sig("chat", ""))
    assert base64.b64encode(base64.b64decode(wrapped)).decode() == wrapped   # survives the SDK's decode/encode
    assert carrier.unwrap_base64(wrapped, "gemini") == Sig("chat", "")
    assert carrier.unwrap_base64("lpx1.anthropic.SIG", "gemini") == Sig("anthropic", "SIG")
    native = base64.b64encode(b"\x12\x34 gemini's own").decode()
    assert carrier.unwrap_base64(native, "gemini") == Sig("gemini", native)
    assert carrier.unwrap_base64("not base64!", "gemini") == Sig("gemini", "not base64!")


def test_p18_p26_chat_upstream_answers_every_call_and_takes_no_stray_result():
    """Chat refuses a tool message for no call of the previous turn and an assistant turn
    whose calls are not all answered: results pair with calls, an interrupted call gets a
    cancelled result, a stray result becomes user text (Anthropic and Responses clients)."""
    from proxy.mock_checks import check_chat
    translation = translation_for("messages", UPSTREAMS["openai"])
    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}},
                                          {"type": "tool_use", "id": "b", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "b", "content": "B"},
                                     {"type": "tool_result", "tool_use_id": "zzz", "content": "Z"},
                                     {"type": "text", "text": "go on"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]},
    ]}
    out = orjson.loads(translation.request(body, "m", False))
    assert check_chat(out) is None
    assert [(m["role"], m.get("tool_call_id")) for m in out["messages"]] == [
        ("user", None), ("assistant", None), ("tool", "a"), ("tool", "b"), ("user", None), ("assistant", None), ("tool", "c")]
    assert out["messages"][2]["content"] == "Error: tool call was cancelled" and out["messages"][3]["content"] == "B"
    assert "[result of tool call zzz]: Z" in orjson.dumps(out["messages"][4]).decode()
    responses = translation_for("responses", UPSTREAMS["openai"])
    out = orjson.loads(responses.request({"model": "m", "input": [
        {"type": "function_call_output", "call_id": "lost", "output": "42"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and?"}]}]}, "m", False))
    assert check_chat(out) is None and [m["role"] for m in out["messages"]] == ["user"]


def test_p14_long_upstream_call_ids_reach_responses_clients_within_64():
    from proxy.mock_checks import check_chat
    translation = translation_for("responses", UPSTREAMS["openai"])
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    translation.request({"model": "m", "input": "x", "tools": tools}, "m", False)
    long_id = "call_" + "x" * 75
    whole = {"id": "c", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": [
        {"id": long_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    item = orjson.loads(translation.response(orjson.dumps(whole), ClientContext("m", False)))["output"][0]
    assert len(item["call_id"]) <= 64 and item["call_id"] == carrier.safe_id(long_id)
    stream = b"".join(b"data: " + orjson.dumps(d) + b"\n\n" for d in [
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": long_id, "function": {"name": "f", "arguments": "{}"}}]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]) + b"data: [DONE]\n\n"
    relay = translation.stream(translation.context("m", True, 1))
    streamed = _events(relay.feed(stream) + relay.flush())[-1][1]["response"]["output"][0]
    assert streamed["call_id"] == item["call_id"]   # deterministic: the same id both ways
    turn2 = {"model": "m", "tools": tools, "input": [{"type": "message", "role": "user", "content": "x"}, item,
                                                     {"type": "function_call_output", "call_id": item["call_id"], "output": "ok"}]}
    out = orjson.loads(translation.request(turn2, "m", False))
    assert check_chat(out) is None and out["messages"][1]["tool_calls"][0]["id"] == out["messages"][2]["tool_call_id"]


def test_p25_codex_reasoning_items_reach_anthropic_as_its_signed_thinking():
    translation = translation_for("responses", UPSTREAMS["anthropic"])
    body = {"model": "m", "reasoning": {"effort": "low"}, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                      {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "I call it."}],
                       "encrypted_content": "lpx1.anthropic.SIG"},
                      {"type": "function_call", "call_id": "toolu_1", "name": "f", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "toolu_1", "output": "ok"}]}
    out = orjson.loads(translation.request(body, "claude", False))
    assert out["messages"][1]["content"][0] == {"type": "thinking", "thinking": "I call it.", "signature": "SIG"}
    assert out["thinking"]["type"] == "enabled"
    # Another provider's reasoning never reaches Anthropic (it checks its signatures).
    body["input"][1]["encrypted_content"] = "lpx1.gemini.X"
    out = orjson.loads(translation.request(body, "claude", False))
    assert all(b["type"] != "thinking" for m in out["messages"] for b in m["content"]) and "thinking" not in out


def test_p38_tool_result_images_stay_images():
    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "shot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": [
            {"type": "text", "text": "the screen"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}]}
    chat = orjson.loads(translation_for("messages", UPSTREAMS["openai"]).request(body, "m", False))
    assert chat["messages"][2] == {"role": "tool", "tool_call_id": "a", "content": "the screen"}
    assert chat["messages"][3] == {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    gem = orjson.loads(translation_for("messages", UPSTREAMS["gemini"]).request(body, "g", False))
    parts = gem["contents"][2]["parts"]
    assert parts[0]["functionResponse"]["response"] == {"output": "the screen"}
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}


def test_p34_p35_cache_breakpoints_for_anthropic_upstreams():
    """A chat client cannot mark a cache breakpoint: the tools, the system prompt and the
    conversation so far are marked (3), the conversation's marker moving to the last user
    turn; a client's own markers are kept, never more than 4 in all."""
    from proxy.mock_checks import check_anthropic
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    body = {"model": "m", "tools": tools, "messages": [
        {"role": "system", "content": "rules"}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]}
    out = _to_anthropic(body)
    marked = [b for b in [*out["tools"], *out["system"], *(b for m in out["messages"] for b in m["content"])] if "cache_control" in b]
    assert [b.get("name") or b["text"] for b in marked] == ["b", "rules", "three"]
    assert check_anthropic(out) is None
    parts = [{"type": "text", "text": f"p{k}", "cache_control": {"type": "ephemeral"}} for k in range(6)]
    out = _to_anthropic({"model": "m", "tools": tools, "messages": [{"role": "user", "content": parts}]})
    kept = [b["text"] for b in out["messages"][0]["content"] if "cache_control" in b]
    assert kept == ["p2", "p3", "p4", "p5"] and "cache_control" not in out["tools"][-1]
    assert check_anthropic(out) is None
