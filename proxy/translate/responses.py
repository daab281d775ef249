"""OpenAI Responses (client side) ⇄ hub: Codex CLI on a chat-only, Anthropic or Gemini model.

A Responses call goes byte for byte to an upstream that serves the Responses API
(`upstreams[].responses: true`); this codec serves the others. It is stateless:
`previous_response_id` and `conversation` need a server-side store and get a 400,
while Codex's own mode (`store: false`, the full history with reasoning items carrying
`encrypted_content`) needs none: the reasoning carrier is `encrypted_content`.

Codex's tool kinds (TRANSLATION §1.5): `custom` tools (apply_patch, free-form input)
become a function with one string parameter `input` and come back as
`custom_tool_call` items; `namespace` tools are flattened to `<ns>__<name>` and come
back with their namespace; built-in tools (web_search, local_shell...) have no
equivalent elsewhere and are dropped (P23), named in the translation header.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.translate import carrier
from proxy.translate.common import (
    ClientContext,
    as_dict,
    as_list,
    dump_args,
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

PROTOCOL = "responses"
_CUSTOM_PARAMS = {"type": "object", "properties": {"input": {"type": "string", "description": "the raw input"}},
                  "required": ["input"]}
_NS_SEP = "__"

# ============================================================================ request


def decode_request(body: dict[str, Any]) -> Request:
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise Untranslatable(name, "non-Responses", "this upstream keeps no conversation state; send the full input")
    req = Request(model=str(body.get("model", "")), messages=[])
    instructions = opt_str(body.get("instructions"), "instructions")
    if instructions:
        req.system.append(Text(instructions))
    items = body.get("input")
    if isinstance(items, str):
        req.messages.append(Message("user", [Text(items)] if items else []))
    else:
        for i, raw in enumerate(as_list(items, "input")):
            _decode_item(req, as_dict(raw, f"input[{i}]"), i)
    kinds: dict[str, list[str]] = {}
    for i, raw in enumerate(as_list(body.get("tools"), "tools")):
        _decode_tool(req, as_dict(raw, f"tools[{i}]"), kinds)
    req.tool_choice = _tool_choice(body.get("tool_choice"))
    if isinstance(body.get("parallel_tool_calls"), bool):
        req.parallel_tool_calls = body["parallel_tool_calls"]
    req.max_tokens = opt_int(body.get("max_output_tokens"), "max_output_tokens")
    req.temperature = opt_num(body.get("temperature"), "temperature")
    req.top_p = opt_num(body.get("top_p"), "top_p")
    req.stream = body.get("stream") is True
    fmt = obj(obj(body.get("text")).get("format"))
    if fmt.get("type") == "json_object":
        req.output = OutputFormat("json_object")
    elif fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        req.output = OutputFormat("json_schema", str(fmt.get("name") or "output"), schema if isinstance(schema, dict) else {},
                                  fmt.get("strict") if isinstance(fmt.get("strict"), bool) else None)
    reasoning = obj(body.get("reasoning"))
    effort = reasoning.get("effort")
    if isinstance(effort, str) and effort != "none":
        req.reasoning = Reasoning(effort=effort)
    req.user = opt_str(body.get("safety_identifier"), "safety_identifier") or opt_str(body.get("user"), "user")
    req.logprobs = bool(body.get("top_logprobs"))
    req.dropped.extend(f"tools[{k}]" for k in kinds.get("dropped", []))
    return req


def _append(req: Request, role: str, part: Part | None) -> None:
    if req.messages and req.messages[-1].role == role:
        if part is not None:
            req.messages[-1].parts.append(part)
    else:
        req.messages.append(Message(role, [part] if part is not None else []))  # type: ignore[arg-type]


def _content(content: Any, where: str) -> list[Text | Image]:
    if isinstance(content, str):
        return [Text(content)] if content else []
    out: list[Text | Image] = []
    for j, raw in enumerate(as_list(content, where)):
        part = as_dict(raw, f"{where}[{j}]")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            text = part.get("text")
            if isinstance(text, str) and text:
                out.append(Text(text))
        elif kind == "refusal":
            if isinstance(part.get("refusal"), str) and part["refusal"]:
                out.append(Text(part["refusal"]))
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise Untranslatable("input_image without image_url (file_id)", "non-Responses")
            inline = split_data_url(url)
            detail = part.get("detail") if isinstance(part.get("detail"), str) else None
            out.append(Image(inline[0], inline[1], detail=detail) if inline else Image(url=url, detail=detail))
        else:
            raise Untranslatable(f"content part '{str(kind)[:32]}'", "non-Responses")
    return out


def _decode_item(req: Request, item: dict[str, Any], i: int) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        parts = _content(item.get("content"), f"input[{i}].content")
        if role in ("system", "developer"):
            req.system.extend(p for p in parts if isinstance(p, Text))
        elif role in ("user", "assistant"):
            for p in parts:
                _append(req, role, p)
            if not parts:
                _append(req, role, None)
        else:
            raise BadInput(f"input[{i}].role must be user, assistant, system or developer.", "input")
    elif kind in ("function_call", "custom_tool_call"):
        name = str(item.get("name") or "")
        if isinstance(item.get("namespace"), str):
            name = item["namespace"] + _NS_SEP + name
        call_id, _ = carrier.split_id(str(item.get("call_id") or ""))
        if kind == "custom_tool_call":
            args = dump_args({"input": str(item.get("input") or "")})
        else:
            raw_args = item.get("arguments")
            args = raw_args if isinstance(raw_args, str) else dump_args(raw_args)
        _append(req, "assistant", ToolCall(call_id, name, args))
    elif kind in ("function_call_output", "custom_tool_call_output"):
        call_id, _ = carrier.split_id(str(item.get("call_id") or ""))
        _append(req, "user", ToolResult(call_id, _content(item.get("output"), f"input[{i}].output")))
    elif kind == "reasoning":
        summary = "".join(str(s.get("text") or "") for s in item.get("summary") or [] if isinstance(s, dict))
        encrypted = item.get("encrypted_content")
        sig = carrier.unwrap(encrypted, "openai") if isinstance(encrypted, str) and encrypted else None
        _append(req, "assistant", Thinking(summary, sig))
    elif kind == "item_reference":
        raise Untranslatable("item_reference", "non-Responses", "send the referenced items themselves")
    else:
        raise Untranslatable(f"input item '{str(kind)[:40]}'", "non-Responses")


def _decode_tool(req: Request, tool: dict[str, Any], kinds: dict[str, list[str]]) -> None:
    kind = tool.get("type")
    if kind == "function":
        params = tool.get("parameters")
        req.tools.append(Tool(str(tool.get("name") or ""), opt_str(tool.get("description"), "description"),
                              params if isinstance(params, dict) else {}))
    elif kind == "custom":
        fmt = obj(tool.get("format"))
        description = str(tool.get("description") or "")
        if fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
            description += f"\n\nThe input follows this {fmt.get('syntax', '')} grammar:\n{fmt['definition']}"
        req.tools.append(Tool(str(tool.get("name") or ""), description.strip() or None, dict(_CUSTOM_PARAMS), freeform=True))
    elif kind == "namespace":
        ns = str(tool.get("name") or "")
        for member in tool.get("tools") or []:
            if isinstance(member, dict):
                _decode_tool(req, member, kinds)
                if req.tools and member.get("type") in ("function", "custom"):
                    req.tools[-1].name = ns + _NS_SEP + req.tools[-1].name
                    req.tools[-1].namespace = ns
    else:
        kinds.setdefault("dropped", []).append(str(kind))


def _tool_choice(value: Any) -> ToolChoice | None:
    if value is None:
        return None
    if isinstance(value, str):
        mode = {"auto": "auto", "none": "none", "required": "any"}.get(value)
        return ToolChoice(mode) if mode else None  # type: ignore[arg-type]
    choice = obj(value)
    if choice.get("type") in ("function", "custom") and isinstance(choice.get("name"), str):
        return ToolChoice("tool", choice["name"])
    return None


# ============================================================================ response


def _usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.input, "input_tokens_details": {"cached_tokens": u.cached},
            "output_tokens": u.output, "output_tokens_details": {"reasoning_tokens": u.reasoning},
            "total_tokens": u.input + u.output}


def _response(ctx: ClientContext, rid: str, status: str, output: list[dict[str, Any]], usage: Usage | None,
              incomplete: str | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": ctx.created, "status": status, "background": False,
        "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": None, "max_output_tokens": None, "model": ctx.model, "output": output,
        "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
        "store": False, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": None, "temperature": None, "truncation": "disabled",
        "usage": _usage(usage) if usage is not None else None, "user": None, "metadata": {},
    }


def _split_name(name: str, ctx: ClientContext) -> dict[str, str]:
    """A namespace member's call goes back as {namespace, name}: Codex resolves it by both (P22)."""
    ns = ctx.namespaces.get(name)
    return {"namespace": ns, "name": name[len(ns) + len(_NS_SEP):]} if ns else {"name": name}


def _custom_input(arguments: str) -> str:
    try:
        raw = orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError:
        return arguments
    value = raw.get("input") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else arguments


def _call_item(call: ToolCall, ctx: ClientContext, status: str) -> dict[str, Any]:
    call_id = carrier.safe_id(call.id)
    if call.name in ctx.freeform_tools:
        return {"type": "custom_tool_call", "id": new_id("ctc_"), "call_id": call_id, **_split_name(call.name, ctx),
                "input": _custom_input(call.arguments), "status": status}
    return {"type": "function_call", "id": new_id("fc_"), "call_id": call_id, **_split_name(call.name, ctx),
            "arguments": call.arguments or "{}", "status": status}


def _reasoning_item(t: Thinking, rid: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "reasoning", "id": rid or new_id("rs_"),
                            "summary": [{"type": "summary_text", "text": t.text}] if t.text else []}
    if t.sig is not None:
        item["encrypted_content"] = carrier.wrap(t.sig)
    return item


def _text_signature_item(sig: Sig) -> dict[str, Any]:
    """A reasoning item carrying the signature of the message text before it (carrier.py)."""
    return {"type": "reasoning", "id": new_id("rs_"), "summary": [], "encrypted_content": carrier.wrap_text(sig)}


def _call_signature_item(sig: Sig) -> dict[str, Any]:
    """A reasoning item carrying the signature of the call after it (carrier.py): a
    call_id holds at most 64 characters (P14), too few for a signature."""
    return {"type": "reasoning", "id": new_id("rs_"), "summary": [], "encrypted_content": carrier.wrap_call(sig)}


def _message_item(text: str, refusal: str | None, mid: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"type": "message", "id": mid or new_id("msg_"), "status": "completed", "role": "assistant", "content": content}


def encode_response(resp: Response, ctx: ClientContext) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    text = ""
    for p in resp.parts:
        if isinstance(p, Text):
            text += p.text
            if p.sig is not None:   # a text part's signature rides on a reasoning item after it
                if text:
                    output.append(_message_item(text, None))
                    text = ""
                output.append(_text_signature_item(p.sig))
            continue
        if text:
            output.append(_message_item(text, None))
            text = ""
        if isinstance(p, ToolCall) and p.sig is not None:
            output.append(_call_signature_item(p.sig))
        output.append(_reasoning_item(p) if isinstance(p, Thinking) else _call_item(p, ctx, "completed"))
    if text or resp.refusal:
        output.append(_message_item(text, resp.refusal))
    incomplete = "max_output_tokens" if resp.finish == "length" else "content_filter" if resp.finish == "content_filter" else None
    return _response(ctx, new_id("resp_"), "incomplete" if incomplete else "completed", output, resp.usage, incomplete)


# ============================================================================ stream


class StreamEncoder:
    """Hub events (one block at a time) → the Responses event sequence: response.created,
    response.in_progress, per item output_item.added … output_item.done, then exactly one
    of response.completed / response.incomplete; every event with a growing
    sequence_number. The finished items are kept: response.completed repeats them."""

    def __init__(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        self._seq = 0
        self._id = new_id("resp_")
        self._items: list[dict[str, Any]] = []
        self._open: dict[int, dict[str, Any]] = {}       # hub index → item being built
        self._text: dict[int, str] = {}
        self._text_sigs: dict[int, Sig] = {}          # hub index of a signed message → its signature

    def _ev(self, kind: str, **fields: Any) -> bytes:
        doc = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"

    def encode(self, ev: Event) -> bytes:
        if isinstance(ev, Start):
            pending = _response(self._ctx, self._id, "in_progress", [], None)
            return self._ev("response.created", response=pending) + self._ev("response.in_progress", response=pending)
        if isinstance(ev, BlockStart):
            return self._start(ev)
        if isinstance(ev, Delta):
            return self._delta(ev)
        if isinstance(ev, Signature):
            item = self._open.get(ev.index)
            if item is not None and item["type"] == "reasoning":
                item["encrypted_content"] = carrier.wrap(ev.sig)
            elif item is not None and item["type"] == "message":
                self._text_sigs[ev.index] = ev.sig   # a reasoning item follows the message
            return b""
        if isinstance(ev, BlockStop):
            return self._stop(ev.index)
        if isinstance(ev, End):
            return self._end(ev)
        return self.failure(ev.status, ev.message)

    def _start(self, ev: BlockStart) -> bytes:
        part = ev.part
        index = len(self._items) + len(self._open)
        self._text[ev.index] = ""
        if isinstance(part, Text):
            item = {"type": "message", "id": new_id("msg_"), "status": "in_progress", "role": "assistant", "content": []}
            self._open[ev.index] = item | {"_index": index}
            empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return (self._ev("response.output_item.added", output_index=index, item=item)
                    + self._ev("response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=empty))
        if isinstance(part, Thinking):
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": []}
            if part.sig is not None:
                item["encrypted_content"] = carrier.wrap(part.sig)
            self._open[ev.index] = item | {"_index": index}
            return (self._ev("response.output_item.added", output_index=index, item=item)
                    + self._ev("response.reasoning_summary_part.added", item_id=item["id"], output_index=index,
                               summary_index=0, part={"type": "summary_text", "text": ""}))
        before = b""
        if part.sig is not None:
            carried = _call_signature_item(part.sig)
            self._items.append(carried)
            before = (self._ev("response.output_item.added", output_index=index, item=carried)
                      + self._ev("response.output_item.done", output_index=index, item=carried))
            index += 1
        item = _call_item(part, self._ctx, "in_progress")
        if item["type"] == "function_call":
            item["arguments"] = ""
        else:
            item["input"] = ""
        self._open[ev.index] = item | {"_index": index}
        return before + self._ev("response.output_item.added", output_index=index, item=item)

    def _delta(self, ev: Delta) -> bytes:
        item = self._open.get(ev.index)
        if item is None or not ev.text:
            return b""
        self._text[ev.index] += ev.text
        index = item["_index"]
        if item["type"] == "message":
            return self._ev("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                            delta=ev.text, logprobs=[])
        if item["type"] == "reasoning":
            return self._ev("response.reasoning_summary_text.delta", item_id=item["id"], output_index=index,
                            summary_index=0, delta=ev.text)
        if item["type"] == "function_call":
            return self._ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=ev.text)
        return b""   # a custom tool's input is a JSON string value until the call is whole

    def _stop(self, hub_index: int) -> bytes:
        item = self._open.pop(hub_index, None)
        if item is None:
            return b""
        index = item.pop("_index")
        text = self._text.pop(hub_index, "")
        out = b""
        item["status"] = "completed"
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            out += self._ev("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text,
                            logprobs=[])
            out += self._ev("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part)
        elif item["type"] == "reasoning":
            del item["status"]
            part = {"type": "summary_text", "text": text}
            item["summary"] = [part] if text else []
            out += self._ev("response.reasoning_summary_text.done", item_id=item["id"], output_index=index, summary_index=0,
                            text=text)
            out += self._ev("response.reasoning_summary_part.done", item_id=item["id"], output_index=index, summary_index=0,
                            part=part)
        elif item["type"] == "function_call":
            item["arguments"] = text or "{}"
            out += self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=item["arguments"])
        else:
            value = _custom_input(text)
            item["input"] = value
            out += self._ev("response.custom_tool_call_input.delta", item_id=item["id"], output_index=index, delta=value)
            out += self._ev("response.custom_tool_call_input.done", item_id=item["id"], output_index=index, input=value)
        self._items.append(item)
        out += self._ev("response.output_item.done", output_index=index, item=item)
        sig = self._text_sigs.pop(hub_index, None)
        if sig is not None:
            carried = _text_signature_item(sig)
            self._items.append(carried)
            out += (self._ev("response.output_item.added", output_index=index + 1, item=carried)
                    + self._ev("response.output_item.done", output_index=index + 1, item=carried))
        return out

    def _end(self, ev: End) -> bytes:
        if ev.refusal:
            self._items.append(_message_item("", ev.refusal))
        incomplete = "max_output_tokens" if ev.finish == "length" else "content_filter" if ev.finish == "content_filter" else None
        done = _response(self._ctx, self._id, "incomplete" if incomplete else "completed", self._items,
                         ev.usage or Usage(), incomplete)
        return self._ev("response.incomplete" if incomplete else "response.completed", response=done)

    def failure(self, status: int, message: str) -> bytes:
        code = "rate_limit_exceeded" if status == 429 else "server_error" if status >= 500 else "invalid_request"
        # Top-level `error` too: the openai SDK raises on it (as on a chat stream's).
        return self._ev("error", code=code, message=message, param=None,
                        error={"type": "server_error" if status >= 500 else "invalid_request_error",
                               "code": code, "message": message})
