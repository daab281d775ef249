"""OpenAI Chat Completions ⇄ hub.

As a client dialect: Cursor, Continue, Cline and the openai SDK send these requests and
read these answers. As an upstream protocol: OpenAI itself and every "OpenAI-compatible"
server (vLLM, Ollama, DeepSeek...). Chat has no slot for opaque reasoning state, so a
chat client's carrier rides on the tool call id (carrier.py). A chat upstream's own
reasoning text (`reasoning_content`, DeepSeek and vLLM) becomes a thinking part owned
by "chat" and goes back as `reasoning_content` on the assistant message that had it.
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
    effort_for_budget,
    new_id,
    obj,
    opt_int,
    opt_num,
    opt_str,
    split_data_url,
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

PROTOCOL = "chat"
# The function names OpenAI accepts (TRANSLATION §1.5); others are mapped (names.py).
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# A chat upstream's reasoning text needs no opaque value: the text itself goes back.
CHAT_SIG = Sig("chat", "")
_DROPPED_PARAMS = ("seed", "presence_penalty", "frequency_penalty", "logit_bias", "service_tier", "prediction",
                   "store", "metadata", "modalities", "audio", "verbosity", "web_search_options")

# ============================================================================ client side: request


def decode_request(body: dict[str, Any]) -> Request:
    req = Request(model=str(body.get("model", "")), messages=[])
    for i, raw in enumerate(as_list(body.get("messages"), "messages")):
        msg = as_dict(raw, f"messages[{i}]")
        _decode_message(req, msg, i)
    req.tools = [_decode_tool(t, i) for i, t in enumerate(as_list(body.get("tools"), "tools")) if _is_function(t)]
    req.tool_choice = _decode_tool_choice(body.get("tool_choice"))
    req.parallel_tool_calls = body.get("parallel_tool_calls") if isinstance(body.get("parallel_tool_calls"), bool) else None
    max_tokens = opt_int(body.get("max_completion_tokens"), "max_completion_tokens")
    req.max_tokens = max_tokens if max_tokens is not None else opt_int(body.get("max_tokens"), "max_tokens")
    req.temperature = opt_num(body.get("temperature"), "temperature")
    req.top_p = opt_num(body.get("top_p"), "top_p")
    stop = body.get("stop")
    req.stop = [stop] if isinstance(stop, str) else [s for s in as_list(stop, "stop") if isinstance(s, str)]
    req.stream = body.get("stream") is True
    options = body.get("stream_options")
    req.include_usage = isinstance(options, dict) and options.get("include_usage") is True
    req.output = _decode_response_format(body.get("response_format"))
    effort = opt_str(body.get("reasoning_effort"), "reasoning_effort")
    if effort is not None and effort != "none":
        req.reasoning = Reasoning(effort=effort, budget=BUDGET_FOR_EFFORT.get(effort))
    req.user = opt_str(body.get("user"), "user") or opt_str(body.get("safety_identifier"), "safety_identifier")
    req.n = opt_int(body.get("n"), "n") or 1
    req.logprobs = body.get("logprobs") is True or body.get("top_logprobs") is not None
    req.dropped = [name for name in _DROPPED_PARAMS if body.get(name) is not None]
    return req


def _is_function(tool: Any) -> bool:
    if not isinstance(tool, dict):
        raise BadInput("'tools' entries must be objects.", "tools")
    kind = tool.get("type", "function")
    if kind != "function":
        raise Untranslatable(f"tools[type={str(kind)[:32]}]", "non-chat", "only function tools translate")
    return True


def _decode_tool(tool: dict[str, Any], i: int) -> Tool:
    fn = as_dict(tool.get("function"), f"tools[{i}].function")
    name = opt_str(fn.get("name"), f"tools[{i}].function.name")
    if not name:
        raise BadInput(f"tools[{i}].function.name is required.", "tools")
    params = fn.get("parameters")
    return Tool(name, opt_str(fn.get("description"), "description"), params if isinstance(params, dict) else {},
                tool.get("cache_control") if isinstance(tool.get("cache_control"), dict) else None)


def _decode_tool_choice(value: Any) -> ToolChoice | None:
    if value is None:
        return None
    if isinstance(value, str):
        mode = {"auto": "auto", "none": "none", "required": "any"}.get(value)
        if mode is None:
            raise BadInput(f"Unknown tool_choice '{value[:32]}'.", "tool_choice")
        return ToolChoice(mode)  # type: ignore[arg-type]
    choice = as_dict(value, "tool_choice")
    kind = choice.get("type")
    if kind == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        return ToolChoice("tool", opt_str(name, "tool_choice.function.name"))
    # Cursor sends Anthropic-shaped tool_choice objects on the chat route (issue 22, item 8).
    if kind in ("auto", "any", "none"):
        return ToolChoice(kind)
    if kind == "tool":
        return ToolChoice("tool", opt_str(choice.get("name"), "tool_choice.name"))
    raise BadInput("Unknown tool_choice object.", "tool_choice")


def _decode_response_format(value: Any) -> OutputFormat | None:
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    if kind == "json_object":
        return OutputFormat("json_object")
    if kind == "json_schema":
        spec = as_dict(value.get("json_schema"), "response_format.json_schema")
        schema = spec.get("schema")
        return OutputFormat("json_schema", str(spec.get("name") or "output"), schema if isinstance(schema, dict) else {},
                            spec.get("strict") if isinstance(spec.get("strict"), bool) else None)
    return None


def _content_parts(content: Any, where: str) -> list[Text | Image]:
    if content is None:
        return []
    if isinstance(content, str):
        return [Text(content)] if content else []
    out: list[Text | Image] = []
    for j, raw in enumerate(as_list(content, where)):
        part = as_dict(raw, f"{where}[{j}]")
        kind = part.get("type")
        cache = part.get("cache_control") if isinstance(part.get("cache_control"), dict) else None
        if kind in ("text", "input_text", "output_text"):
            text = part.get("text")
            if isinstance(text, str) and text:
                out.append(Text(text, cache))
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise BadInput(f"{where}[{j}].image_url.url must be a string.", "messages")
            detail = spec.get("detail") if isinstance(spec, dict) else None
            out.append(_image_from_url(url, detail, cache))
        elif kind == "refusal":
            text = part.get("refusal")
            if isinstance(text, str) and text:
                out.append(Text(text))
        else:
            raise Untranslatable(f"content part '{str(kind)[:32]}'", "non-chat")
    return out


def _image_from_url(url: str, detail: Any, cache: dict[str, Any] | None) -> Image:
    inline = split_data_url(url)
    if inline is not None:
        return Image(media_type=inline[0], data=inline[1], detail=detail if isinstance(detail, str) else None, cache=cache)
    return Image(url=url, detail=detail if isinstance(detail, str) else None, cache=cache)


def _decode_message(req: Request, msg: dict[str, Any], i: int) -> None:
    role = msg.get("role")
    where = f"messages[{i}].content"
    if role in ("system", "developer"):
        # Hoisted into the system prompt: the accepted loss of position (TRANSLATION §1.2).
        req.system.extend(p for p in _content_parts(msg.get("content"), where) if isinstance(p, Text))
    elif role == "user":
        _append(req, "user", list(_content_parts(msg.get("content"), where)))
    elif role == "assistant":
        _append(req, "assistant", _assistant_parts(msg, where))
    elif role in ("tool", "function"):
        call_id = opt_str(msg.get("tool_call_id"), f"messages[{i}].tool_call_id") or opt_str(msg.get("name"), "name") or ""
        call_id, _ = carrier.split_id(call_id)
        content = _content_parts(msg.get("content"), where)
        _append(req, "user", [ToolResult(call_id, content)])
    else:
        raise BadInput(f"messages[{i}].role '{str(role)[:32]}' is not a chat role.", "messages")


def _assistant_parts(msg: dict[str, Any], where: str) -> list[Part]:
    parts: list[Part] = []
    calls = as_list(msg.get("tool_calls"), "tool_calls")
    reasoning = msg.get("reasoning_content")
    restored: list[Thinking] = []
    decoded: list[ToolCall] = []
    for k, raw in enumerate(calls):
        call = as_dict(raw, f"tool_calls[{k}]")
        fn = as_dict(call.get("function"), f"tool_calls[{k}].function")
        call_id, payload = carrier.split_id(str(call.get("id") or ""))
        sig = None
        if payload is not None:
            restored.extend(carrier.thinking_from_payload(payload.get("t")))
            s = payload.get("s")
            if isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s):
                sig = Sig(s[0], s[1])
        args = fn.get("arguments")
        decoded.append(ToolCall(call_id, str(fn.get("name") or ""), args if isinstance(args, str) else dump_args(args), sig))
    if restored:
        parts.extend(restored)
    elif isinstance(reasoning, str) and reasoning:
        parts.append(Thinking(reasoning, CHAT_SIG))
    parts.extend(p for p in _content_parts(msg.get("content"), where) if isinstance(p, Text))
    parts.extend(decoded)
    return parts


def _append(req: Request, role: str, parts: list[Part]) -> None:
    """Consecutive turns of one role merge: tool results and the user text after them
    become one user turn, as Anthropic and Gemini need (TRANSLATION §1.3, P18)."""
    if req.messages and req.messages[-1].role == role:
        req.messages[-1].parts.extend(parts)
    else:
        req.messages.append(Message(role, parts))  # type: ignore[arg-type]


# ============================================================================ upstream side: request


def encode_request(req: Request, up: UpstreamOptions) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = "\n\n".join(t.text for t in req.system if t.text)
    if system:
        messages.append({"role": "system", "content": system})
    pending: list[str] = []       # the last assistant turn's call ids, to be answered next
    for msg in req.messages:
        if msg.role == "assistant":
            messages.extend(_cancelled(pending))
            assistant = _encode_assistant(msg.parts)
            messages.append(assistant)
            pending = [str(c["id"]) for c in assistant.get("tool_calls") or []]
        else:
            messages.extend(_encode_user(msg.parts, pending))
            pending = []
    messages.extend(_cancelled(pending))
    body: dict[str, Any] = {"model": up.model, "messages": messages}
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": {"name": t.name, **({"description": t.description} if t.description else {}),
                                              "parameters": t.parameters or {"type": "object", "properties": {}}}}
            for t in req.tools
        ]
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.tool_choice is not None:
        tc = req.tool_choice
        body["tool_choice"] = (
            {"type": "function", "function": {"name": tc.name}} if tc.mode == "tool"
            else {"auto": "auto", "any": "required", "none": "none"}[tc.mode]
        )
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.top_k is not None:
        req.dropped.append("top_k")
    if req.stop:
        body["stop"] = req.stop[:4]
    if req.output is not None:
        if req.output.kind == "json_object":
            body["response_format"] = {"type": "json_object"}
        else:
            spec: dict[str, Any] = {"name": req.output.name, "schema": req.output.schema or {}}
            if req.output.strict is not None:
                spec["strict"] = req.output.strict
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
    if req.reasoning is not None and req.reasoning.enabled:
        body["reasoning_effort"] = req.reasoning.effort or effort_for_budget(req.reasoning.budget or 4096)
    if req.user:
        body["user"] = req.user
    if req.n != 1:
        body["n"] = req.n
    if req.logprobs:
        body["logprobs"] = True
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}   # usage is billed from it
    return body


def _cancelled(call_ids: list[str]) -> list[dict[str, Any]]:
    """Answers for calls the history left open (a user interrupt): chat refuses an
    assistant turn with tool_calls that is not followed by one tool message per call."""
    return [{"role": "tool", "tool_call_id": i, "content": "Error: tool call was cancelled"} for i in call_ids]


def _encode_user(parts: list[Part], answering: list[str]) -> list[dict[str, Any]]:
    """Tool results first, one `tool` message each in the order of the calls they answer
    (a call left unanswered gets a cancelled result), then the user's own content; images
    a tool returned go in a user message after them (chat tool messages hold text only).
    A result for no call of the previous turn cannot be a tool message (chat refuses it,
    as the Responses API does: P26): its text goes with the user's."""
    results: dict[str, ToolResult] = {}
    tool_images: list[Image] = []
    rest: list[Part] = []
    for p in parts:
        if isinstance(p, ToolResult):
            if p.call_id in answering and p.call_id not in results:
                results[p.call_id] = p
            else:
                text = "".join(c.text for c in p.content if isinstance(c, Text))
                rest.append(Text(f"[result of tool call {p.call_id}]: {text or '(empty)'}"))
        else:
            rest.append(p)
    out: list[dict[str, Any]] = []
    for call_id in answering:
        result = results.get(call_id)
        if result is None:
            out.extend(_cancelled([call_id]))
            continue
        text = "".join(c.text for c in result.content if isinstance(c, Text))
        tool_images.extend(c for c in result.content if isinstance(c, Image))
        if result.is_error:
            text = "Error: " + text   # no error flag in chat: the model still sees the failure
        out.append({"role": "tool", "tool_call_id": call_id, "content": text})
    user_parts = [*tool_images, *rest]
    if user_parts:
        out.append({"role": "user", "content": _encode_content(user_parts)})
    return out


def _encode_content(parts: list[Part]) -> str | list[dict[str, Any]]:
    if all(isinstance(p, Text) for p in parts) and len(parts) == 1:
        return parts[0].text  # type: ignore[union-attr]
    out: list[dict[str, Any]] = []
    for p in parts:
        if isinstance(p, Text):
            out.append({"type": "text", "text": p.text})
        elif isinstance(p, Image):
            url = p.url if p.url is not None else f"data:{p.media_type};base64,{p.data}"
            image: dict[str, Any] = {"url": url}
            if p.detail:
                image["detail"] = p.detail
            out.append({"type": "image_url", "image_url": image})
    return out


def _encode_assistant(parts: list[Part]) -> dict[str, Any]:
    text = "".join(p.text for p in parts if isinstance(p, Text))
    calls = [p for p in parts if isinstance(p, ToolCall)]
    msg: dict[str, Any] = {"role": "assistant", "content": text or None}   # null, never "" (TRANSLATION §1.3)
    reasoning = "".join(p.text for p in parts if isinstance(p, Thinking) and p.sig is not None and p.sig.owner == "chat")
    if reasoning:
        msg["reasoning_content"] = reasoning   # DeepSeek-style upstreams need it back (P28)
    if calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}} for c in calls
        ]
    return msg


# ============================================================================ upstream side: response

_FINISH_IN: dict[str, Finish] = {
    "stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def decode_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    details = u.get("prompt_tokens_details")
    out_details = u.get("completion_tokens_details")
    return Usage(
        input=_count(u.get("prompt_tokens")),
        output=_count(u.get("completion_tokens")),
        cached=_count(details.get("cached_tokens")) if isinstance(details, dict) else 0,
        reasoning=_count(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def decode_response(doc: dict[str, Any]) -> Response:
    choices = doc.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    msg = obj(choice.get("message"))
    parts: list[Text | Thinking | ToolCall] = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        parts.append(Thinking(reasoning, CHAT_SIG))
    if isinstance(msg.get("content"), str) and msg["content"]:
        parts.append(Text(msg["content"]))
    for call in msg.get("tool_calls") or []:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            fn = call["function"]
            args = fn.get("arguments")
            parts.append(ToolCall(str(call.get("id") or new_id("call_")), str(fn.get("name") or ""),
                                  args if isinstance(args, str) else dump_args(args)))
    refusal = msg.get("refusal") if isinstance(msg.get("refusal"), str) else None
    finish = _FINISH_IN.get(str(choice.get("finish_reason")), "stop")
    if refusal and finish == "stop":
        finish = "refusal"
    return Response(str(doc.get("id") or new_id("chatcmpl-")), str(doc.get("model") or ""), parts, finish,
                    usage=decode_usage(doc.get("usage")) or Usage(), refusal=refusal)


# ============================================================================ client side: response

_FINISH_OUT: dict[str, str] = {
    "stop": "stop", "length": "length", "tool_calls": "tool_calls", "content_filter": "content_filter",
    "stop_sequence": "stop", "refusal": "content_filter", "error": "stop",
}


def encode_usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.input + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cached},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning},
    }


def _client_call_id(call: ToolCall, thinking: list[Thinking]) -> str:
    payload: dict[str, Any] = {}
    carried = [t for t in thinking if t.sig is not None and t.sig.owner != "chat"]
    if carried:
        payload["t"] = carrier.thinking_payload(carried)
    if call.sig is not None:
        payload["s"] = [call.sig.owner, call.sig.value]
    return carrier.id_with(call.id, payload) if payload else call.id


def encode_response(resp: Response, ctx: ClientContext) -> dict[str, Any]:
    thinking = [p for p in resp.parts if isinstance(p, Thinking)]
    text = "".join(p.text for p in resp.parts if isinstance(p, Text))
    calls = [p for p in resp.parts if isinstance(p, ToolCall)]
    msg: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    reasoning = "".join(t.text for t in thinking if not t.redacted)
    if reasoning:
        msg["reasoning_content"] = reasoning
    if calls:
        # The turn's thinking blocks ride on the first call's id (carrier.py).
        msg["tool_calls"] = [
            {"id": _client_call_id(c, thinking if k == 0 else []), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments or "{}"}}
            for k, c in enumerate(calls)
        ]
    msg["refusal"] = resp.refusal
    finish = "tool_calls" if calls and resp.finish in ("stop", "tool_calls") else _FINISH_OUT[resp.finish]
    return {
        "id": resp.id if resp.id.startswith("chatcmpl-") else "chatcmpl-" + resp.id,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
        "usage": encode_usage(resp.usage),
    }


# ============================================================================ upstream side: stream


class StreamDecoder:
    """Chat chunks → hub events. A tool call is opened by a new id (even at a reused
    index: Ollama sends index 0 for every call) and fed by its index; text and
    reasoning are closed when a tool call starts; every block closes at finish_reason
    (a null finish_reason is not a finish: P31)."""

    def __init__(self) -> None:
        self._started = False
        self._next = 0
        self._text: int | None = None
        self._thinking: int | None = None
        self._calls: dict[int, tuple[int, str]] = {}   # chat index → (hub index, id)
        self._open: list[int] = []
        self._finish: Finish | None = None
        self._refusal = ""
        self._usage: Usage | None = None
        self._ended = False

    def feed(self, name: bytes | None, data: bytes) -> list[Event]:
        if self._ended:
            return []
        if data.strip() == b"[DONE]":
            return self._end()
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(chunk, dict):
            return []
        out: list[Event] = []
        if isinstance(chunk.get("error"), dict):
            self._ended = True
            err = chunk["error"]
            return [Failure(_status_of(err), str(err.get("message") or "upstream error"))]
        if not self._started:
            self._started = True
            out.append(Start(str(chunk.get("id") or new_id("chatcmpl-")), str(chunk.get("model") or "")))
        usage = decode_usage(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            self._choice(choices[0], out)
        return out

    def _choice(self, choice: dict[str, Any], out: list[Event]) -> None:
        delta = obj(choice.get("delta"))
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            if self._thinking is None:
                self._thinking = self._open_block(Thinking(""), out)
            out.append(Delta(self._thinking, reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._close_thinking(out)
            if self._text is None:
                self._text = self._open_block(Text(""), out)
            out.append(Delta(self._text, content))
        refusal = delta.get("refusal")
        if isinstance(refusal, str):
            self._refusal += refusal
        for pos, raw in enumerate(delta.get("tool_calls") or []):
            if isinstance(raw, dict):
                self._tool_delta(raw, pos, out)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self._finish = _FINISH_IN.get(reason, "stop")
            self._close_thinking(out)
            for index in self._open:
                out.append(BlockStop(index))
            self._open.clear()
            self._text = None

    def _tool_delta(self, raw: dict[str, Any], pos: int, out: list[Event]) -> None:
        given = raw.get("index")
        index = given if isinstance(given, int) else pos
        fn = obj(raw.get("function"))
        call_id = raw.get("id")
        known = self._calls.get(index)
        if isinstance(call_id, str) and call_id and (known is None or known[1] != call_id):
            self._close_thinking(out)
            if self._text is not None:
                out.append(BlockStop(self._text))
                self._open.remove(self._text)
                self._text = None
            hub = self._open_block(ToolCall(call_id, str(fn.get("name") or ""), ""), out)
            self._calls[index] = known = (hub, call_id)
        if known is None:
            return   # arguments for a call never opened: nothing to attach them to
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            out.append(Delta(known[0], args))

    def _open_block(self, part: Text | Thinking | ToolCall, out: list[Event]) -> int:
        index = self._next
        self._next += 1
        self._open.append(index)
        out.append(BlockStart(index, part))
        return index

    def _close_thinking(self, out: list[Event]) -> None:
        if self._thinking is not None:
            # The text itself is what goes back (reasoning_content); the owner says so.
            out.append(Signature(self._thinking, CHAT_SIG))
            out.append(BlockStop(self._thinking))
            self._open.remove(self._thinking)
            self._thinking = None

    def _end(self) -> list[Event]:
        self._ended = True
        if self._finish is None:
            return [Failure(502, "The upstream ended the stream without a finish reason.")]
        finish: Finish = "refusal" if self._refusal and self._finish == "stop" else self._finish
        return [End(finish, self._usage, refusal=self._refusal or None)]

    def close(self) -> list[Event]:
        """At EOF: an upstream that finished but sent no [DONE] still ends cleanly."""
        return [] if self._ended else self._end()


def _status_of(err: dict[str, Any]) -> int:
    code = err.get("code")
    if isinstance(code, int):
        return code
    kind = str(err.get("type") or "")
    return 429 if "rate" in kind else 400 if "invalid" in kind else 500


# ============================================================================ client side: stream


class StreamEncoder:
    """Hub events → chat chunks: role chunk at once, tool-call deltas by the client's own
    counter (never the upstream's block index: P8), one finish chunk, the usage chunk
    only when the client asked for it, then [DONE]."""

    def __init__(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        self._id = new_id("chatcmpl-")
        self._kinds: dict[int, str] = {}
        self._slots: dict[int, int] = {}
        self._thinking: dict[int, Thinking] = {}
        self._done_thinking: list[Thinking] = []
        self._calls = 0
        self._head = b""

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        doc = {"id": self._id, "object": "chat.completion.chunk", "created": self._ctx.created,
               "model": self._ctx.model, "choices": [choice]}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def encode(self, ev: Event) -> bytes:
        if isinstance(ev, Start):
            return self._chunk({"role": "assistant", "content": ""})
        if isinstance(ev, BlockStart):
            return self._start(ev)
        if isinstance(ev, Delta):
            kind = self._kinds.get(ev.index)
            if kind == "text":
                return self._chunk({"content": ev.text})
            if kind == "thinking":
                self._thinking[ev.index].text += ev.text
                return self._chunk({"reasoning_content": ev.text})
            if kind == "tool":
                return self._chunk({"tool_calls": [{"index": self._slots[ev.index], "function": {"arguments": ev.text}}]})
            return b""
        if isinstance(ev, Signature):
            block = self._thinking.get(ev.index)
            if block is not None:
                block.sig = ev.sig
            return b""
        if isinstance(ev, BlockStop):
            block = self._thinking.pop(ev.index, None)
            if block is not None:
                self._done_thinking.append(block)
            return b""
        if isinstance(ev, End):
            return self._end(ev)
        return self.failure(ev.status, ev.message)

    def _start(self, ev: BlockStart) -> bytes:
        part = ev.part
        if isinstance(part, Text):
            self._kinds[ev.index] = "text"
            return b""
        if isinstance(part, Thinking):
            self._kinds[ev.index] = "thinking"
            self._thinking[ev.index] = Thinking("", part.sig, part.redacted)
            return b""
        self._kinds[ev.index] = "tool"
        slot = self._slots[ev.index] = self._calls
        self._calls += 1
        # The turn's finished thinking blocks ride on its first call's id (they came first).
        carried, self._done_thinking = self._done_thinking, []
        call_id = _client_call_id(part, carried)
        return self._chunk({"tool_calls": [{"index": slot, "id": call_id, "type": "function",
                                            "function": {"name": part.name, "arguments": ""}}]})

    def _end(self, ev: End) -> bytes:
        finish = "tool_calls" if self._calls and ev.finish in ("stop", "tool_calls") else _FINISH_OUT[ev.finish]
        delta: dict[str, Any] = {}
        if ev.refusal:
            delta["refusal"] = ev.refusal
        out = self._chunk(delta, finish)
        if self._ctx.include_usage:
            doc = {"id": self._id, "object": "chat.completion.chunk", "created": self._ctx.created,
                   "model": self._ctx.model, "choices": [], "usage": encode_usage(ev.usage or Usage())}
            out += b"data: " + orjson.dumps(doc) + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def failure(self, status: int, message: str) -> bytes:
        kind = "rate_limit_error" if status == 429 else "invalid_request_error" if 400 <= status < 500 else "api_error"
        err = {"error": {"message": message, "type": kind, "param": None, "code": "upstream_error"}}
        return b"data: " + orjson.dumps(err) + b"\n\n"
