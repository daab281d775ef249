"""Anthropic Messages ⇄ hub.

As a client dialect: Claude Code and the anthropic SDK. As an upstream protocol: the
Messages API, whose rules the request encoder must meet (TRANSLATION §1.3): roles
alternate starting with user, every tool_use is answered by tool_result blocks at the
head of the next user turn, no empty text blocks, `max_tokens` is required, and with
thinking on, the last assistant turn with tool_use starts with its signed thinking.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.translate import carrier
from proxy.translate.common import (
    BUDGET_FOR_EFFORT,
    ClientContext,
    UpstreamOptions,
    as_dict,
    as_list,
    dump_args,
    new_id,
    obj,
    opt_int,
    opt_num,
    opt_str,
    parse_args,
)
from proxy.translate.hub import (
    BadInput,
    BlockStart,
    BlockStop,
    Delta,
    End,
    Event,
    Failure,
    Finish,
    Image,
    Message,
    OutputFormat,
    Part,
    Reasoning,
    Request,
    Response,
    Sig,
    Signature,
    Start,
    Text,
    Thinking,
    Tool,
    ToolCall,
    ToolChoice,
    ToolResult,
    Untranslatable,
    Usage,
)

PROTOCOL = "anthropic"
# Tool definitions take up to 128 characters, but tool_use names in the history are
# refused past 64 (TRANSLATION §1.5): 64 keeps a name valid in both places.
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_MIN_BUDGET = 1024
_JSON_ONLY = "Respond with a single JSON object and nothing else."

# ============================================================================ client side: request


def decode_request(body: dict[str, Any]) -> Request:
    req = Request(model=str(body.get("model", "")), messages=[])
    system = body.get("system")
    if isinstance(system, str):
        req.system = [Text(system)] if system else []
    else:
        req.system = [p for p in _blocks(system, "system") if isinstance(p, Text)]
    for i, raw in enumerate(as_list(body.get("messages"), "messages")):
        msg = as_dict(raw, f"messages[{i}]")
        role = msg.get("role")
        parts = _blocks(msg.get("content"), f"messages[{i}].content")
        if role == "system":   # Claude Code ≥ 2.1.154 puts reminders here (CLIENTS.md item 33)
            req.system.extend(p for p in parts if isinstance(p, Text))
        elif role in ("user", "assistant"):
            if req.messages and req.messages[-1].role == role:
                req.messages[-1].parts.extend(parts)
            else:
                req.messages.append(Message(role, parts))
        else:
            raise BadInput(f"messages[{i}].role must be 'user' or 'assistant'.", "messages")
    req.tools = [_decode_tool(t, i) for i, t in enumerate(as_list(body.get("tools"), "tools"))]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind not in ("auto", "any", "tool", "none"):
            raise BadInput("tool_choice.type must be auto, any, tool or none.", "tool_choice")
        req.tool_choice = ToolChoice(kind, opt_str(choice.get("name"), "tool_choice.name"))
        if choice.get("disable_parallel_tool_use") is True:
            req.parallel_tool_calls = False
    req.max_tokens = opt_int(body.get("max_tokens"), "max_tokens")
    req.temperature = opt_num(body.get("temperature"), "temperature")
    req.top_p = opt_num(body.get("top_p"), "top_p")
    req.top_k = opt_int(body.get("top_k"), "top_k")
    req.stop = [s for s in as_list(body.get("stop_sequences"), "stop_sequences") if isinstance(s, str)]
    req.stream = body.get("stream") is True
    thinking = body.get("thinking")
    config = obj(body.get("output_config"))
    effort = config.get("effort") if isinstance(config.get("effort"), str) else None
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        budget = opt_int(thinking.get("budget_tokens"), "thinking.budget_tokens")
        req.reasoning = Reasoning(effort=effort, budget=budget or BUDGET_FOR_EFFORT.get(effort or "medium"))
    fmt = config.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        req.output = OutputFormat("json_schema", "output", schema if isinstance(schema, dict) else {})
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        req.user = opt_str(metadata.get("user_id"), "metadata.user_id")
    return req


def _decode_tool(raw: Any, i: int) -> Tool:
    tool = as_dict(raw, f"tools[{i}]")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        # Server tools (web search, code execution...) run at Anthropic only.
        raise Untranslatable(f"tools[{i}] of type '{str(kind)[:40]}'", "non-Anthropic", "server tools run at Anthropic only")
    name = opt_str(tool.get("name"), f"tools[{i}].name")
    if not name:
        raise BadInput(f"tools[{i}].name is required.", "tools")
    schema = tool.get("input_schema")
    cache = tool.get("cache_control") if isinstance(tool.get("cache_control"), dict) else None
    return Tool(name, opt_str(tool.get("description"), "description"), schema if isinstance(schema, dict) else {}, cache)


def _blocks(content: Any, where: str) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [Text(content)] if content else []
    out: list[Part] = []
    for j, raw in enumerate(as_list(content, where)):
        block = as_dict(raw, f"{where}[{j}]")
        part = _block(block, f"{where}[{j}]")
        if part is not None:
            out.append(part)
    return out


def _cache(block: dict[str, Any]) -> dict[str, Any] | None:
    value = block.get("cache_control")
    return value if isinstance(value, dict) else None


def _block(block: dict[str, Any], where: str) -> Part | None:
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return Text(text, _cache(block)) if isinstance(text, str) and text else None
    if kind == "image":
        source = as_dict(block.get("source"), f"{where}.source")
        if source.get("type") == "base64":
            return Image(media_type=opt_str(source.get("media_type"), "media_type"), data=opt_str(source.get("data"), "data"),
                         cache=_cache(block))
        if source.get("type") == "url":
            return Image(url=opt_str(source.get("url"), "url"), cache=_cache(block))
        raise Untranslatable(f"image source '{str(source.get('type'))[:32]}'", "non-Anthropic")
    if kind == "tool_use":
        call_id, payload = carrier.split_id(str(block.get("id") or ""))
        sig = None
        if payload is not None and isinstance(payload.get("s"), list) and len(payload["s"]) == 2:
            sig = Sig(str(payload["s"][0]), str(payload["s"][1]))
        return ToolCall(call_id, str(block.get("name") or ""), dump_args(block.get("input")), sig)
    if kind == "tool_result":
        call_id, _ = carrier.split_id(str(block.get("tool_use_id") or ""))
        content = block.get("content")
        inner: list[Text | Image] = []
        if isinstance(content, str):
            inner = [Text(content)] if content else []
        else:
            for k, item in enumerate(as_list(content, f"{where}.content")):
                part = _block(as_dict(item, f"{where}.content[{k}]"), f"{where}.content[{k}]") \
                    if isinstance(item, dict) and item.get("type") in ("text", "image") else None
                if part is None and isinstance(item, dict) and item.get("type") not in ("text", "image"):
                    # New block types (Claude Code's tool_reference) become text, never a 500 (P41).
                    part = Text(f"[unsupported block: {str(item.get('type'))[:40]}]")
                if isinstance(part, (Text, Image)):
                    inner.append(part)
        return ToolResult(call_id, inner, block.get("is_error") is True, cache=_cache(block))
    if kind == "thinking":
        signature = block.get("signature")
        sig = carrier.unwrap(signature, PROTOCOL) if isinstance(signature, str) and signature else None
        return Thinking(str(block.get("thinking") or ""), sig)
    if kind == "redacted_thinking":
        return Thinking("", Sig(PROTOCOL, str(block.get("data") or "")), redacted=True)
    if kind == "document":
        raise Untranslatable("document blocks", "non-Anthropic")
    # Server-tool blocks and citations have no equivalent elsewhere: their text only.
    text = block.get("text")
    return Text(text) if isinstance(text, str) and text else Text(f"[unsupported block: {str(kind)[:40]}]")


# ============================================================================ upstream side: request


def encode_request(req: Request, up: UpstreamOptions) -> dict[str, Any]:
    if req.n != 1:
        raise Untranslatable("n", PROTOCOL, "Anthropic returns one answer per request (n must be 1)")
    if req.logprobs:
        raise Untranslatable("logprobs", PROTOCOL, "Anthropic returns no log probabilities")
    messages = _encode_messages(req.messages)
    body: dict[str, Any] = {"model": up.model}
    max_tokens = req.max_tokens if req.max_tokens is not None else up.default_max_tokens
    body["max_tokens"] = max_tokens
    system = [_text_block(t) for t in req.system if t.text.strip()]
    if req.output is not None and req.output.kind == "json_object":
        system.append({"type": "text", "text": _JSON_ONLY})
    if system:
        body["system"] = system
    body["messages"] = messages
    thinking = _thinking_config(req, max_tokens, messages)
    if thinking is not None:
        body["thinking"] = thinking
        # Thinking accepts neither a temperature other than 1 nor top_k.
        if req.temperature is not None:
            req.dropped.append("temperature")
        if req.top_k is not None:
            req.dropped.append("top_k")
    else:
        if req.temperature is not None:
            body["temperature"] = min(1.0, max(0.0, req.temperature))   # 0..2 → 0..1
        elif req.top_p is not None:
            body["top_p"] = req.top_p   # never both: newer models refuse it (P37)
        if req.top_k is not None:
            body["top_k"] = req.top_k
    if req.temperature is not None and req.top_p is not None:
        req.dropped.append("top_p")
    stops = [s for s in req.stop if s.strip()]
    if stops:
        body["stop_sequences"] = stops
    if req.tools:
        body["tools"] = [_encode_tool(t) for t in req.tools]
    choice = _tool_choice(req, thinking is not None)
    if choice is not None:
        body["tool_choice"] = choice
    if req.output is not None and req.output.kind == "json_schema":
        body["output_config"] = {"format": {"type": "json_schema", "schema": req.output.schema or {}}}
    if req.user:
        body["metadata"] = {"user_id": req.user}
    if req.stream:
        body["stream"] = True
    _cache_breakpoints(body)
    return body


_BREAKPOINTS = 4
_MARKABLE = frozenset({"text", "image", "tool_use", "tool_result", "document"})


def _cache_breakpoints(body: dict[str, Any]) -> None:
    """Anthropic caches a prompt prefix only up to a `cache_control` marker, at most 4 per
    request (TRANSLATION §1.14; P34, P35). A client of another dialect rarely sends markers
    (Cursor does): without any, the tools, the system prompt and the conversation so far
    (the last user turn's last block, which moves forward every turn) are marked: the
    prefix an agent sends again each turn. A client's own markers are kept, the earliest
    dropped past 4."""
    marked = [b for b in _blocks_in(body) if "cache_control" in b]
    for block in marked[: max(0, len(marked) - _BREAKPOINTS)]:
        del block["cache_control"]
    if marked:
        return
    if body.get("tools"):
        body["tools"][-1]["cache_control"] = {"type": "ephemeral"}
    if body.get("system"):
        body["system"][-1]["cache_control"] = {"type": "ephemeral"}
    for msg in reversed(body["messages"]):
        if msg["role"] == "user":
            last = msg["content"][-1] if isinstance(msg["content"], list) and msg["content"] else None
            if isinstance(last, dict) and last.get("type") in _MARKABLE:
                last["cache_control"] = {"type": "ephemeral"}
            return


def _blocks_in(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every block that may carry a marker, in prompt order (tools, system, messages)."""
    out: list[dict[str, Any]] = [*body.get("tools", ()), *body.get("system", ())]
    for msg in body["messages"]:
        for block in msg["content"] if isinstance(msg["content"], list) else ():
            out.append(block)
            if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                out.extend(block["content"])
    return out


def _text_block(t: Text) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": t.text}
    if t.cache:
        block["cache_control"] = t.cache
    return block


def _encode_tool(t: Tool) -> dict[str, Any]:
    schema = dict(t.parameters) if t.parameters else {}
    if schema.get("type") != "object":
        schema = {"type": "object", "properties": {}} if not schema else {**schema, "type": "object"}
    tool: dict[str, Any] = {"name": t.name, "input_schema": schema}
    if t.description:
        tool["description"] = t.description
    if t.cache:
        tool["cache_control"] = t.cache
    return tool


def _tool_choice(req: Request, thinking: bool) -> dict[str, Any] | None:
    tc = req.tool_choice
    if tc is None and req.parallel_tool_calls is not False:
        return None
    mode = tc.mode if tc is not None else "auto"
    if not req.tools and mode != "none":
        return None
    choice: dict[str, Any] = {"type": mode}
    if mode == "tool":
        choice["name"] = tc.name if tc is not None else None
    if req.parallel_tool_calls is False and mode != "none":
        choice["disable_parallel_tool_use"] = True
    return choice


def _thinking_config(req: Request, max_tokens: int, messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    r = req.reasoning
    if r is None or not r.enabled:
        return None
    if req.tool_choice is not None and req.tool_choice.mode in ("any", "tool"):
        req.dropped.append("thinking (a forced tool choice excludes it)")
        return None
    if max_tokens <= _MIN_BUDGET:
        req.dropped.append("thinking (max_tokens too small)")
        return None
    if not _history_signed(messages):
        # The last tool-using assistant turn has no thinking of Anthropic's to lead with:
        # the API would refuse the request, so it runs without thinking (TRANSLATION §2.5).
        req.dropped.append("thinking (history without signed thinking)")
        return None
    budget = min(max(r.budget or BUDGET_FOR_EFFORT.get(r.effort or "medium", 8192), _MIN_BUDGET), max_tokens - 1)
    return {"type": "enabled", "budget_tokens": budget}


def _history_signed(messages: list[dict[str, Any]]) -> bool:
    for msg in reversed(messages):
        if msg["role"] != "assistant":
            continue
        content = msg["content"]
        if not any(b["type"] == "tool_use" for b in content):
            return True
        return content[0]["type"] in ("thinking", "redacted_thinking")
    return True


def _encode_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    pending_calls: list[str] = []
    for msg in messages:
        if msg.role == "assistant":
            blocks = _assistant_blocks(msg.parts)
            if not blocks:
                continue
            if out and out[-1]["role"] == "assistant":
                out[-1]["content"].extend(blocks)
            else:
                if pending_calls:
                    out.append({"role": "user", "content": _cancelled(pending_calls)})
                if not out:
                    # Must start with a user turn.
                    out.append({"role": "user", "content": [{"type": "text", "text": "(conversation continues)"}]})
                out.append({"role": "assistant", "content": blocks})
            pending_calls = [b["id"] for b in blocks if b["type"] == "tool_use"]
        else:
            blocks = _user_blocks(msg.parts, pending_calls)
            pending_calls = []
            if not blocks:
                continue
            if out and out[-1]["role"] == "user":
                out[-1]["content"].extend(blocks)
            else:
                out.append({"role": "user", "content": blocks})
    if pending_calls and out and out[-1]["role"] == "assistant" and len(out) > 1:
        pass   # a trailing tool_use turn is the client's prefill; nothing answers it yet
    if not out:
        out.append({"role": "user", "content": [{"type": "text", "text": "."}]})
    return out


def _cancelled(ids: list[str]) -> list[dict[str, Any]]:
    return [{"type": "tool_result", "tool_use_id": i, "content": "tool call was cancelled", "is_error": True} for i in ids]


def _assistant_blocks(parts: list[Part]) -> list[dict[str, Any]]:
    thinking: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for p in parts:
        if isinstance(p, Thinking):
            # Only Anthropic's own signed blocks can go back; others are someone else's state.
            if p.sig is not None and p.sig.owner == PROTOCOL:
                if p.redacted:
                    thinking.append({"type": "redacted_thinking", "data": p.sig.value})
                else:
                    thinking.append({"type": "thinking", "thinking": p.text, "signature": p.sig.value})
        elif isinstance(p, Text):
            if p.text.strip():
                rest.append(_text_block(p))
        elif isinstance(p, ToolCall):
            rest.append({"type": "tool_use", "id": carrier.safe_id(p.id), "name": p.name, "input": parse_args(p.arguments)})
    return thinking + rest


def _image_block(p: Image) -> dict[str, Any]:
    if p.url is not None:
        block: dict[str, Any] = {"type": "image", "source": {"type": "url", "url": p.url}}
    else:
        block = {"type": "image", "source": {"type": "base64", "media_type": p.media_type, "data": p.data}}
    if p.cache:
        block["cache_control"] = p.cache
    return block


def _user_blocks(parts: list[Part], answering: list[str]) -> list[dict[str, Any]]:
    """tool_result blocks first, in the order of the calls they answer, then the rest."""
    results: dict[str, dict[str, Any]] = {}
    rest: list[dict[str, Any]] = []
    for p in parts:
        if isinstance(p, ToolResult):
            content: list[dict[str, Any]] = []
            for c in p.content:
                if isinstance(c, Text) and c.text.strip():
                    content.append({"type": "text", "text": c.text})
                elif isinstance(c, Image):
                    content.append(_image_block(c))
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": carrier.safe_id(p.call_id), "content": content}
            if p.is_error:
                block["is_error"] = True
            if p.cache:
                block["cache_control"] = p.cache
            results[block["tool_use_id"]] = block
        elif isinstance(p, Text):
            if p.text.strip():
                rest.append(_text_block(p))
        elif isinstance(p, Image):
            rest.append(_image_block(p))
    ordered = [results.pop(i) if i in results else _cancelled([i])[0] for i in answering]
    # Results for calls that are not in the previous turn cannot be tool_result blocks.
    for block in results.values():
        text = "".join(c.get("text", "") for c in block["content"] if isinstance(c, dict))
        rest.append({"type": "text", "text": f"[result of tool call {block['tool_use_id']}]: {text or '(empty)'}"})
    return ordered + rest


# ============================================================================ token counting

# What count_tokens takes: a Messages body without the answer's settings (the API refuses
# max_tokens, stream, temperature... there as extra inputs).
_COUNT_FIELDS = ("model", "system", "messages", "tools", "tool_choice", "thinking")


def decode_count_request(body: dict[str, Any]) -> Request:
    """A count_tokens body (a Messages body without max_tokens) as the hub's request."""
    req = decode_request(body)
    if not req.messages:
        raise BadInput("messages: at least one message is required.", "messages")
    return req


def encode_count_request(req: Request, up: UpstreamOptions) -> dict[str, Any]:
    body = encode_request(req, up)
    return {name: body[name] for name in _COUNT_FIELDS if name in body}


def decode_count_response(doc: dict[str, Any]) -> int | None:
    value = doc.get("input_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def encode_count_response(tokens: int) -> dict[str, Any]:
    return {"input_tokens": tokens}


# ============================================================================ upstream side: response

_FINISH_IN: dict[str, Finish] = {
    "end_turn": "stop", "max_tokens": "length", "tool_use": "tool_calls", "stop_sequence": "stop_sequence",
    "refusal": "refusal", "pause_turn": "stop", "model_context_window_exceeded": "length",
}


def decode_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    read = _count(u.get("cache_read_input_tokens"))
    write = _count(u.get("cache_creation_input_tokens"))
    details = u.get("output_tokens_details")
    return Usage(input=_count(u.get("input_tokens")) + read + write, output=_count(u.get("output_tokens")),
                 cached=read, cache_write=write,
                 reasoning=_count(details.get("thinking_tokens")) if isinstance(details, dict) else 0)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def decode_response(doc: dict[str, Any]) -> Response:
    parts: list[Text | Thinking | ToolCall] = []
    for block in doc.get("content") or []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(Text(block["text"]))
        elif kind == "thinking":
            sig = block.get("signature")
            parts.append(Thinking(str(block.get("thinking") or ""), Sig(PROTOCOL, sig) if isinstance(sig, str) and sig else None))
        elif kind == "redacted_thinking":
            parts.append(Thinking("", Sig(PROTOCOL, str(block.get("data") or "")), redacted=True))
        elif kind == "tool_use":
            parts.append(ToolCall(str(block.get("id") or new_id("toolu_")), str(block.get("name") or ""), dump_args(block.get("input"))))
    finish = _FINISH_IN.get(str(doc.get("stop_reason")), "stop")
    seq = doc.get("stop_sequence") if isinstance(doc.get("stop_sequence"), str) else None
    refusal = None
    if finish == "refusal":
        details = doc.get("stop_details")
        refusal = str(details.get("explanation") or "refused") if isinstance(details, dict) else "The model declined to answer."
    return Response(str(doc.get("id") or new_id("msg_")), str(doc.get("model") or ""), parts, finish, seq,
                    decode_usage(doc.get("usage")) or Usage(), refusal)


# ============================================================================ client side: response

_FINISH_OUT: dict[str, str] = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal",
    "stop_sequence": "stop_sequence", "refusal": "refusal", "error": "end_turn",
}


def encode_usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.uncached_input, "cache_creation_input_tokens": u.cache_write,
            "cache_read_input_tokens": u.cached, "output_tokens": u.output}


def client_signature(sig: Sig | None) -> str:
    """A thinking block without a signature is dropped by Claude Code: always give one."""
    return carrier.wrap(sig if sig is not None else Sig("none", ""))


def client_tool_id(call: ToolCall) -> str:
    return carrier.id_with(call.id, {"s": [call.sig.owner, call.sig.value]}) if call.sig is not None else call.id


def encode_response(resp: Response, ctx: ClientContext) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for p in resp.parts:
        if isinstance(p, Thinking):
            if p.redacted and p.sig is not None:
                content.append({"type": "redacted_thinking", "data": carrier.wrap(p.sig)})
            else:
                content.append({"type": "thinking", "thinking": p.text, "signature": client_signature(p.sig)})
        elif isinstance(p, Text):
            if p.text:
                content.append({"type": "text", "text": p.text})
            if p.sig is not None:   # a text part's signature: Anthropic text has no slot (carrier.py)
                content.append({"type": "thinking", "thinking": "", "signature": carrier.wrap_text(p.sig)})
        else:
            content.append({"type": "tool_use", "id": client_tool_id(p), "name": p.name, "input": parse_args(p.arguments)})
    if resp.refusal and not any(b["type"] == "text" for b in content):
        content.append({"type": "text", "text": resp.refusal})
    has_calls = any(isinstance(p, ToolCall) for p in resp.parts)
    stop = "tool_use" if has_calls and resp.finish in ("stop", "tool_calls") else _FINISH_OUT[resp.finish]
    return {
        "id": resp.id if resp.id.startswith("msg_") else new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": ctx.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": resp.stop_sequence,
        "usage": encode_usage(resp.usage),
    }


# ============================================================================ upstream side: stream

_ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 502, "permission_error": 502, "not_found_error": 404,
    "rate_limit_error": 429, "overloaded_error": 529, "api_error": 500, "timeout_error": 504, "billing_error": 402,
}


class StreamDecoder:
    """Anthropic events → hub events, nearly one to one. `message_delta.usage` is
    cumulative; blocks of server tools (no equivalent elsewhere) are skipped."""

    def __init__(self) -> None:
        self._blocks: dict[int, int] = {}   # Anthropic index → hub index
        self._next = 0
        self._usage = Usage()
        self._finish: Finish = "stop"
        self._seq: str | None = None
        self._ended = False

    def feed(self, name: bytes | None, data: bytes) -> list[Event]:
        if self._ended:
            return []
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(ev, dict):
            return []
        kind = ev.get("type")
        if kind == "message_start":
            msg = obj(ev.get("message"))
            self._usage = decode_usage(msg.get("usage")) or Usage()
            return [Start(str(msg.get("id") or new_id("msg_")), str(msg.get("model") or ""), self._usage)]
        if kind == "content_block_start":
            return self._start(ev)
        if kind == "content_block_delta":
            return self._delta(ev)
        if kind == "content_block_stop":
            index = self._blocks.get(ev.get("index"))  # type: ignore[arg-type]
            return [BlockStop(index)] if index is not None else []
        if kind == "message_delta":
            delta = obj(ev.get("delta"))
            self._finish = _FINISH_IN.get(str(delta.get("stop_reason")), "stop")
            self._seq = delta.get("stop_sequence") if isinstance(delta.get("stop_sequence"), str) else None
            u = ev.get("usage")
            if isinstance(u, dict):
                later = decode_usage({**self._wire_usage(), **u})
                if later is not None:
                    self._usage = later
            return []
        if kind == "message_stop":
            self._ended = True
            return [End(self._finish, self._usage, self._seq)]
        if kind == "error":
            self._ended = True
            err = obj(ev.get("error"))
            return [Failure(_ERROR_STATUS.get(str(err.get("type")), 500), str(err.get("message") or "upstream error"))]
        return []

    def _wire_usage(self) -> dict[str, int]:
        u = self._usage
        return {"input_tokens": u.uncached_input, "cache_read_input_tokens": u.cached,
                "cache_creation_input_tokens": u.cache_write, "output_tokens": u.output}

    def _start(self, ev: dict[str, Any]) -> list[Event]:
        block = obj(ev.get("content_block"))
        kind = block.get("type")
        part: Text | Thinking | ToolCall
        if kind == "text":
            part = Text("")
        elif kind == "thinking":
            part = Thinking("")
        elif kind == "redacted_thinking":
            part = Thinking("", Sig(PROTOCOL, str(block.get("data") or "")), redacted=True)
        elif kind == "tool_use":
            part = ToolCall(str(block.get("id") or new_id("toolu_")), str(block.get("name") or ""), "")
        else:
            return []
        index = self._blocks[ev.get("index")] = self._next  # type: ignore[index]
        self._next += 1
        out: list[Event] = [BlockStart(index, part)]
        if kind == "text" and block.get("text"):
            out.append(Delta(index, str(block["text"])))
        return out

    def _delta(self, ev: dict[str, Any]) -> list[Event]:
        index = self._blocks.get(ev.get("index"))  # type: ignore[arg-type]
        delta = obj(ev.get("delta"))
        if index is None:
            return []
        kind = delta.get("type")
        text = delta.get("text") if kind == "text_delta" else delta.get("thinking") if kind == "thinking_delta" \
            else delta.get("partial_json") if kind == "input_json_delta" else None
        if isinstance(text, str):
            return [Delta(index, text)] if text else []
        if kind == "signature_delta" and isinstance(delta.get("signature"), str):
            return [Signature(index, Sig(PROTOCOL, delta["signature"]))]
        return []

    def close(self) -> list[Event]:
        if self._ended:
            return []
        self._ended = True
        return [Failure(502, "The upstream ended the stream before message_stop.")]


# ============================================================================ client side: stream


# A block kind's delta: its type and the field that carries the fragment.
_DELTA_SHAPES = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking"),
                 "tool": ("input_json_delta", "partial_json")}


def _event(name: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


class StreamEncoder:
    """Hub events (one block open at a time: see sequence.py) → Anthropic events.
    Block indexes are the client's own 0, 1, 2...; a delta only for a started block
    (P10); a thinking block always ends with a signature (Claude Code keeps only signed
    ones); usage in message_start and message_delta, never zero input (P11, P12)."""

    def __init__(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        self._blocks: dict[int, tuple[int, str]] = {}   # hub index → (client index, kind)
        self._signed: set[int] = set()
        self._text_sigs: dict[int, Sig] = {}            # hub index of a signed text block → its signature
        self._count = 0
        self._calls = 0
        self._started = False

    def encode(self, ev: Event) -> bytes:
        if isinstance(ev, Start):
            return self._message_start(ev)
        if isinstance(ev, BlockStart):
            return self._block_start(ev)
        if isinstance(ev, Delta):
            found = self._blocks.get(ev.index)
            if found is None or not ev.text:
                return b""
            index, kind = found
            shape = _DELTA_SHAPES.get(kind)
            if shape is None:
                return b""
            delta = {"type": shape[0], shape[1]: ev.text}
            return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        if isinstance(ev, Signature):
            found = self._blocks.get(ev.index)
            if found is not None and found[1] == "text":
                self._text_sigs[ev.index] = ev.sig   # goes out after the text block (carrier.py)
                return b""
            if found is None or found[1] != "thinking":
                return b""
            self._signed.add(ev.index)
            return _event("content_block_delta", {"type": "content_block_delta", "index": found[0],
                                                  "delta": {"type": "signature_delta", "signature": carrier.wrap(ev.sig)}})
        if isinstance(ev, BlockStop):
            found = self._blocks.pop(ev.index, None)
            if found is None:
                return b""
            out = b""
            if found[1] == "thinking" and ev.index not in self._signed:
                out = _event("content_block_delta", {"type": "content_block_delta", "index": found[0],
                                                     "delta": {"type": "signature_delta", "signature": client_signature(None)}})
            out += _event("content_block_stop", {"type": "content_block_stop", "index": found[0]})
            sig = self._text_sigs.pop(ev.index, None)
            return out if sig is None else out + self._text_signature(sig)
        if isinstance(ev, End):
            return self._end(ev)
        return self.failure(ev.status, ev.message)

    def _text_signature(self, sig: Sig) -> bytes:
        """A whole signature-only thinking block carrying a text block's signature."""
        index = self._count
        self._count += 1
        start = {"type": "content_block_start", "index": index,
                 "content_block": {"type": "thinking", "thinking": "", "signature": ""}}
        delta = {"type": "content_block_delta", "index": index,
                 "delta": {"type": "signature_delta", "signature": carrier.wrap_text(sig)}}
        return (_event("content_block_start", start) + _event("content_block_delta", delta)
                + _event("content_block_stop", {"type": "content_block_stop", "index": index}))

    def _message_start(self, ev: Start) -> bytes:
        self._started = True
        u = ev.usage if ev.usage is not None and ev.usage.input else Usage(input=max(1, self._ctx.prompt_estimate))
        usage = encode_usage(Usage(input=u.input, cached=u.cached, cache_write=u.cache_write, output=1))
        msg: dict[str, Any] = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": self._ctx.model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": usage}
        return _event("message_start", {"type": "message_start", "message": msg})

    def _block_start(self, ev: BlockStart) -> bytes:
        part = ev.part
        index = self._count
        self._count += 1
        block: dict[str, Any]
        if isinstance(part, Text):
            kind, block = "text", {"type": "text", "text": ""}
        elif isinstance(part, Thinking):
            if part.redacted and part.sig is not None:
                kind, block = "redacted", {"type": "redacted_thinking", "data": carrier.wrap(part.sig)}
            else:
                kind, block = "thinking", {"type": "thinking", "thinking": "", "signature": ""}
        else:
            self._calls += 1
            kind, block = "tool", {"type": "tool_use", "id": client_tool_id(part), "name": part.name, "input": {}}
        self._blocks[ev.index] = (index, kind)
        return _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    def _end(self, ev: End) -> bytes:
        stop = "tool_use" if self._calls and ev.finish in ("stop", "tool_calls") else _FINISH_OUT[ev.finish]
        usage = encode_usage(ev.usage or Usage())
        delta = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": ev.stop_sequence}, "usage": usage}
        return _event("message_delta", delta) + _event("message_stop", {"type": "message_stop"})

    def failure(self, status: int, message: str) -> bytes:
        kind = {429: "rate_limit_error", 529: "overloaded_error", 503: "overloaded_error", 504: "timeout_error"}.get(
            status, "invalid_request_error" if 400 <= status < 500 else "api_error")
        return _event("error", {"type": "error", "error": {"type": kind, "message": message}})
