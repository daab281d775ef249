"""Usage metering: SSE framing, provider meters, include_usage dropping, sanity rules.

Expected numbers always come from the vectors themselves, read with the stdlib `json`
and the reference SSE parser in `fixtures/vectors/load_vector.py`, never from the code
under test.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.metering import (
    AnthropicMeter,
    FreeMeter,
    GeminiArrayStreamMeter,
    OpenAIChatMeter,
    SSEEventTooLarge,
    SSESplitter,
    Usage,
    UsageChunkDropper,
    ensure_include_usage,
    estimate_prompt_tokens,
    estimate_tokens_from_bytes,
    event_data,
    event_name,
    meter_for,
    settle,
)
from proxy.metering.sse import WholeEvents

pytestmark = pytest.mark.fast  # pure units: no sockets (see README, "Run the tests")

VECTORS = Path(__file__).parent / "fixtures" / "vectors"
_spec = importlib.util.spec_from_file_location("load_vector", VECTORS / "load_vector.py")
assert _spec is not None and _spec.loader is not None
load_vector = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load_vector)

SSE_VECTORS = sorted(str(p.relative_to(VECTORS)) for p in VECTORS.glob("*/*.sse"))
JSON_VECTORS = sorted(str(p.relative_to(VECTORS)) for p in VECTORS.glob("*/*.json"))


def payload(rel: str) -> bytes:
    return load_vector.load(rel)[1]


# -- independent references ----------------------------------------------------------

_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n|$)")


def reference_split(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole-buffer SSE event splitting, line by line (a trailing lone CR is pending)."""
    events: list[bytes] = []
    start = pos = 0
    while pos < len(data):
        m = _LINE.match(data, pos)
        assert m is not None
        content, eol = m.group(1), m.group(2)
        if not eol or (eol == b"\r" and m.end() == len(data)):
            break
        if not content:
            events.append(data[start:m.end()])
            start = m.end()
        pos = m.end()
    return events, data[start:]


def endpoint_for(rel: str) -> str:
    if rel.startswith("openai/"):
        return "responses" if "responses" in rel else "chat.completions"
    if rel.startswith("anthropic/"):
        return "count_tokens" if "count_tokens" in rel else "messages"
    return "streamGenerateContent" if rel.endswith(".sse") else "generateContent"


def _int(d: dict[str, Any], *path: str) -> int:
    for key in path:
        d = d.get(key) or {}
    return d if isinstance(d, int) else 0


def expected_from_objects(endpoint: str, objs: list[Any]) -> Usage | None:
    """The vector's usage, by the documented mapping, from decoded JSON objects."""
    if endpoint == "chat.completions":
        last = next((o["usage"] for o in reversed(objs) if isinstance(o.get("usage"), dict)), None)
        if last is None:
            return None
        return Usage(last["prompt_tokens"], last["completion_tokens"],
                     _int(last, "prompt_tokens_details", "cached_tokens"), 0,
                     _int(last, "completion_tokens_details", "reasoning_tokens"))
    if endpoint == "responses":
        cands = [o.get("response", o).get("usage") for o in objs
                 if o.get("type") in (None, "response.completed")]
        last = next((u for u in reversed(cands) if isinstance(u, dict)), None)
        if last is None:
            return None
        return Usage(last["input_tokens"], last["output_tokens"],
                     _int(last, "input_tokens_details", "cached_tokens"), 0,
                     _int(last, "output_tokens_details", "reasoning_tokens"))
    if endpoint == "messages":
        merged: dict[str, int] = {}
        for o in objs:
            u = o.get("usage") if o.get("type") != "message_start" else o["message"].get("usage")
            if isinstance(u, dict):
                merged.update({k: v for k, v in u.items() if isinstance(v, int)})
        if not merged:
            return None
        read = merged.get("cache_read_input_tokens", 0)
        created = merged.get("cache_creation_input_tokens", 0)
        return Usage(merged["input_tokens"] + read + created, merged["output_tokens"], read, created, 0)
    if endpoint in ("generateContent", "streamGenerateContent"):
        last = next((o["usageMetadata"] for o in reversed(objs) if "usageMetadata" in o), None)
        if last is None:
            return None
        thoughts = last.get("thoughtsTokenCount", 0)
        return Usage(last["promptTokenCount"] + last.get("toolUsePromptTokenCount", 0),
                     last.get("candidatesTokenCount", 0) + thoughts,
                     last.get("cachedContentTokenCount", 0), 0, thoughts)
    return None


def expected_sse(rel: str) -> Usage | None:
    objs = []
    for _, data in load_vector.iter_sse(payload(rel)):
        try:
            obj = json.loads(data)
        except ValueError:
            continue                      # [DONE]
        if isinstance(obj, dict):
            objs.append(obj)
    return expected_from_objects(endpoint_for(rel), objs)


def expected_json(rel: str) -> Usage | None:
    try:
        obj = json.loads(payload(rel))
    except ValueError:
        return None                       # docs_models_list.json: invalid on purpose
    if endpoint_for(rel) == "count_tokens":
        return Usage()
    return expected_from_objects(endpoint_for(rel), [obj])


def splits(data: bytes) -> list[list[bytes]]:
    """Every two-piece split, plus 1-byte chunks."""
    out = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    out.append([data[i:i + 1] for i in range(len(data))])
    return out


# -- SSESplitter on the vectors ------------------------------------------------------

@pytest.mark.parametrize("rel", SSE_VECTORS)
def test_splitter_same_events_for_every_split(rel: str) -> None:
    data = payload(rel)
    want_events, want_rest = reference_split(data)
    assert want_events or want_rest
    for chunks in splits(data):
        splitter = SSESplitter()
        events = [e for c in chunks for e in splitter.feed(c)]
        assert splitter.pending() == want_rest
        rest = splitter.flush()
        assert events == want_events
        assert b"".join(events) + rest == data


@pytest.mark.parametrize("rel", SSE_VECTORS)
def test_event_data_matches_reference_parser(rel: str) -> None:
    data = payload(rel)
    splitter = SSESplitter()
    events = splitter.feed(data)
    tail = splitter.flush()
    if tail:
        events.append(tail)
    got = [(event_name(e), event_data(e)) for e in events]
    got = [(n and n.decode(), d and d.decode()) for n, d in got if n is not None or d is not None]
    want = [(n, d) for n, d in load_vector.iter_sse(data)]
    assert got == want


# -- meters on the vectors -----------------------------------------------------------

@pytest.mark.parametrize("rel", SSE_VECTORS)
def test_stream_meter_usage_equals_vector(rel: str) -> None:
    data = payload(rel)
    want = expected_sse(rel)
    for chunks in splits(data):
        meter = meter_for(endpoint_for(rel), stream=True)
        for chunk in chunks:
            meter.feed(chunk)
        meter.finish()
        assert meter.usage() == want, rel
        assert meter.complete() == (want is not None)
        if b"delta" in data or b'"parts"' in data:
            assert meter.delivered_tokens() >= 1


@pytest.mark.parametrize("rel", JSON_VECTORS)
def test_body_meter_usage_equals_vector(rel: str) -> None:
    data = payload(rel)
    want = expected_json(rel)
    meter = meter_for(endpoint_for(rel), stream=False)
    meter.feed_body(data)
    assert meter.usage() == want, rel
    # The same body arriving in chunks through feed() + finish().
    for chunks in (splits(data)[len(data) // 2], [data[i:i + 7] for i in range(0, len(data), 7)]):
        meter = meter_for(endpoint_for(rel), stream=False)
        for chunk in chunks:
            meter.feed(chunk)
        meter.finish()
        assert meter.usage() == want, rel


def test_gemini_json_array_stream_every_split() -> None:
    # The non-SSE streamGenerateContent form, built from the SSE capture's own chunks,
    # pretty-printed the way the REST API sends it.
    rel = "gemini/stream_function_call_thought_signature.sse"
    objs = [json.loads(d) for _, d in load_vector.iter_sse(payload(rel))]
    body = ("[" + "\r\n,".join(json.dumps(o, indent=2) for o in objs) + "\r\n]").encode()
    want = expected_from_objects("streamGenerateContent", objs)
    assert want is not None and want.reasoning_tokens == 168
    for chunks in splits(body)[::7] + [splits(body)[-1]]:
        meter = meter_for("streamGenerateContent", stream=True, sse=False)
        for chunk in chunks:
            meter.feed(chunk)
        meter.finish()
        assert meter.usage() == want
        assert meter.complete()
    cut = GeminiArrayStreamMeter()
    cut.feed(body[: len(body) // 2])
    cut.finish()
    assert not cut.complete() and cut.delivered_tokens() >= 1
    whole = meter_for("streamGenerateContent", stream=True, sse=False)
    whole.feed_body(body)                  # the whole array at once
    assert whole.usage() == want


# -- UsageChunkDropper ---------------------------------------------------------------

def _is_usage_chunk(event: bytes) -> bool:
    data = b"".join(line[6:] for line in event.split(b"\n") if line.startswith(b"data: "))
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


OPENAI_CHAT_STREAMS = [r for r in SSE_VECTORS if r.startswith("openai/chat_")]


@pytest.mark.parametrize("rel", OPENAI_CHAT_STREAMS)
def test_dropper_removes_exactly_the_usage_chunk(rel: str) -> None:
    data = payload(rel)
    events, rest = reference_split(data)
    usage_events = [e for e in events if _is_usage_chunk(e)]
    assert len(usage_events) == 1
    want = b"".join(e for e in events if not _is_usage_chunk(e)) + rest
    assert len(want) == len(data) - len(usage_events[0])
    for chunks in splits(data):
        dropper = UsageChunkDropper()
        out = b"".join(dropper.feed(c) for c in chunks) + dropper.flush()
        assert out == want


@pytest.mark.parametrize("rel", OPENAI_CHAT_STREAMS)
def test_dropper_passes_stream_without_usage_chunk(rel: str) -> None:
    events, rest = reference_split(payload(rel))
    data = b"".join(e for e in events if not _is_usage_chunk(e)) + rest
    # include_usage streams put "usage":null on every chunk: neither dropped nor metered.
    nulls = data.replace(b'"choices":[', b'"usage":null,"choices":[')
    for stream in (data, nulls):
        for chunks in splits(stream)[::13] + [splits(stream)[-1]]:
            dropper = UsageChunkDropper()
            out = b"".join(dropper.feed(c) for c in chunks) + dropper.flush()
            assert out == stream
        meter = OpenAIChatMeter(stream=True)
        meter.feed(stream)
        meter.finish()
        assert meter.usage() is None and not meter.complete()
        assert meter.delivered_tokens() >= 1


def test_dropper_does_not_delay_complete_events() -> None:
    events, _ = reference_split(payload("openai/chat_stream_text_with_usage.sse"))
    dropper = UsageChunkDropper()
    first = events[0]
    assert dropper.feed(first) is first               # whole event: same object, no copy
    assert dropper.feed(events[1][:10]) == b""        # incomplete: held
    assert dropper.feed(events[1][10:] + events[2][:5]) == events[1]
    assert dropper.flush() == events[2][:5]


def test_dropper_oversized_event_turns_into_pass_through() -> None:
    dropper = UsageChunkDropper(max_event_size=64)
    head = b"data: {}\n\n" + b"data: " + b"x" * 100
    assert dropper.feed(head) == head
    assert dropper.feed(b"tail\n\n") == b"tail\n\n"
    assert dropper.flush() == b""


# -- hypothesis: random streams, random chunkings ------------------------------------

_TEXT = st.text(alphabet=st.sampled_from("ab {}\":,é中😀\\"), min_size=0, max_size=12)
_EOLS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[list[bytes]]]:
    """Well-formed events (exact bytes known) and each event's data values."""
    events: list[bytes] = []
    datas: list[list[bytes]] = []
    for _ in range(draw(st.integers(0, 6))):
        lines, data = [], []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["data", "data", "event", "id", "comment", "bare"]))
            value = draw(_TEXT).encode()
            if kind == "comment":
                line = b": " + value
            elif kind == "bare":
                line = b"data"             # field without colon: empty data value
                data.append(b"")
            else:
                sep = draw(st.sampled_from([b"", b" "]))
                line = kind.encode() + b":" + sep + value
                if kind == "data":         # exactly one leading space is dropped
                    data.append(value[1:] if not sep and value[:1] == b" " else value)
            lines.append(line + draw(_EOLS))
        blank = draw(_EOLS)
        if lines[-1].endswith(b"\r") and blank == b"\n":
            blank = b"\r\n"                # "\r" + "\n" would read as one CRLF
        events.append(b"".join(lines) + blank)
        datas.append(data)
    return events, b"".join(events), datas


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(stream=sse_streams(), cuts=st.lists(st.integers(0, 400), max_size=12), tail=_TEXT)
def test_random_streams_random_chunkings(stream: Any, cuts: list[int], tail: str) -> None:
    events, data, datas = stream
    data_with_tail = data + (b"data: " + tail.encode() if tail else b"")
    points = sorted({c % (len(data_with_tail) + 1) for c in cuts})
    chunks = [data_with_tail[a:b] for a, b in zip([0, *points], [*points, len(data_with_tail)])]
    splitter = SSESplitter()
    got = [e for c in chunks for e in splitter.feed(c)]
    rest = splitter.flush()
    if data.endswith(b"\r") and not tail:  # a final lone CR might still become CRLF
        assert got == events[:-1] and rest == events[-1]
    else:
        assert got == events
        assert rest == data_with_tail[len(data):]
    assert b"".join(got) + rest == data_with_tail
    for event, values in zip(events, datas):
        assert event_data(event) == (b"\n".join(values) if values else None)
        assert event.decode("utf-8")       # multi-byte characters arrive whole


# -- sanity rules --------------------------------------------------------------------

def _chat_stream(*usages: dict[str, Any]) -> bytes:
    out = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
    for usage in usages:
        out += b'data: ' + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
    return out + b"data: [DONE]\n\n"


def _meter_usage(data: bytes, **kwargs: Any) -> Usage | None:
    meter = meter_for("chat.completions", stream=True, **kwargs)
    meter.feed(data)
    meter.finish()
    return meter.usage()


def test_explicit_zero_stays_zero() -> None:
    usage = _meter_usage(_chat_stream({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}))
    assert usage == Usage(0, 0, 0, 0, 0, flagged=False)


def test_negative_values_clamped_and_flagged() -> None:
    usage = _meter_usage(_chat_stream({"prompt_tokens": -5, "completion_tokens": 7}))
    assert usage == Usage(0, 7, 0, 0, 0, flagged=True)


def test_absurd_values_clamped_to_bound_and_flagged() -> None:
    usage = _meter_usage(_chat_stream({"prompt_tokens": 10**12, "completion_tokens": 3}),
                         max_tokens_bound=1000)
    assert usage == Usage(1000, 3, 0, 0, 0, flagged=True)
    ok = _meter_usage(_chat_stream({"prompt_tokens": 1000, "completion_tokens": 3}), max_tokens_bound=1000)
    assert ok is not None and not ok.flagged


def test_non_numeric_and_inconsistent_parts_flagged() -> None:
    usage = _meter_usage(_chat_stream({"prompt_tokens": "12", "completion_tokens": 4.0,
                                       "prompt_tokens_details": {"cached_tokens": 9},
                                       "completion_tokens_details": {"reasoning_tokens": 8}}))
    # "12" is no count (0), so 9 cached cannot be part of it; 8 reasoning > 4 completion.
    assert usage == Usage(0, 4, 0, 0, 4, flagged=True)


def test_duplicate_usage_counts_once_last_wins() -> None:
    first = {"prompt_tokens": 10, "completion_tokens": 5}
    second = {"prompt_tokens": 10, "completion_tokens": 6}
    assert _meter_usage(_chat_stream(first, first)) == Usage(10, 5)
    assert _meter_usage(_chat_stream(first, second)) == Usage(10, 6)


def test_settle_rules() -> None:
    meter = meter_for("chat.completions", stream=True)
    meter.feed(_chat_stream({"prompt_tokens": 10, "completion_tokens": 5}))
    assert settle(meter, prompt_estimate=99) == (Usage(10, 5), False)
    flagged = meter_for("chat.completions", stream=True)
    flagged.feed(_chat_stream({"prompt_tokens": -1, "completion_tokens": 5}))
    assert settle(flagged, prompt_estimate=99)[1] is True
    aborted = meter_for("chat.completions", stream=True)
    aborted.feed(_chat_stream()[:-len(b"data: [DONE]\n\n")])
    usage, estimated = settle(aborted, prompt_estimate=99)
    assert estimated and usage.prompt_tokens == 99 and usage.completion_tokens >= 1
    assert settle(FreeMeter(), 99) == (Usage(), False)


# -- Anthropic -----------------------------------------------------------------------

def _anthropic_event(obj: dict[str, Any], pad: bytes = b"", eol: bytes = b"\n") -> bytes:
    return (b"event: " + obj["type"].encode() + eol + b"data: " + json.dumps(obj).encode()
            + pad + eol + eol)


def test_anthropic_message_delta_is_cumulative_and_cache_mapping() -> None:
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 20, "cache_read_input_tokens": 300, "cache_creation_input_tokens": 40,
        "output_tokens": 1}}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}
    stream = _anthropic_event(start, eol=b"\r\n") + _anthropic_event(delta, eol=b"\r\n")
    stream += _anthropic_event({"type": "message_delta", "usage": {"output_tokens": 10}}, pad=b"      ")
    stream += _anthropic_event({"type": "message_delta", "usage": {"output_tokens": 25,
                                                                    "cache_creation_input_tokens": None}})
    stream += b'event: message_stop\r\ndata: {"type":"message_stop"      }\r\n\r\n'
    meter = AnthropicMeter(stream=True)
    for i in range(0, len(stream), 5):
        meter.feed(stream[i:i + 5])
    meter.finish()
    assert meter.usage() == Usage(prompt_tokens=360, completion_tokens=25, cached_tokens=300,
                                  cache_creation_tokens=40)
    assert meter.complete()


def test_anthropic_abort_after_message_start_is_estimated() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 20, "output_tokens": 1}}}
    delta = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "x" * 400}}
    meter = meter_for("messages", stream=True)
    meter.feed(_anthropic_event(start) + _anthropic_event(delta))
    assert not meter.complete()
    usage, estimated = settle(meter, prompt_estimate=999)
    assert estimated and usage.prompt_tokens == 20 and usage.completion_tokens >= 80


# -- the rest of the API -------------------------------------------------------------

def test_ensure_include_usage() -> None:
    body = {"model": "m", "stream": True}
    new, asked = ensure_include_usage(body)
    assert new == {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    assert asked is False and body == {"model": "m", "stream": True}
    mine = {"stream": True, "stream_options": {"include_usage": True}}
    assert ensure_include_usage(mine) == (mine, True) and ensure_include_usage(mine)[0] is mine
    off = {"stream": True, "stream_options": {"include_usage": False, "x": 1}}
    assert ensure_include_usage(off) == ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, False)
    plain = {"stream": False}
    assert ensure_include_usage(plain)[0] is plain


def test_embeddings_usage_from_tail_and_fallback() -> None:
    vectors = ",".join(json.dumps({"object": "embedding", "index": i, "embedding": [0.25] * 50})
                       for i in range(20))
    body = ('{"object":"list","data":[' + vectors + '],"model":"m",'
            '"usage":{"prompt_tokens":8,"total_tokens":8}}').encode()
    reordered = ('{"usage":{"prompt_tokens":8,"total_tokens":8},"object":"list","data":['
                 + vectors + ']}').encode()
    for data in (body, reordered):
        meter = meter_for("embeddings", stream=True)   # embeddings never stream
        for i in range(0, len(data), 1000):
            meter.feed(data[i:i + 1000])
        meter.finish()
        assert meter.usage() == Usage(prompt_tokens=8) and meter.complete()


def test_splitter_max_event_size_guard() -> None:
    splitter = SSESplitter(max_event_size=32)
    assert splitter.feed(b"data: ok\n\n") == [b"data: ok\n\n"]
    with pytest.raises(SSEEventTooLarge):
        splitter.feed(b"data: " + b"y" * 40)
    assert splitter.flush() == b"data: " + b"y" * 40
    with pytest.raises(SSEEventTooLarge):
        SSESplitter(max_event_size=32).feed(b"data: " + b"z" * 40 + b"\n\n")
    meter = meter_for("chat.completions", stream=True, max_event_size=32)
    meter.feed(b"data: " + b"y" * 400)     # never raises into the tee
    meter.feed(b"\n\n")
    meter.finish()
    assert meter.usage() is None and meter.delivered_tokens() >= 100


def test_estimates() -> None:
    assert estimate_tokens_from_bytes(0) == 0
    assert estimate_tokens_from_bytes(1) == 1
    assert estimate_tokens_from_bytes(8) == 2
    assert estimate_prompt_tokens(b'{"messages":[]}') == 4
    assert meter_for("messages", stream=True).delivered_tokens() == 0


def test_meter_for_names() -> None:
    for name in ("chat.completions", "completions", "embeddings", "responses", "messages",
                 "count_tokens", "generateContent", "streamGenerateContent"):
        assert meter_for(name, stream=True).usage() in (None, Usage())
    assert isinstance(meter_for("streamGenerateContent", True, sse=False), GeminiArrayStreamMeter)
    with pytest.raises(ValueError):
        meter_for("images", stream=False)


def test_gemini_cut_mid_event_keeps_earlier_usage() -> None:
    data = payload("gemini/stream_text_usage_short.sse")
    cut = data[: data.rindex(b'"usageMetadata"') + 20]     # last event cut inside its usage
    meter = meter_for("streamGenerateContent", stream=True)
    meter.feed(cut)
    meter.finish()
    usage = meter.usage()
    assert usage is not None and usage.prompt_tokens == 7 and not meter.complete()
    assert settle(meter, 99)[1] is True


# -- one split for relay and meter ----------------------------------------------------


def _relay_and_meter(endpoint: str, data: bytes, size: int, max_event: int = 8 * 1024 * 1024) -> tuple[bytes, Any]:
    """What the forwarder does: the relay splits, the meter reads the relay's events."""
    relay = WholeEvents(max_event_size=max_event)
    meter = meter_for(endpoint, True, sse=True)
    assert meter.frames_sse()
    out = []
    for i in range(0, len(data), size):
        chunk = data[i : i + size]
        sent = relay.feed(chunk)
        meter.feed_events(relay.events, chunk if relay.events is not None else sent)
        out.append(sent)
    rest = relay.flush()
    meter.feed_events(relay.events, rest)
    meter.finish()
    return b"".join(out) + rest, meter


@pytest.mark.parametrize("rel", SSE_VECTORS)
@pytest.mark.parametrize("size", [1, 7, 97, 1 << 20])
def test_meter_on_the_relays_split_matches_its_own(rel, size):
    endpoint = endpoint_for(rel)
    if endpoint not in ("chat.completions", "responses", "messages", "streamGenerateContent"):
        return
    data = payload(rel)
    out, shared = _relay_and_meter(endpoint, data, size)
    own = meter_for(endpoint, True, sse=True)
    for i in range(0, len(data), size):
        own.feed(data[i : i + size])
    own.finish()
    assert out == data
    assert shared.usage() == own.usage() and shared.complete() == own.complete()
    assert shared.delivered_tokens() == own.delivered_tokens()


def test_meter_on_the_relays_split_counts_an_oversized_event_raw():
    event = b"data: " + b"x" * 5000 + b"\n\n"
    data = event + b'data: {"choices":[]}\n\n'
    out, meter = _relay_and_meter("chat.completions", data, 1000, max_event=1024)
    assert out == data                      # pass-through loses nothing
    assert not meter.frames_sse()           # and the meter estimates from raw bytes
    assert meter.delivered_tokens() > 0 and meter.usage() is None
