"""What the mock provider refuses: the request rules each real API enforces.

The gateway's translators write requests for protocols the client does not speak; a
translation mistake must fail a test here instead of at a real provider. Each check
returns the provider's own kind of message (or None for a valid request). Only rules
that real APIs enforce with a 400 are checked, so a request the mock accepts would be
accepted there too, as far as the shapes go.

Standalone like the mock: it uses none of the gateway's code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any

_ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
# Function names each API accepts (TRANSLATION §1.5). Anthropic's tool definitions take
# 128 characters; a shorter limit is cited for tool_use names, unconfirmed: 128 is checked.
_OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ANTHROPIC_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_GEMINI_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}$")
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# Keys the Gemini `Schema` type accepts in functionDeclarations[].parameters (TRANSLATION §1.5).
GEMINI_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "items", "minItems", "maxItems", "properties",
    "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf",
    "propertyOrdering", "default", "minimum", "maximum",
})


def thinking_signature(text: str) -> str:
    """The signature the mock gives (and expects back on) a thinking block: it depends
    on the text, so a changed or dropped text fails like a real provider's check."""
    return "mocksig_" + hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------- OpenAI chat


def _openai_name(name: Any, where: str) -> str | None:
    if not isinstance(name, str) or not _OPENAI_NAME.match(name):
        return (f"Invalid '{where}': string does not match pattern. Expected a string that matches the pattern "
                "'^[a-zA-Z0-9_-]{1,64}$'.")
    return None


def _chat_tools(body: dict[str, Any]) -> str | None:
    names = []
    for k, tool in enumerate(body.get("tools") or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        problem = _openai_name(name, f"tools[{k}].function.name")
        if problem:
            return problem
        names.append(name)
    choice = body.get("tool_choice")
    forced = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(forced, dict) and forced.get("name") not in names:
        return f"Invalid value for 'tool_choice': tool '{forced.get('name')}' not found in 'tools' parameter."
    return None


def check_chat(body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array."
    problem = _chat_tools(body)
    if problem:
        return problem
    open_calls: set[str] = set()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"messages[{i}] must be an object."
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            return f"Invalid value for 'messages[{i}].role': '{role}'."
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if call_id not in open_calls:
                return (f"Invalid parameter: messages with role 'tool' must be a response to a preceeding message "
                        f"with 'tool_calls' (messages[{i}].tool_call_id={call_id!r}).")
            open_calls.discard(call_id)
            continue
        if open_calls:
            return ("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                    f"'tool_call_id'. The following tool_call_ids did not have response messages: {sorted(open_calls)}")
        if role == "assistant":
            calls = msg.get("tool_calls") or []
            ids = [c.get("id") for c in calls if isinstance(c, dict)]
            if len(set(ids)) != len(ids) or not all(isinstance(x, str) and x for x in ids):
                return f"messages[{i}].tool_calls: ids must be distinct non-empty strings."
            for k, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
                    return f"messages[{i}].tool_calls[].function.arguments must be a string."
                problem = _openai_name(fn.get("name"), f"messages[{i}].tool_calls[{k}].function.name")
                if problem:
                    return problem
            if calls and body.get("reasoning_effort") is not None and not msg.get("reasoning_content"):
                # DeepSeek's thinking mode (TRANSLATION P28).
                return (f"Missing reasoning_content field in the assistant message at message index {i}. "
                        "The reasoning_content in the thinking mode must be passed back to the API.")
            open_calls = {str(x) for x in ids}
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                    if not isinstance(url, str) or not url.startswith(("data:image/", "https://", "http://")):
                        return f"messages[{i}]: invalid image_url."
    return None


# ---------------------------------------------------------------------------- Anthropic


def check_anthropic(body: dict[str, Any]) -> str | None:
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Field required"
    if body.get("temperature") is not None and body.get("top_p") is not None:
        return "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
    thinking = body.get("thinking")
    thinking_on = isinstance(thinking, dict) and thinking.get("type") == "enabled"
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if thinking_on and not (isinstance(budget, int) and 1024 <= budget < max_tokens):
        return "thinking.budget_tokens: must be ≥ 1024 and less than max_tokens"
    system = body.get("system")
    if isinstance(system, list):
        for block in system:
            if not isinstance(block, dict) or block.get("type") != "text" or not str(block.get("text", "")).strip():
                return "system: text content blocks must be non-empty"
    names = []
    for k, tool in enumerate(body.get("tools") or []):
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not _ANTHROPIC_NAME.match(name):
            return f"tools.{k}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
        names.append(name)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool" and choice.get("name") not in names:
        return f"tool_choice.name: Tool '{choice.get('name')}' not found in tools"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    marked = _cache_markers(body)
    if marked > 4:
        return f"A maximum of 4 blocks with cache_control may be provided. Found {marked}."
    pending: list[str] = []
    for i, msg in enumerate(messages):
        problem = _anthropic_message(msg, i, messages, pending, thinking_on)
        if problem:
            return problem
    return None


# What count_tokens takes; anything else is refused as an extra input.
_ANTHROPIC_COUNT_FIELDS = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers", "context_management",
    "output_config", "output_format",
})


def check_anthropic_count(body: dict[str, Any]) -> str | None:
    extra = sorted(set(body) - _ANTHROPIC_COUNT_FIELDS)
    if extra:
        return f"{extra[0]}: Extra inputs are not permitted"
    # The Messages rules hold for the rest; count_tokens has no max_tokens, so the
    # largest stands in for it (only the thinking budget's floor is checked).
    return check_anthropic({**body, "max_tokens": 2**31})


def _cache_markers(body: dict[str, Any]) -> int:
    blocks: list[Any] = [*(body.get("tools") or []), *(body.get("system") or [] if isinstance(body.get("system"), list) else [])]
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        for block in content if isinstance(content, list) else []:
            blocks.append(block)
            inner = block.get("content") if isinstance(block, dict) else None
            blocks.extend(inner if isinstance(inner, list) else [])
    return sum(1 for b in blocks if isinstance(b, dict) and "cache_control" in b)


def _anthropic_message(msg: Any, i: int, messages: list[Any], pending: list[str], thinking_on: bool) -> str | None:
    if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
        return f"messages.{i}.role: Input should be 'user' or 'assistant'"
    role = msg["role"]
    if i == 0 and role != "user":
        return "messages: first message must use the \"user\" role"
    if i and messages[i - 1].get("role") == role:
        return f"messages.{i}: roles must alternate between \"user\" and \"assistant\""
    content = msg.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(blocks, list) or not blocks:
        return f"messages.{i}: content must be a non-empty string or list"
    for j, block in enumerate(blocks):
        problem = _anthropic_block(block, f"messages.{i}.content.{j}")
        if problem:
            return problem
    if role == "user":
        results = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
        if pending:
            head = [b.get("tool_use_id") for b in blocks[: len(pending)] if b.get("type") == "tool_result"]
            if sorted(head) != sorted(pending):
                return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                        f"{', '.join(sorted(set(pending) - set(head)))}. Each `tool_use` block must have a "
                        "corresponding `tool_result` block in the next message.")
        elif results:
            return f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: {results[0]}"
        pending.clear()
        return None
    if pending:
        return f"messages.{i}: tool_use without tool_result"
    uses = [b["id"] for b in blocks if b.get("type") == "tool_use"]
    # The API's rule: the final assistant message, when it uses tools, starts with thinking
    # (earlier turns' thinking is stripped by the API, so it may be missing there).
    final = not any(m.get("role") == "assistant" for m in messages[i + 1:])
    if thinking_on and uses and final and blocks[0].get("type") not in ("thinking", "redacted_thinking"):
        return (f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                f"`{blocks[0].get('type')}`. When `thinking` is enabled, a final `assistant` message must start "
                "with a thinking block.")
    pending.extend(uses)
    return None


def _anthropic_block(block: Any, where: str) -> str | None:
    if not isinstance(block, dict):
        return f"{where}: must be an object"
    kind = block.get("type")
    if kind == "text":
        if not isinstance(block.get("text"), str) or not block["text"].strip():
            return f"{where}: text content blocks must be non-empty"
    elif kind == "image":
        return _anthropic_image(block, where)
    elif kind == "tool_use":
        if not isinstance(block.get("id"), str) or not _ANTHROPIC_ID.match(block["id"]):
            return f"{where}.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
        if not isinstance(block.get("input"), dict):
            return f"{where}.input: Input should be a valid dictionary"
        if not isinstance(block.get("name"), str) or not _ANTHROPIC_NAME.match(block["name"]):
            return f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str) or not _ANTHROPIC_ID.match(block["tool_use_id"]):
            return f"{where}.tool_use_id: String should match pattern '^[a-zA-Z0-9_-]+$'"
        inner = block.get("content")
        if isinstance(inner, list):
            for k, item in enumerate(inner):
                problem = _anthropic_block(item, f"{where}.content.{k}")
                if problem:
                    return problem
    elif kind == "thinking":
        if block.get("signature") != thinking_signature(str(block.get("thinking", ""))):
            return f"{where}: Invalid `signature` in `thinking` block"
    elif kind != "redacted_thinking":
        return f"{where}.type: unknown content block type {kind!r}"
    return None


def _anthropic_image(block: dict[str, Any], where: str) -> str | None:
    source = block.get("source")
    if not isinstance(source, dict):
        return f"{where}.source: Field required"
    if source.get("type") == "url":
        return None if isinstance(source.get("url"), str) else f"{where}.source.url: Field required"
    if source.get("type") != "base64" or source.get("media_type") not in _IMAGE_TYPES:
        return f"{where}.source.media_type: Input should be one of {', '.join(_IMAGE_TYPES)}"
    try:
        base64.b64decode(str(source.get("data")), validate=True)
    except (binascii.Error, ValueError):
        return f"{where}.source.data: invalid base64 data"
    return None


# ---------------------------------------------------------------------------- Gemini


def check_gemini(body: dict[str, Any]) -> str | None:
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    calls = 0
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or content.get("role") not in ("user", "model", None):
            return f"Please use a valid role: user, model. (contents[{i}])"
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
        responses = sum(1 for p in parts if isinstance(p, dict) and "functionResponse" in p)
        if calls and responses != calls:
            return ("Please ensure that the number of function response parts is equal to the number of function "
                    "call parts of the function call turn.")
        if responses and not calls:
            return f"contents[{i}]: functionResponse without a preceding functionCall turn."
        calls = sum(1 for p in parts if isinstance(p, dict) and "functionCall" in p) if content.get("role") == "model" else 0
        if content.get("role") == "model":
            problem = _text_signature_problem(parts, i)
            if problem:
                return problem
        if calls:
            problem = _signature_problem(parts, i, isinstance((body.get("generationConfig") or {}).get("thinkingConfig"), dict))
            if problem:
                return problem
        for p in parts:
            if isinstance(p, dict) and "functionResponse" in p:
                fr = p["functionResponse"]
                if not isinstance(fr, dict) or not fr.get("name") or not isinstance(fr.get("response"), dict):
                    return f"contents[{i}]: functionResponse needs a name and a response object."
    for t, tool in enumerate(body.get("tools") or []):
        for d, decl in enumerate((tool.get("functionDeclarations") or []) if isinstance(tool, dict) else []):
            name = decl.get("name") if isinstance(decl, dict) else None
            if not isinstance(name, str) or not _GEMINI_NAME.match(name):
                return (f"* GenerateContentRequest.tools[{t}].function_declarations[{d}].name: Invalid function name. "
                        "Must start with a letter or an underscore. Must be alphameric (a-z, A-Z, 0-9), underscores "
                        "(_), dots (.), colons (:), or dashes (-), with a maximum length of 64.")
            params = decl.get("parameters") if isinstance(decl, dict) else None
            if params is not None:
                bad = _schema_problem(params, f"functionDeclarations[{decl.get('name')}].parameters")
                if bad:
                    return bad
    return None


def check_gemini_count(body: dict[str, Any], model: str) -> str | None:
    """countTokens takes `{contents}` or `{generateContentRequest}` (which names its model),
    and, as every Google API, refuses fields it does not know."""
    inner = body.get("generateContentRequest")
    unknown = sorted(set(body) - {"contents", "generateContentRequest"})
    if unknown:
        return f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.'
    if inner is None:
        return check_gemini(body)
    if "contents" in body:
        return "* CountTokensRequest: give either contents or generate_content_request, not both."
    if not isinstance(inner, dict):
        return "* CountTokensRequest.generate_content_request: must be an object."
    if inner.get("model") != f"models/{model}":
        return f"* CountTokensRequest.generate_content_request.model: must be 'models/{model}'."
    return check_gemini(inner)


def _signature_problem(parts: list[Any], i: int, thinking: bool) -> str | None:
    """Gemini 3: the first function call of a model turn carries the signature Gemini
    gave it (or the documented skip value for foreign histories); a wrong one fails."""
    first = next(p for p in parts if isinstance(p, dict) and "functionCall" in p)
    sig = first.get("thoughtSignature")
    name = str(first["functionCall"].get("name") if isinstance(first["functionCall"], dict) else "")
    if sig is None:
        return f"Function call is missing a thought_signature in functionCall parts. contents[{i}]" if thinking else None
    if sig not in ("skip_thought_signature_validator", thinking_signature(name)):
        return f"Corrupted thought signature. contents[{i}]"
    return None


def _text_signature_problem(parts: list[Any], i: int) -> str | None:
    """A signature sent back on a text part must be the one the mock gave the turn's text
    (on its last part, or streamed on a trailing empty part: either way the turn's text)."""
    texts = [p for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str) and p.get("thought") is not True]
    signed = [p["thoughtSignature"] for p in texts if p.get("thoughtSignature")]
    whole = "".join(p["text"] for p in texts)
    if any(sig not in ("skip_thought_signature_validator", thinking_signature(whole)) for sig in signed):
        return f"Corrupted thought signature. contents[{i}]"
    return None


def _schema_problem(schema: Any, where: str) -> str | None:
    if not isinstance(schema, dict):
        return f'Invalid JSON payload received. {where} must be an object.'
    for key, value in schema.items():
        if key not in GEMINI_SCHEMA_KEYS:
            return f'Invalid JSON payload received. Unknown name "{key}" at \'{where}\': Cannot find field.'
        if key == "type" and not isinstance(value, str):
            return f"Invalid JSON payload received. {where}.type: Proto field is not repeating, cannot start list."
        if key == "properties" and isinstance(value, dict):
            for name, sub in value.items():
                bad = _schema_problem(sub, f"{where}.properties[{name}]")
                if bad:
                    return bad
        if key == "items":
            bad = _schema_problem(value, f"{where}.items")
            if bad:
                return bad
        if key == "anyOf" and isinstance(value, list):
            for k, sub in enumerate(value):
                bad = _schema_problem(sub, f"{where}.anyOf[{k}]")
                if bad:
                    return bad
    return None


# Gemini's embedding task types (EmbedContentRequest.taskType).
GEMINI_TASK_TYPES = frozenset({
    "TASK_TYPE_UNSPECIFIED", "RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY", "CLASSIFICATION",
    "CLUSTERING", "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY",
})
GEMINI_EMBED_BATCH_MAX = 100   # requests per batchEmbedContents call


def check_gemini_embed(request: Any, where: str, model: str | None) -> str | None:
    """One EmbedContentRequest (`model`: the URL's, which a batch's requests must name)."""
    if not isinstance(request, dict):
        return f"* {where}: must be an object."
    if model is not None and request.get("model") != f"models/{model}":
        return f"* {where}.model: the model must be the one in the URL (models/{model}), got {request.get('model')!r}."
    content = request.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts:
        return f"* {where}.content: content is not specified"
    for k, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            return f"* {where}.content.parts[{k}]: only text is supported for embedding."
    task = request.get("taskType")
    if task is not None and task not in GEMINI_TASK_TYPES:
        return f'Invalid value at \'{where}.task_type\' (type.googleapis.com/google.ai.generativelanguage.v1beta.TaskType), "{task}"'
    dims = request.get("outputDimensionality")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= 3072):
        return f"* {where}.output_dimensionality: must be within 1..3072."
    return None


def check_gemini_batch_embed(body: dict[str, Any], model: str) -> str | None:
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        return "* BatchEmbedContentsRequest.requests: requests is not specified"
    if len(requests) > GEMINI_EMBED_BATCH_MAX:
        return f"* BatchEmbedContentsRequest.requests: at most {GEMINI_EMBED_BATCH_MAX} requests can be in one batch."
    for i, request in enumerate(requests):
        problem = check_gemini_embed(request, f"BatchEmbedContentsRequest.requests[{i}]", model)
        if problem:
            return problem
    return None
