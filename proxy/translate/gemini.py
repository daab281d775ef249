"""Gemini generateContent ⇄ hub.

As a client dialect: Gemini CLI and google-genai. As an upstream protocol: the Gemini
API, whose rules the request encoder meets (TRANSLATION §1.3, §1.5, §2.5): roles user
and model; every function call answered by a functionResponse (with the function's
name) in the next user turn, as many responses as calls; tool schemas narrowed to the
`Schema` subset; a thoughtSignature on the first function call of each model turn
(the documented `skip_thought_signature_validator` where the history has none of
Gemini's own: P7).

Thought parts: consecutive `thought: true` parts are one thinking block; a
thoughtSignature on a thought part closes it (the client encoder streams the text and
puts the signature on a last, empty thought part). A signature on a function call
stays on that call. As a client dialect, the turn's signed thinking also rides on its
first function call's id, since Gemini CLI sends back no thought parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from proxy.translate import carrier
from proxy.translate.common import (
    ClientContext,
    UpstreamOptions,
    as_dict,
    as_list,
    dump_args,
    new_id,
    obj,
    opt_int,
    opt_num,
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
    Role,
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

PROTOCOL = "gemini"
# "Must start with a letter or an underscore... alphanumeric, underscores, dots, colons
# or dashes, with a maximum length of 64" (Gemini's own error text, TRANSLATION §1.5).
TOOL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}")
SKIP_SIGNATURE = "skip_thought_signature_validator"
_DROPPED = ("seed", "presencePenalty", "frequencyPenalty", "responseModalities", "speechConfig", "mediaResolution")

# ============================================================================ client side: request


def decode_request(body: dict[str, Any]) -> Request:
    req = Request(model="", messages=[])
    system = obj(body.get("systemInstruction") or body.get("system_instruction"))
    req.system = [Text(p["text"]) for p in system.get("parts") or [] if isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"]]
    pending: list[tuple[str, str]] = []          # (name, id) of the last model turn's calls
    for i, raw in enumerate(as_list(body.get("contents"), "contents")):
        content = as_dict(raw, f"contents[{i}]")
        role: Role = "assistant" if content.get("role") == "model" else "user"
        parts, pending = _decode_parts(as_list(content.get("parts"), f"contents[{i}].parts"), i, role, pending)
        if req.messages and req.messages[-1].role == role:
            req.messages[-1].parts.extend(parts)
        else:
            req.messages.append(Message(role, parts))
    for i, raw in enumerate(as_list(body.get("tools"), "tools")):
        tool = as_dict(raw, f"tools[{i}]")
        for key in tool:
            if key not in ("functionDeclarations", "function_declarations"):
                raise Untranslatable(f"tools[{i}].{key[:40]}", "non-Gemini", "built-in Gemini tools run at Google only")
        for decl in tool.get("functionDeclarations") or tool.get("function_declarations") or []:
            d = as_dict(decl, "functionDeclarations[]")
            params = d.get("parametersJsonSchema") or d.get("parameters") or {}
            req.tools.append(Tool(str(d.get("name") or ""), d.get("description") if isinstance(d.get("description"), str) else None,
                                  _schema_from_gemini(params)))
    calling = obj(obj(body.get("toolConfig") or body.get("tool_config")).get("functionCallingConfig"))
    mode = str(calling.get("mode") or "").upper()
    allowed = [n for n in calling.get("allowedFunctionNames") or [] if isinstance(n, str)]
    if mode == "NONE":
        req.tool_choice = ToolChoice("none")
    elif mode in ("ANY", "VALIDATED"):
        req.tool_choice = ToolChoice("tool", allowed[0]) if len(allowed) == 1 else ToolChoice("any")
    elif mode == "AUTO":
        req.tool_choice = ToolChoice("auto")
    _decode_generation(req, obj(body.get("generationConfig") or body.get("generation_config")))
    if body.get("safetySettings"):
        req.dropped.append("safetySettings")
    return req


def _decode_generation(req: Request, config: dict[str, Any]) -> None:
    req.max_tokens = opt_int(config.get("maxOutputTokens"), "maxOutputTokens")
    req.temperature = opt_num(config.get("temperature"), "temperature")
    req.top_p = opt_num(config.get("topP"), "topP")
    req.top_k = opt_int(config.get("topK"), "topK")
    req.stop = [s for s in config.get("stopSequences") or [] if isinstance(s, str)]
    req.n = opt_int(config.get("candidateCount"), "candidateCount") or 1
    req.logprobs = config.get("responseLogprobs") is True
    if config.get("responseMimeType") == "application/json":
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        req.output = OutputFormat("json_schema", "output", _schema_from_gemini(schema)) if isinstance(schema, dict) \
            else OutputFormat("json_object")
    thinking = obj(config.get("thinkingConfig"))
    budget = opt_int(thinking.get("thinkingBudget"), "thinkingBudget")
    level = thinking.get("thinkingLevel")
    if thinking and budget != 0:
        effort = level.lower() if isinstance(level, str) else None
        req.reasoning = Reasoning(effort=effort, budget=budget if budget is not None and budget > 0 else None)
    req.dropped.extend(name for name in _DROPPED if config.get(name) is not None)


def _thought(append: Callable[[Thinking], None], open_block: Thinking | None, text: str, sig: Sig | None) -> Thinking | None:
    """A thought part: consecutive ones are one thinking block, a signature closes it.
    Returns the block still open (None once closed)."""
    if open_block is None:
        open_block = Thinking("")
        append(open_block)
    open_block.text += text
    if sig is not None:
        open_block.sig = sig
        return None
    return open_block


def _decode_parts(
    parts: list[Any], turn: int, role: str, pending: list[tuple[str, str]]
) -> tuple[list[Part], list[tuple[str, str]]]:
    out: list[Part] = []
    calls: list[tuple[str, str]] = []
    thinking: Thinking | None = None
    for k, raw in enumerate(parts):
        part = as_dict(raw, f"contents[{turn}].parts[{k}]")
        signature = part.get("thoughtSignature") or part.get("thought_signature")
        sig = carrier.unwrap_base64(signature, PROTOCOL) if isinstance(signature, str) and signature else None
        if part.get("thought") is True:
            thinking = _thought(out.append, thinking, str(part.get("text") or ""), sig)
            continue
        thinking = None
        inline = obj(part.get("inlineData") or part.get("inline_data"))
        file = obj(part.get("fileData") or part.get("file_data"))
        fc = obj(part.get("functionCall") or part.get("function_call"))
        fr = obj(part.get("functionResponse") or part.get("function_response"))
        if isinstance(part.get("text"), str):
            if part["text"]:
                out.append(Text(part["text"]))
        elif inline:
            out.append(Image(media_type=str(inline.get("mimeType") or inline.get("mime_type") or ""), data=str(inline.get("data") or "")))
        elif file:
            mime = file.get("mimeType") or file.get("mime_type")
            out.append(Image(media_type=mime if isinstance(mime, str) else None, url=str(file.get("fileUri") or file.get("file_uri") or "")))
        elif fc:
            call_id, payload = carrier.split_id(str(fc.get("id") or f"call_{turn}_{k}"))
            if payload is not None and isinstance(payload.get("s"), list) and len(payload["s"]) == 2:
                sig = Sig(str(payload["s"][0]), str(payload["s"][1]))
            if payload is not None and not any(isinstance(p, Thinking) for p in out):
                # The client dropped the turn's thought parts (Gemini CLI does): the first
                # call brought them back; they go first, where the turn had them.
                out[:0] = carrier.thinking_from_payload(payload.get("t"))
            name = str(fc.get("name") or "")
            calls.append((name, call_id))
            out.append(ToolCall(call_id, name, dump_args(fc.get("args")), sig))
        elif fr:
            name = str(fr.get("name") or "")
            given = fr.get("id")
            call_id = carrier.split_id(given)[0] if isinstance(given, str) and given else _pair(name, pending)
            out.append(_result(call_id, name, fr.get("response")))
        else:
            raise Untranslatable(f"part with {', '.join(sorted(part))[:60]}", "non-Gemini")
    return out, calls if role == "assistant" else []


def _pair(name: str, pending: list[tuple[str, str]]) -> str:
    """A response without id answers the first unanswered call of that name (TRANSLATION §1.8)."""
    for i, (called, call_id) in enumerate(pending):
        if called == name:
            del pending[i]
            return call_id
    return f"call_{name}"


def _result(call_id: str, name: str, response: Any) -> ToolResult:
    if isinstance(response, dict):
        if set(response) == {"error"}:
            value = response["error"]
            return ToolResult(call_id, [Text(value if isinstance(value, str) else dump_args(value))], True, name)
        if set(response) <= {"output", "content", "result"} and len(response) == 1:
            value = next(iter(response.values()))
            if isinstance(value, str):
                return ToolResult(call_id, [Text(value)], False, name)
    return ToolResult(call_id, [Text(dump_args(response))], False, name)


def _schema_from_gemini(schema: Any) -> dict[str, Any]:
    """Gemini's OpenAPI-style schema (types in upper case) as JSON Schema."""
    if not isinstance(schema, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            out[key] = value.lower()
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: _schema_from_gemini(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = _schema_from_gemini(value)
        elif key == "anyOf" and isinstance(value, list):
            out[key] = [_schema_from_gemini(sub) for sub in value]
        elif key != "propertyOrdering":
            out[key] = value
    return out


# ============================================================================ upstream side: request

# Keys of Gemini's `Schema` (TRANSLATION §1.5); everything else is a 400 there.
_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "items", "minItems", "maxItems", "properties",
    "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf",
    "propertyOrdering", "default", "minimum", "maximum",
})
_FORMATS = frozenset({"date-time", "enum", "int32", "int64", "float", "double"})


def gemini_schema(schema: Any, defs: dict[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    """JSON Schema narrowed to Gemini's subset: $refs inlined (cut at depth 8), type
    arrays as nullable, const as enum, oneOf as anyOf, allOf merged, the rest dropped (P19)."""
    if not isinstance(schema, dict) or depth > 8:
        return {"type": "object"} if depth > 8 else {}
    defs = {**(defs or {}), **obj(schema.get("$defs")), **obj(schema.get("definitions"))}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1])
        return gemini_schema(target, defs, depth + 1)
    merged = dict(schema)
    for sub in schema.get("allOf") or []:
        if isinstance(sub, dict):
            merged = {**gemini_schema(sub, defs, depth + 1), **{k: v for k, v in merged.items() if k != "allOf"}}
    out: dict[str, Any] = {}
    kind = merged.get("type")
    if isinstance(kind, list):
        real = [t for t in kind if t != "null"]
        if "null" in kind:
            out["nullable"] = True
        kind = real[0] if real else "string"
    if isinstance(kind, str):
        out["type"] = kind
    if "const" in merged:
        out["enum"] = [str(merged["const"])]
        out.setdefault("type", "string")
    for key, value in merged.items():
        if key in ("type", "const") or (key not in _SCHEMA_KEYS and key != "oneOf"):
            continue
        if key == "properties" and isinstance(value, dict):
            props = {name: gemini_schema(sub, defs, depth + 1) for name, sub in value.items()}
            if props:
                out[key] = props
        elif key == "items":
            out[key] = gemini_schema(value, defs, depth + 1)
        elif key in ("anyOf", "oneOf") and isinstance(value, list):
            out["anyOf"] = [gemini_schema(sub, defs, depth + 1) for sub in value if isinstance(sub, dict)]
        elif key == "enum" and isinstance(value, list):
            out[key] = [str(v) for v in value]
        elif key == "format":
            if value in _FORMATS:
                out[key] = value
        else:
            out[key] = value
    if isinstance(out.get("required"), list):
        names = set(obj(out.get("properties")))
        out["required"] = [r for r in out["required"] if r in names]
        if not out["required"]:
            del out["required"]
    return out


def encode_request(req: Request, up: UpstreamOptions) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": _encode_contents(req.messages)}
    system = [{"text": t.text} for t in req.system if t.text.strip()]
    if system:
        body["systemInstruction"] = {"parts": system}
    if req.tools:
        decls = []
        for t in req.tools:
            decl: dict[str, Any] = {"name": t.name}
            if t.description:
                decl["description"] = t.description
            params = gemini_schema(t.parameters)
            if params.get("properties"):
                decl["parameters"] = params
            decls.append(decl)
        body["tools"] = [{"functionDeclarations": decls}]
    if req.tool_choice is not None:
        tc = req.tool_choice
        config: dict[str, Any] = {"mode": {"auto": "AUTO", "any": "ANY", "none": "NONE", "tool": "ANY"}[tc.mode]}
        if tc.mode == "tool" and tc.name:
            config["allowedFunctionNames"] = [tc.name]
        body["toolConfig"] = {"functionCallingConfig": config}
    gen: dict[str, Any] = {}
    if req.max_tokens is not None:
        gen["maxOutputTokens"] = req.max_tokens
    if req.temperature is not None:
        gen["temperature"] = req.temperature
    if req.top_p is not None:
        gen["topP"] = req.top_p
    if req.top_k is not None:
        gen["topK"] = req.top_k
    if req.stop:
        gen["stopSequences"] = req.stop[:5]
    if req.n != 1:
        gen["candidateCount"] = req.n
    if req.logprobs:
        gen["responseLogprobs"] = True
    if req.output is not None:
        gen["responseMimeType"] = "application/json"
        if req.output.kind == "json_schema":
            gen["responseSchema"] = gemini_schema(req.output.schema or {})
    if req.reasoning is not None and req.reasoning.enabled:
        thinking: dict[str, Any] = {"includeThoughts": True}
        if req.reasoning.budget:
            thinking["thinkingBudget"] = req.reasoning.budget
        body_effort = req.reasoning.effort
        if body_effort in ("low", "high") and not req.reasoning.budget:
            thinking["thinkingLevel"] = body_effort
        gen["thinkingConfig"] = thinking
    if gen:
        body["generationConfig"] = gen
    if req.user:
        req.dropped.append("user")
    return body


def _encode_contents(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    pending: list[str] = []
    for msg in messages:
        if msg.role == "assistant":
            parts = _model_parts(msg.parts, names)
            if pending:
                out.append({"role": "user", "parts": [_cancelled(i, names) for i in pending]})
            pending = [str(p["functionCall"].get("id")) for p in parts if "functionCall" in p]
            role = "model"
        else:
            parts = _user_parts(msg.parts, names, pending)
            pending = []
            role = "user"
        if not parts:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["parts"].extend(parts)
        else:
            out.append({"role": role, "parts": parts})
    if not out:
        out.append({"role": "user", "parts": [{"text": "."}]})
    return out


def _model_parts(parts: list[Part], names: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    first_call = True
    for p in parts:
        if isinstance(p, Thinking):
            if p.sig is not None and p.sig.owner == PROTOCOL and not p.redacted:
                out.append({"text": p.text, "thought": True, "thoughtSignature": p.sig.value})
        elif isinstance(p, Text):
            own = p.sig is not None and p.sig.owner == PROTOCOL
            if p.text or own:
                out.append({"text": p.text, "thoughtSignature": p.sig.value} if own and p.sig else {"text": p.text})
        elif isinstance(p, ToolCall):
            names[p.id] = p.name
            part: dict[str, Any] = {"functionCall": {"id": p.id, "name": p.name, "args": parse_args(p.arguments)}}
            if p.sig is not None and p.sig.owner == PROTOCOL:
                part["thoughtSignature"] = p.sig.value
            elif first_call:
                # Gemini 3 refuses a function call turn without a signature; this is
                # Google's documented value for histories it did not produce (P7).
                part["thoughtSignature"] = SKIP_SIGNATURE
            first_call = False
            out.append(part)
    return out


def _cancelled(call_id: str, names: dict[str, str]) -> dict[str, Any]:
    return {"functionResponse": {"id": call_id, "name": names.get(call_id, "unknown"),
                                 "response": {"error": "tool call was cancelled"}}}


def _user_parts(parts: list[Part], names: dict[str, str], answering: list[str]) -> list[dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    rest: list[dict[str, Any]] = []
    for p in parts:
        if isinstance(p, ToolResult):
            text = "".join(c.text for c in p.content if isinstance(c, Text))
            response = {"error": text} if p.is_error else {"output": text}
            name = p.name or names.get(p.call_id, "unknown")
            results[p.call_id] = {"functionResponse": {"id": p.call_id, "name": name, "response": response}}
            rest.extend(_image(c) for c in p.content if isinstance(c, Image))
        elif isinstance(p, Text):
            if p.text:
                rest.append({"text": p.text})
        elif isinstance(p, Image):
            rest.append(_image(p))
    ordered = [results.pop(i) if i in results else _cancelled(i, names) for i in answering]
    for stray in results.values():   # answers to no call of the previous turn: their text only
        rest.append({"text": f"[result of {stray['functionResponse']['name']}]: {dump_args(stray['functionResponse']['response'])}"})
    return ordered + rest


def _image(p: Image) -> dict[str, Any]:
    if p.data is None:
        raise Untranslatable("image URL", PROTOCOL, "Gemini takes inline images and the gateway does not fetch URLs")
    return {"inlineData": {"mimeType": p.media_type or "image/png", "data": p.data}}


# ============================================================================ token counting


def decode_count_request(body: dict[str, Any]) -> Request:
    """A countTokens body as the hub's request: `{contents}` alone, or a whole
    `{generateContentRequest}` (system instruction and tools count too)."""
    inner = body.get("generateContentRequest")
    if inner is not None:
        if body.get("contents") is not None:
            raise BadInput("Give either 'contents' or 'generateContentRequest', not both.", "contents")
        body = as_dict(inner, "generateContentRequest")
    req = decode_request(body)
    if not req.messages:
        raise BadInput("* CountTokensRequest.contents: contents is not specified", "contents")
    return req


def encode_count_request(req: Request, up: UpstreamOptions) -> dict[str, Any]:
    # The wrapped form: the plain one would leave the system prompt and tools uncounted.
    return {"generateContentRequest": {"model": f"models/{up.model}", **encode_request(req, up)}}


def readdress_count_request(body: dict[str, Any], model: str) -> dict[str, Any] | None:
    """A Gemini client's own countTokens body for the upstream's model name: the wrapped
    form names its model inside (`generateContentRequest.model`, required there), which
    must be the upstream's, not the name the client called. None for `{contents}`,
    which names none (the URL does)."""
    inner = body.get("generateContentRequest")
    if not isinstance(inner, dict):
        return None
    return {**body, "generateContentRequest": {**inner, "model": f"models/{model}"}}


def decode_count_response(doc: dict[str, Any]) -> int | None:
    # proto3 JSON leaves zero out: an answer without totalTokens counted nothing.
    return _count(doc.get("totalTokens"))


def encode_count_response(tokens: int) -> dict[str, Any]:
    return {"totalTokens": tokens}


# ============================================================================ upstream side: response

_FINISH_IN: dict[str, Finish] = {
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter",
}


def decode_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    thoughts = _count(u.get("thoughtsTokenCount"))
    return Usage(input=_count(u.get("promptTokenCount")) + _count(u.get("toolUsePromptTokenCount")),
                 output=_count(u.get("candidatesTokenCount")) + thoughts,
                 cached=_count(u.get("cachedContentTokenCount")), reasoning=thoughts)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _finish(reason: Any) -> tuple[Finish, str | None]:
    """The hub's finish, and a note for reasons that mean the model failed (no silent
    empty success: P30)."""
    if not isinstance(reason, str):
        return "stop", None
    if reason in _FINISH_IN:
        return _FINISH_IN[reason], None
    if reason in ("OTHER", "FINISH_REASON_UNSPECIFIED"):
        return "stop", None
    return "stop", f"[upstream finish reason: {reason}]"


def _upstream_parts(parts: list[Any]) -> list[Text | Thinking | ToolCall]:
    out: list[Text | Thinking | ToolCall] = []
    thinking: Thinking | None = None
    for part in parts:
        if not isinstance(part, dict):
            continue
        signature = part.get("thoughtSignature")
        sig = Sig(PROTOCOL, signature) if isinstance(signature, str) and signature else None
        if part.get("thought") is True:
            thinking = _thought(out.append, thinking, str(part.get("text") or ""), sig)
            continue
        open_thinking, thinking = thinking, None
        fc = part.get("functionCall")
        if isinstance(fc, dict):
            out.append(ToolCall(str(fc.get("id") or new_id("call_")), str(fc.get("name") or ""), dump_args(fc.get("args")), sig))
        elif isinstance(part.get("text"), str) and part["text"]:
            out.append(Text(part["text"], sig=sig))
        elif sig is not None:
            # An empty part carrying the signature of what came before it (as in streams).
            last = out[-1] if out else None
            if isinstance(last, Text) and last.sig is None:
                last.sig = sig
            elif last is not None and last is open_thinking:
                open_thinking.sig = sig
            else:
                out.append(Text("", sig=sig))
    return out


def decode_response(doc: dict[str, Any]) -> Response:
    candidates = doc.get("candidates")
    usage = decode_usage(doc.get("usageMetadata")) or Usage()
    rid = str(doc.get("responseId") or new_id("gen_"))
    if not isinstance(candidates, list) or not candidates:
        blocked = obj(doc.get("promptFeedback")).get("blockReason")
        return Response(rid, str(doc.get("modelVersion") or ""), [], "content_filter", usage=usage,
                        refusal=f"The prompt was blocked ({blocked})." if blocked else "No answer.")
    cand = obj(candidates[0])
    parts = _upstream_parts(obj(cand.get("content")).get("parts") or [])
    finish, note = _finish(cand.get("finishReason"))
    if note:
        parts.append(Text(note))
    if finish == "stop" and any(isinstance(p, ToolCall) for p in parts):
        finish = "tool_calls"
    return Response(rid, str(doc.get("modelVersion") or ""), parts, finish, usage=usage)


# ============================================================================ client side: response

_FINISH_OUT = {
    "stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP", "content_filter": "SAFETY", "stop_sequence": "STOP",
    "refusal": "SAFETY", "error": "OTHER",
}


def encode_usage(u: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {"promptTokenCount": u.input, "candidatesTokenCount": max(0, u.output - u.reasoning),
                           "totalTokenCount": u.input + u.output}
    if u.reasoning:
        out["thoughtsTokenCount"] = u.reasoning
    if u.cached:
        out["cachedContentTokenCount"] = u.cached
    return out


def _call_part(call: ToolCall, thinking: list[Thinking]) -> dict[str, Any]:
    """A function call part. The turn's signed thinking also rides on the first call's id:
    Gemini CLI drops thought parts from the history it sends back, but keeps function
    calls as they came (carrier.py)."""
    carried = [t for t in thinking if t.sig is not None]
    call_id = carrier.id_with(call.id, {"t": carrier.thinking_payload(carried)}) if carried else call.id
    part: dict[str, Any] = {"functionCall": {"id": call_id, "name": call.name, "args": parse_args(call.arguments)}}
    if call.sig is not None:
        part["thoughtSignature"] = carrier.wrap_base64(call.sig)
    return part


def encode_response(resp: Response, ctx: ClientContext) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    thinking = [p for p in resp.parts if isinstance(p, Thinking)]
    for p in resp.parts:
        if isinstance(p, Thinking):
            part: dict[str, Any] = {"text": p.text, "thought": True}
            if p.sig is not None:
                part["thoughtSignature"] = carrier.wrap_base64(p.sig)
            parts.append(part)
        elif isinstance(p, Text):
            parts.append({"text": p.text})
        else:
            parts.append(_call_part(p, thinking))
            thinking = []
    if resp.refusal and not parts:
        parts.append({"text": resp.refusal})
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": _FINISH_OUT[resp.finish], "index": 0}
    return {"candidates": [candidate], "usageMetadata": encode_usage(resp.usage), "modelVersion": ctx.model,
            "responseId": resp.id}


# ============================================================================ upstream side: stream

_ERROR_STATUS = {"RESOURCE_EXHAUSTED": 429, "INVALID_ARGUMENT": 400, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
                 "NOT_FOUND": 404, "INTERNAL": 500}


class StreamDecoder:
    """Gemini chunks (whole GenerateContentResponses carrying new parts) → hub events.
    A function call arrives whole: start, its arguments in one delta, stop. The stream
    has no end marker: the chunk with finishReason ends it (its usage is the last)."""

    def __init__(self) -> None:
        self._started = False
        self._next = 0
        self._open: tuple[int, str] | None = None    # (hub index, "text" | "thinking")
        self._usage: Usage | None = None
        self._ended = False

    def feed(self, name: bytes | None, data: bytes) -> list[Event]:
        if self._ended:
            return []
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(chunk, dict):
            return []
        if isinstance(chunk.get("error"), dict):
            self._ended = True
            err = chunk["error"]
            status = err.get("code") if isinstance(err.get("code"), int) else _ERROR_STATUS.get(str(err.get("status")), 500)
            return [Failure(status, str(err.get("message") or "upstream error"))]
        out: list[Event] = []
        if not self._started:
            self._started = True
            out.append(Start(str(chunk.get("responseId") or new_id("gen_")), str(chunk.get("modelVersion") or ""),
                             decode_usage(chunk.get("usageMetadata"))))
        self._usage = decode_usage(chunk.get("usageMetadata")) or self._usage
        candidates = chunk.get("candidates")
        if not isinstance(candidates, list) or not candidates:
            blocked = obj(chunk.get("promptFeedback")).get("blockReason")
            if blocked:
                self._ended = True
                out.extend(self._close())
                out.append(End("content_filter", self._usage, refusal=f"The prompt was blocked ({blocked})."))
            return out
        cand = obj(candidates[0])
        for part in obj(cand.get("content")).get("parts") or []:
            if isinstance(part, dict):
                self._part(part, out)
        reason = cand.get("finishReason")
        if isinstance(reason, str) and reason:
            self._ended = True
            finish, note = _finish(reason)
            if note:
                self._text(note, out)
            out.extend(self._close())
            out.append(End(finish, self._usage))
        return out

    def _part(self, part: dict[str, Any], out: list[Event]) -> None:
        signature = part.get("thoughtSignature")
        sig = Sig(PROTOCOL, signature) if isinstance(signature, str) and signature else None
        fc = part.get("functionCall")
        if isinstance(fc, dict):
            out.extend(self._close())
            index = self._new()
            call_id = str(fc.get("id") or new_id("call_"))   # never a per-response counter (P15)
            out += [BlockStart(index, ToolCall(call_id, str(fc.get("name") or ""), "", sig)),
                    Delta(index, dump_args(fc.get("args"))), BlockStop(index)]
            return
        text = part.get("text")
        if part.get("thought") is True:
            if self._open is None or self._open[1] != "thinking":
                out.extend(self._close())
                self._open = (self._new(), "thinking")
                out.append(BlockStart(self._open[0], Thinking("")))
            if isinstance(text, str) and text:
                out.append(Delta(self._open[0], text))
            if sig is not None:
                out.append(Signature(self._open[0], sig))
                out.extend(self._close())
            return
        if isinstance(text, str) and text:
            self._text(text, out)
        if sig is None:
            return
        # A text part's own signature, or a trailing empty part carrying the open block's.
        if self._open is None:
            self._open = (self._new(), "text")
            out.append(BlockStart(self._open[0], Text("")))
        out.append(Signature(self._open[0], sig))

    def _text(self, text: str, out: list[Event]) -> None:
        if self._open is None or self._open[1] != "text":
            out.extend(self._close())
            self._open = (self._new(), "text")
            out.append(BlockStart(self._open[0], Text("")))
        out.append(Delta(self._open[0], text))

    def _new(self) -> int:
        index = self._next
        self._next += 1
        return index

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index, self._open = self._open[0], None
        return [BlockStop(index)]

    def close(self) -> list[Event]:
        if self._ended:
            return []
        self._ended = True
        return [Failure(502, "The upstream ended the stream without a finish reason.")]


# ============================================================================ client side: stream

_STATUS_NAMES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED", 529: "UNAVAILABLE"}


class StreamEncoder:
    """Hub events → Gemini chunks, as SSE (`alt=sse`) or as one streamed JSON array. Text
    and thought deltas go out as they come; a function call is emitted whole when its
    arguments are (Gemini has no argument deltas: the one forced buffer); every chunk
    carries usageMetadata; finishReason only on the last (P31)."""

    def __init__(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        self._id = new_id("gen_")
        self._kinds: dict[int, str] = {}
        self._calls: dict[int, ToolCall] = {}
        self._thinking: dict[int, Thinking] = {}
        self._done_thinking: list[Thinking] = []   # the turn's, until its first call carries them
        self._prompt = ctx.prompt_estimate
        self._first = True

    def _frame(self, doc: dict[str, Any]) -> bytes:
        data = orjson.dumps(doc)
        if self._ctx.sse:
            return b"data: " + data + b"\r\n\r\n"
        head = b"[" if self._first else b",\r\n"
        self._first = False
        return head + data

    def _chunk(self, parts: list[dict[str, Any]], finish: str | None = None, usage: Usage | None = None) -> bytes:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
        if finish is not None:
            candidate["finishReason"] = finish
        u = usage if usage is not None else Usage(input=self._prompt)
        return self._frame({"candidates": [candidate], "usageMetadata": encode_usage(u), "modelVersion": self._ctx.model,
                            "responseId": self._id})

    def encode(self, ev: Event) -> bytes:
        if isinstance(ev, Start):
            if ev.usage is not None and ev.usage.input:
                self._prompt = ev.usage.input
            return b""
        if isinstance(ev, BlockStart):
            part = ev.part
            if isinstance(part, ToolCall):
                self._kinds[ev.index] = "tool"
                self._calls[ev.index] = ToolCall(part.id, part.name, "", part.sig)
            elif isinstance(part, Thinking):
                self._kinds[ev.index] = "thinking"
                self._thinking[ev.index] = Thinking("", part.sig, part.redacted)
            else:
                self._kinds[ev.index] = "text"
            return b""
        if isinstance(ev, Delta):
            kind = self._kinds.get(ev.index)
            if kind == "tool":
                self._calls[ev.index].arguments += ev.text
                return b""
            if not ev.text or kind is None:
                return b""
            if kind == "thinking":
                self._thinking[ev.index].text += ev.text
                return self._chunk([{"text": ev.text, "thought": True}])
            return self._chunk([{"text": ev.text}])
        if isinstance(ev, Signature):
            block = self._thinking.get(ev.index)
            if block is None:
                return b""
            block.sig = ev.sig
            return self._chunk([{"text": "", "thought": True, "thoughtSignature": carrier.wrap_base64(ev.sig)}])
        if isinstance(ev, BlockStop):
            block = self._thinking.pop(ev.index, None)
            if block is not None:
                self._done_thinking.append(block)
            call = self._calls.pop(ev.index, None)
            if call is None:
                return b""
            carried, self._done_thinking = self._done_thinking, []
            return self._chunk([_call_part(call, carried)])
        if isinstance(ev, End):
            parts = [{"text": ev.refusal}] if ev.refusal else []
            usage = ev.usage or Usage()
            if not usage.input:   # the upstream never said: the estimate, never a zero (P11)
                usage = Usage(self._prompt, usage.output, usage.cached, usage.cache_write, usage.reasoning)
            out = self._chunk(parts, _FINISH_OUT[ev.finish], usage)
            return out if self._ctx.sse else out + b"]"
        return self.failure(ev.status, ev.message)

    def failure(self, status: int, message: str) -> bytes:
        # `error` first: google-genai checks startswith('{"error":') (CLIENTS.md item 42).
        err = {"error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}}
        out = self._frame(err)
        return out if self._ctx.sse else out + b"]"
