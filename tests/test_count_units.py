"""Token counting across dialects without sockets (issue 22 item 7): the count codecs,
the count translation each way, the local estimate, and what the mock refuses."""

from __future__ import annotations

import base64

import orjson
import pytest

from proxy.config import UpstreamConfig
from proxy.dialects import GEMINI_METHODS, model_endpoint
from proxy.dialects.base import ModelInfo
from proxy.dialects.gemini import GEMINI
from proxy.errors import InvalidRequest, UnsupportedParameter, UpstreamError
from proxy.metering import FreeMeter, meter_for
from proxy.metering.estimate import estimate_prompt_tokens
from proxy.mock_checks import check_anthropic_count, check_gemini_count
from proxy.translate import CountTranslation, targets, translation_for
from proxy.translate import anthropic as anth
from proxy.translate import gemini
from proxy.translate.common import ClientContext
from proxy.translate.count import ESTIMATED_HEADER, IMAGE_TOKENS

pytestmark = pytest.mark.fast

UPSTREAMS = {p: UpstreamConfig(f"up-{p}", "http://x", p, "k") for p in ("openai", "anthropic", "gemini")}
TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}
ANTHROPIC_BODY = {"model": "m", "system": "be brief", "tools": [TOOL], "tool_choice": {"type": "auto"},
                  "messages": [{"role": "user", "content": "hello there"}]}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}
GEMINI_WRAPPED = {"generateContentRequest": {
    "model": "models/m", "systemInstruction": {"parts": [{"text": "be brief"}]},
    "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": {
        "type": "OBJECT", "properties": {"location": {"type": "STRING"}}}}]}],
    "contents": GEMINI_BODY["contents"]}}
CTX = ClientContext("m", False)


def _count(endpoint: str, protocol: str) -> CountTranslation:
    t = translation_for(endpoint, UPSTREAMS[protocol])
    assert isinstance(t, CountTranslation)
    return t


def test_every_protocol_serves_both_counters():
    for endpoint in ("count_tokens", "countTokens"):
        assert targets(endpoint) == frozenset({"openai", "anthropic", "gemini"})
    # Same dialect: the byte-exact path (no translation).
    assert translation_for("count_tokens", UPSTREAMS["anthropic"]) is None
    assert translation_for("countTokens", UPSTREAMS["gemini"]) is None
    assert _count("count_tokens", "openai").local and _count("countTokens", "openai").local
    assert not _count("count_tokens", "gemini").local and not _count("countTokens", "anthropic").local


def test_gemini_count_is_routed_and_listed_on_both_versions():
    for prefix in ("/v1beta/models/", "/v1/models/"):
        endpoint, model = model_endpoint(prefix + "gemini-2.5-flash:countTokens")
        assert (endpoint.name, model, endpoint.can_stream) == ("countTokens", "gemini-2.5-flash", False)
    assert GEMINI_METHODS["countTokens"].dialect is GEMINI
    listed = orjson.loads(GEMINI.models_body([ModelInfo("m", "o", 0)], {}))["models"][0]
    assert "countTokens" in listed["supportedGenerationMethods"]


def test_counting_is_free_on_both_counters():
    assert isinstance(meter_for("count_tokens", False), FreeMeter)
    assert isinstance(meter_for("countTokens", False), FreeMeter)


def test_anthropic_count_to_gemini_counter():
    t = _count("count_tokens", "gemini")
    assert t.upstream_endpoint(False) == "countTokens" and t.upstream_query(False) == ""
    sent = orjson.loads(t.request(ANTHROPIC_BODY, "gemini-2.5-flash", False))
    inner = sent["generateContentRequest"]
    # The wrapped form, so the system prompt and the tools are counted too.
    assert set(sent) == {"generateContentRequest"} and inner["model"] == "models/gemini-2.5-flash"
    assert inner["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert inner["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    assert inner["contents"] == [{"role": "user", "parts": [{"text": "hello there"}]}]
    assert check_gemini_count(sent, "gemini-2.5-flash") is None
    assert orjson.loads(t.response(b'{"totalTokens": 31, "promptTokensDetails": []}', CTX)) == {"input_tokens": 31}
    # proto3 JSON leaves a zero out.
    assert orjson.loads(t.response(b"{}", CTX)) == {"input_tokens": 0}


@pytest.mark.parametrize("body", [GEMINI_BODY, GEMINI_WRAPPED], ids=["contents", "generateContentRequest"])
def test_gemini_count_to_anthropic_counter(body):
    t = _count("countTokens", "anthropic")
    assert t.upstream_endpoint(False) == "count_tokens"
    sent = orjson.loads(t.request(body, "claude-sonnet-4-5", False))
    # count_tokens refuses max_tokens and the other answer settings as extra inputs.
    assert set(sent) <= {"model", "system", "messages", "tools", "tool_choice", "thinking"}
    assert sent["model"] == "claude-sonnet-4-5" and sent["messages"][0]["role"] == "user"
    assert ("system" in sent) is (body is GEMINI_WRAPPED)
    assert check_anthropic_count(sent) is None
    assert orjson.loads(t.response(b'{"input_tokens": 12}', CTX)) == {"totalTokens": 12}


def test_thinking_and_answer_settings_to_anthropic_counter():
    body = {"contents": GEMINI_BODY["contents"], "generationConfig": {"temperature": 0.3, "maxOutputTokens": 50}}
    sent = orjson.loads(_count("countTokens", "anthropic").request({"generateContentRequest": {"model": "models/m", **body}}, "c", False))
    assert "max_tokens" not in sent and "temperature" not in sent
    thinking = {**ANTHROPIC_BODY, "thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 100}
    out = orjson.loads(_count("count_tokens", "gemini").request(thinking, "g", False))
    assert out["generateContentRequest"]["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 2000


def test_upstream_answer_that_is_no_count_is_a_bad_gateway():
    for endpoint, protocol, data in (("count_tokens", "gemini", b"[1]"), ("countTokens", "anthropic", b'{"tokens": 3}'),
                                     ("countTokens", "anthropic", b"not json"), ("countTokens", "anthropic", b'{"input_tokens": -1}')):
        with pytest.raises(UpstreamError):
            _count(endpoint, protocol).response(data, CTX)


_OWN_PROTOCOL = {"count_tokens": "anthropic", "countTokens": "gemini"}   # same dialect: the upstream judges the body


@pytest.mark.parametrize("endpoint,body", [
    ("count_tokens", {"model": "m", "messages": []}),
    ("count_tokens", {"model": "m", "messages": "hi"}),
    ("count_tokens", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
    ("countTokens", {}),
    ("countTokens", {"contents": "hi"}),
    ("countTokens", {"generateContentRequest": "x"}),
    ("countTokens", {"contents": GEMINI_BODY["contents"], "generateContentRequest": GEMINI_WRAPPED["generateContentRequest"]}),
])
@pytest.mark.parametrize("protocol", ["openai", "anthropic", "gemini"])
def test_bad_count_bodies_are_a_400(endpoint, body, protocol):
    t = translation_for(endpoint, UPSTREAMS[protocol])
    if protocol == _OWN_PROTOCOL[endpoint]:
        assert t is None
        return
    assert isinstance(t, CountTranslation)
    with pytest.raises(InvalidRequest):
        t.estimate(body) if t.local else t.request(body, "m", False)


def test_what_the_upstream_counter_cannot_say_is_estimated_not_refused():
    body = {**GEMINI_BODY, "tools": [{"googleSearch": {}}]}   # Gemini's built-in tool: nothing else takes it
    with pytest.raises(UnsupportedParameter):
        _count("countTokens", "anthropic").request(body, "c", False)
    for protocol in ("anthropic", "openai"):
        t = translation_for("countTokens", UPSTREAMS[protocol], body)
        assert isinstance(t, CountTranslation) and t.local
        data, header = t.estimate(body)
        assert header == ESTIMATED_HEADER and orjson.loads(data)["totalTokens"] == estimate_prompt_tokens(orjson.dumps(body))
    # An image URL cannot go to Gemini (the gateway fetches nothing): estimated too.
    url = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]}
    t = translation_for("count_tokens", UPSTREAMS["gemini"], url)
    assert isinstance(t, CountTranslation) and t.local
    assert orjson.loads(t.estimate(url)[0])["input_tokens"] >= IMAGE_TOKENS
    # A body that is merely malformed is still the caller's 400, not an estimate.
    t = translation_for("count_tokens", UPSTREAMS["gemini"], {"model": "m", "messages": []})
    assert isinstance(t, CountTranslation) and not t.local
    with pytest.raises(InvalidRequest):
        t.request({"model": "m", "messages": []}, "g", False)


def test_estimate_is_the_limits_estimator_on_the_rendered_prompt():
    text = "word " * 800   # 4000 bytes: about 1000 tokens
    data, header = _count("count_tokens", "openai").estimate({"model": "m", "messages": [{"role": "user", "content": text}]})
    assert header == ("x-llm-proxy-estimated", "true")
    n = orjson.loads(data)["input_tokens"]
    rendered = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    assert n == estimate_prompt_tokens(rendered) and 1000 <= n <= 1030
    # The same prompt in Gemini's shape estimates the same: both are rendered as chat.
    data, _ = _count("countTokens", "openai").estimate({"contents": [{"role": "user", "parts": [{"text": text}]}]})
    assert abs(orjson.loads(data)["totalTokens"] - n) <= 2


def test_estimate_counts_images_at_a_flat_rate_not_by_their_size():
    png = base64.b64encode(b"\x89PNG" + bytes(300_000)).decode()   # 400 kB of base64
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
    body = {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "look", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]},
    ]}
    data, _ = _count("count_tokens", "openai").estimate(body)
    n = orjson.loads(data)["input_tokens"]
    assert 2 * IMAGE_TOKENS < n < 2 * IMAGE_TOKENS + 100


def test_count_codecs_round_trip_their_own_answers():
    assert anth.encode_count_response(7) == {"input_tokens": 7} and anth.decode_count_response({"input_tokens": 7}) == 7
    assert gemini.encode_count_response(7) == {"totalTokens": 7} and gemini.decode_count_response({"totalTokens": 7}) == 7


def test_mock_refuses_what_the_real_counters_refuse():
    assert check_anthropic_count({**ANTHROPIC_BODY, "max_tokens": 10}) == "max_tokens: Extra inputs are not permitted"
    assert check_anthropic_count({"model": "m", "messages": []}) is not None
    assert check_anthropic_count(ANTHROPIC_BODY) is None
    assert check_gemini_count(GEMINI_BODY, "m") is None and check_gemini_count(GEMINI_WRAPPED, "m") is None
    assert "Unknown name" in check_gemini_count({**GEMINI_BODY, "model": "m"}, "m")
    assert check_gemini_count(GEMINI_WRAPPED, "other") is not None
    assert check_gemini_count({"contents": []}, "m") is not None


def test_tool_names_the_upstream_refuses_are_mapped_for_its_counter_too():
    long_name = "mcp__plugin_github_github__" + "search_issues_" * 5   # over 64 characters
    body = {**ANTHROPIC_BODY, "tools": [{**TOOL, "name": long_name}], "tool_choice": {"type": "tool", "name": long_name}}
    sent = orjson.loads(_count("count_tokens", "gemini").request(body, "g", False))["generateContentRequest"]
    (decl,) = sent["tools"][0]["functionDeclarations"]
    assert decl["name"] != long_name and len(decl["name"]) <= 64
    assert sent["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"] == [decl["name"]]
    assert check_gemini_count({"generateContentRequest": sent}, "g") is None


def test_gemini_wrapped_count_to_gemini_names_the_upstream_model():
    assert translation_for("countTokens", UPSTREAMS["gemini"], GEMINI_BODY) is None   # {contents}: byte-exact
    t = translation_for("countTokens", UPSTREAMS["gemini"], GEMINI_WRAPPED)
    assert isinstance(t, CountTranslation) and not t.local
    sent = orjson.loads(t.request(GEMINI_WRAPPED, "gemini-2.5-flash", False))
    # Only the model changes: everything else goes as the client sent it.
    assert sent == {"generateContentRequest": {**GEMINI_WRAPPED["generateContentRequest"], "model": "models/gemini-2.5-flash"}}
    answer = b'{"totalTokens": 9, "cachedContentTokenCount": 2}'
    assert t.response(answer, CTX) is answer
