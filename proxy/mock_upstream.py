"""A fake LLM provider: a real aiohttp server speaking the OpenAI, Anthropic and Gemini APIs.

Used by the offline demo (the gateway starts it in-process on a loopback port), by tests
as a realistic upstream and by the benchmark as a fast one. The wire shapes, field order
and SSE framing follow the real captures in ``tests/fixtures/vectors``.

Token accounting is deterministic so tests can assert it end to end:
``prompt_tokens = max(1, len(raw request body bytes) // 4)`` (see ``prompt_tokens_for``)
and every streamed content chunk is one completion token; the usage the mock reports is
always exactly what it streamed.

Per-request steering headers (all optional):

* ``x-mock-chunks: N``      content chunks to emit (1..100000)
* ``x-mock-delay-ms: MS``   pause between stream events
* ``x-mock-ttfb-ms: MS``    pause before the response headers
* ``x-mock-fail: MODE``     ``500`` | ``429`` | ``401-echo`` | ``midstream`` | ``hang`` |
  ``stall`` | ``no-usage`` (see ``FailMode``)

``GET /_mock/stats`` (and ``app[mock_stats]``) tell tests what the mock received;
``DELETE /_mock/stats`` resets it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import struct
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.mock_checks import (
    check_anthropic,
    check_anthropic_count,
    check_chat,
    check_gemini,
    check_gemini_batch_embed,
    check_gemini_count,
    check_gemini_embed,
    thinking_signature,
)

__all__ = [
    "DEFAULT_WORDS",
    "FailMode",
    "MockOptions",
    "MockServer",
    "MockStats",
    "RecordedRequest",
    "build_mock_app",
    "mock_stats",
    "prompt_tokens_for",
    "run_mock",
    "start_mock",
]

DEFAULT_WORDS: tuple[str, ...] = (
    "Hello",
    "!",
    " I",
    " am",
    " a",
    " mock",
    " model",
    " served",
    " by",
    " llm-proxy",
    " 你好",
    " 👋",  # multi-byte text on purpose: exercises UTF-8 handling across chunk boundaries
)
DEFAULT_MODELS: tuple[str, ...] = ("mock-gpt", "mock-embedding", "mock-claude", "mock-gemini")

MAX_CHUNKS = 100_000
RETRY_AFTER_S = 7
# How often a hanging/stalled handler looks whether its client has gone. aiohttp does not
# cancel handlers on disconnect (handler_cancellation is off by default), so we poll.
_DISCONNECT_POLL_S = 0.05
# A recognisable string that marks where the per-chunk text goes in a serialised template.
_SLOT = "\x00mock-slot\x00"
_SLOT_JSON = orjson.dumps(_SLOT)
_MODELS_CREATED = 1_735_689_600  # 2025-01-01T00:00:00Z, fixed so model lists are stable
_MODELS_CREATED_RFC3339 = "2025-01-01T00:00:00Z"

# The arguments every mock tool call carries, pre-split into the fragments that are
# streamed (one completion token each); joined they are valid JSON.
_TOOL_ARGS: dict[str, Any] = {"location": "San Francisco, CA", "unit": "celsius"}
_TOOL_ARG_FRAGMENTS: tuple[str, ...] = (
    '{"location',
    '": "San',
    " Francisco",
    ', CA", "',
    'unit": "cel',
    'sius"}',
)

_JSON_TYPE = "application/json"
_GOOGLE_JSON_TYPE = "application/json; charset=UTF-8"
_SSE_TYPE = "text/event-stream"
_ANTHROPIC_SSE_TYPE = "text/event-stream; charset=utf-8"
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class MockOptions:
    """Server-wide defaults; each request may override chunks/delay/ttfb by header."""

    chunks: int = 12
    chunk_delay_s: float = 0.0
    ttfb_s: float = 0.0
    words: tuple[str, ...] = DEFAULT_WORDS
    models: tuple[str, ...] = DEFAULT_MODELS
    embedding_dim: int = 64
    # Kept short so a stopping server does not wait a minute for hung handlers.
    shutdown_timeout_s: float = 1.0


class FailMode(Enum):
    """Values of the ``x-mock-fail`` header."""

    NONE = ""
    ERROR_500 = "500"  # 500 with the provider's error JSON
    ERROR_429 = "429"  # 429 + Retry-After: 7 with the provider's rate-limit body
    ERROR_401_ECHO = "401-echo"  # 401 whose body echoes the credential (a leaking provider)
    MIDSTREAM = "midstream"  # 3 events (half a JSON body), then the connection is aborted
    HANG = "hang"  # never sends headers; returns when the client leaves
    STALL = "stall"  # headers + 2 events (half a JSON body), then silence
    NO_USAGE = "no-usage"  # no usage anywhere, even when the client asked for it


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def to_json(self) -> dict[str, Any]:
        body: Any
        try:
            body = orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            body = self.body.decode("utf-8", "replace")
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": body,
        }


@dataclass
class MockStats:
    """What the mock received; a test-only fake, so it keeps credentials verbatim."""

    requests: Counter[str] = field(default_factory=Counter)  # path -> count
    recent: deque[RecordedRequest] = field(default_factory=lambda: deque(maxlen=64))
    disconnects: int = 0  # responses the client left before they were complete

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def last(self) -> RecordedRequest | None:
        return self.recent[-1] if self.recent else None

    @property
    def last_headers(self) -> dict[str, str]:
        last = self.last
        return dict(last.headers) if last else {}

    def record(self, request: RecordedRequest) -> None:
        self.requests[request.path] += 1
        self.recent.append(request)

    def reset(self) -> None:
        self.requests.clear()
        self.recent.clear()
        self.disconnects = 0

    def to_json(self) -> dict[str, Any]:
        last = self.last
        return {
            "total": self.total,
            "requests": dict(self.requests),
            "disconnects": self.disconnects,
            "last_headers": self.last_headers,
            "last": last.to_json() if last else None,
            "recent": [r.to_json() for r in self.recent],
        }


mock_stats = web.AppKey("mock_stats", MockStats)


def prompt_tokens_for(body: bytes) -> int:
    """The prompt token count the mock reports for a request body."""
    return max(1, len(body) // 4)


# --------------------------------------------------------------------------- internals


class _Dialect(Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"


@dataclass(frozen=True, slots=True)
class _Kit:
    """Per-app precomputed bytes so the hot path only concatenates."""

    options: MockOptions
    word_json: tuple[bytes, ...]  # orjson.dumps(word), escaped once
    anthropic_deltas: tuple[bytes, ...]  # whole framed content_block_delta event per word

    @classmethod
    def build(cls, options: MockOptions) -> _Kit:
        if not options.words:
            raise ValueError("MockOptions.words must not be empty")
        word_json = tuple(orjson.dumps(w) for w in options.words)
        head, tail = _slotted(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": _SLOT},
            },
            b"event: content_block_delta\ndata: ",
            b"\n\n",
        )
        return cls(options, word_json, tuple(head + w + tail for w in word_json))

    def word_values(self, n: int) -> list[bytes]:
        words = self.word_json
        return [words[i % len(words)] for i in range(n)]

    def text(self, n: int) -> str:
        words = self.options.words
        return "".join(words[i % len(words)] for i in range(n))


_KIT = web.AppKey("mock_kit", _Kit)
_CLOSING = web.AppKey("mock_closing", asyncio.Event)


@dataclass(frozen=True, slots=True)
class _Plan:
    chunks: int
    delay_s: float
    ttfb_s: float
    fail: FailMode


@dataclass(frozen=True, slots=True)
class _Call:
    """Everything a reply builder needs to know about one request."""

    kit: _Kit
    plan: _Plan
    body: dict[str, Any]
    prompt_tokens: int
    model: str  # "" when the request named none
    query: Mapping[str, str]
    created: int

    @property
    def chunks(self) -> int:
        return self.plan.chunks

    @property
    def with_usage(self) -> bool:
        return self.plan.fail is not FailMode.NO_USAGE

    def require_model(self) -> str:
        if not self.model:
            raise _BadRequest("you must provide a model parameter")
        return self.model


@dataclass(frozen=True, slots=True)
class _Reply:
    """A JSON document (events is None) or a stream of already framed events."""

    content_type: str
    body: bytes = b""
    events: Sequence[bytes] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class _BadRequest(Exception):
    """Raised by builders; becomes an error (400 unless told) in the route's dialect."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


_Builder = Callable[[_Call], _Reply]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _slotted(obj: Any, prefix: bytes, suffix: bytes) -> tuple[bytes, bytes]:
    """Serialise ``obj`` once and split it around ``_SLOT`` into (head, tail).

    Streams then build each event as head + json(value) + tail: exact field order and
    escaping come from orjson, the per-chunk cost is one concatenation.
    """
    head, sep, tail = orjson.dumps(obj).partition(_SLOT_JSON)
    if not sep or _SLOT_JSON in tail:
        raise _BadRequest("request contains the mock's reserved slot marker")
    return prefix + head, tail + suffix


def _fill(slot: tuple[bytes, bytes], values: Iterable[bytes]) -> list[bytes]:
    head, tail = slot
    return [head + v + tail for v in values]


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _named_sse(event: str, obj: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _json_reply(obj: Any, content_type: str = _JSON_TYPE) -> _Reply:
    return _Reply(content_type, body=orjson.dumps(obj))


def _stream_reply(events: Sequence[bytes], content_type: str = _SSE_TYPE) -> _Reply:
    return _Reply(content_type, events=events, headers={"Cache-Control": "no-cache"})


def _text_of(content: Any) -> str:
    """Text of a message ``content`` that is a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _last_user_text(messages: Any, content_key: str = "content") -> str:
    """Text of the conversation's last turn when the user wrote it (OpenAI/Anthropic
    ``messages`` or Gemini ``contents``); "" after tool results, so a tool loop ends."""
    if not isinstance(messages, list) or not messages:
        return ""
    message = messages[-1]
    if isinstance(message, dict) and message.get("role") in ("user", None):
        return _text_of(message.get(content_key))
    return ""


def _wants_weather_tool(tools: Any, user_text: str) -> bool:
    return isinstance(tools, list) and bool(tools) and "weather" in user_text.lower()


def _tool_calls_wanted(user_text: str) -> int:
    """How many tool calls to make at once: two when the user asks for them in parallel."""
    return 2 if "parallel" in user_text.lower() else 1


# What the mock "thinks" when a request turns reasoning on (deterministic: tests sign it).
_THOUGHT = "The user wants the weather, so I call the tool."


# --------------------------------------------------------------------------- errors and auth

# status -> (openai type, openai code, anthropic type, google status)
_ERROR_KINDS: Mapping[int, tuple[str, str | None, str, str]] = {
    400: ("invalid_request_error", None, "invalid_request_error", "INVALID_ARGUMENT"),
    401: ("invalid_request_error", "invalid_api_key", "authentication_error", "UNAUTHENTICATED"),
    403: ("invalid_request_error", None, "permission_error", "PERMISSION_DENIED"),
    404: ("invalid_request_error", None, "not_found_error", "NOT_FOUND"),
    429: ("requests", "rate_limit_exceeded", "rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("server_error", None, "api_error", "INTERNAL"),
}


def _error_response(
    dialect: _Dialect,
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> web.Response:
    openai_type, openai_code, anthropic_type, google_status = _ERROR_KINDS[status]
    out_headers = dict(headers or {})
    body: dict[str, Any]
    if dialect is _Dialect.OPENAI:
        body = {
            "error": {"message": message, "type": openai_type, "param": None, "code": openai_code}
        }
        out_headers["x-request-id"] = _new_id("req_")
        content_type = _JSON_TYPE
    elif dialect is _Dialect.ANTHROPIC:
        request_id = _new_id("req_")
        body = {
            "type": "error",
            "error": {"type": anthropic_type, "message": message},
            "request_id": request_id,
        }
        out_headers["request-id"] = request_id
        content_type = _JSON_TYPE
    else:
        body = {"error": {"code": status, "message": message, "status": google_status}}
        if details:
            body["error"]["details"] = details
        content_type = _GOOGLE_JSON_TYPE
    out_headers["Content-Type"] = content_type
    return web.Response(status=status, body=orjson.dumps(body), headers=out_headers)


def _auth_error(dialect: _Dialect, request: web.Request) -> web.Response | None:
    """The provider's own answer to a request without its credential, or None."""
    headers = request.headers
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    has_bearer = scheme.lower() == "bearer" and bool(token.strip())
    if dialect is _Dialect.OPENAI:
        if has_bearer:
            return None
        return _error_response(
            dialect,
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    if dialect is _Dialect.ANTHROPIC:
        # The anthropic SDK sends api_key as x-api-key or (newer versions) as Bearer.
        if headers.get("x-api-key", "").strip() or has_bearer:
            return None
        return _error_response(dialect, 401, "x-api-key header is required")
    if headers.get("x-goog-api-key", "").strip() or request.query.get("key", "").strip():
        return None
    return _error_response(
        dialect,
        403,
        "Method doesn't allow unregistered callers (callers without established identity). "
        "Please use API Key or other form of API consumer identity to call this API.",
    )


def _received_credentials(request: web.Request) -> list[str]:
    values = [request.headers[h] for h in _CREDENTIAL_HEADERS if h in request.headers]
    if "key" in request.query:
        values.append(request.query["key"])
    return values


def _failure_response(dialect: _Dialect, fail: FailMode, request: web.Request) -> web.Response:
    if fail is FailMode.ERROR_500:
        return _error_response(
            dialect, 500, "The server had an error while processing your request. Sorry about that!"
        )
    if fail is FailMode.ERROR_429:
        return _rate_limited(dialect)
    # ERROR_401_ECHO: a provider that quotes the full credential back in its error body.
    echoed = ", ".join(_received_credentials(request)) or "<none>"
    return _error_response(dialect, 401, f"Incorrect API key provided: {echoed}.")


def _rate_limited(dialect: _Dialect) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    if dialect is _Dialect.ANTHROPIC:
        headers["x-should-retry"] = "true"
    details = None
    if dialect is _Dialect.GEMINI:
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{RETRY_AFTER_S}s",
            }
        ]
        message = (
            "Resource has been exhausted (e.g. check quota). "
            f"Please retry in {RETRY_AFTER_S}s."
        )
    else:
        message = (
            "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1. "
            f"Please try again in {RETRY_AFTER_S}s."
        )
    return _error_response(dialect, 429, message, headers=headers, details=details)


def _plan_for(headers: CIMultiDictProxy[str], options: MockOptions) -> _Plan:
    """Read the x-mock-* headers; raises ValueError on a malformed value."""
    chunks = int(headers.get("x-mock-chunks", options.chunks))
    if not 1 <= chunks <= MAX_CHUNKS:
        raise ValueError(f"x-mock-chunks must be within 1..{MAX_CHUNKS}")
    delay_s = _millis(headers, "x-mock-delay-ms", options.chunk_delay_s)
    ttfb_s = _millis(headers, "x-mock-ttfb-ms", options.ttfb_s)
    fail = FailMode(headers.get("x-mock-fail", "").strip().lower())
    return _Plan(chunks, delay_s, ttfb_s, fail)


def _millis(headers: CIMultiDictProxy[str], name: str, default_s: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default_s
    value = float(raw) / 1000.0
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


# --------------------------------------------------------------------------- OpenAI


def _openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _tool_name_openai(tools: list[Any]) -> str:
    first = tools[0] if isinstance(tools[0], dict) else {}
    function = first.get("function")
    name = function.get("name") if isinstance(function, dict) else first.get("name")
    return name if isinstance(name, str) and name else "get_weather"


def _chat_completions(call: _Call) -> _Reply:
    model = call.require_model()
    body = call.body
    problem = check_chat(body)
    if problem is not None:
        raise _BadRequest(problem)
    tool = None
    text = _last_user_text(body.get("messages"))
    if _wants_weather_tool(body.get("tools"), text):
        tool = _tool_name_openai(body["tools"])
    calls = _tool_calls_wanted(text)
    # DeepSeek-style thinking: reasoning_content in the answer, required back (check_chat).
    reasoning = _THOUGHT if body.get("reasoning_effort") is not None else None
    if body.get("stream") is True:
        return _chat_stream(call, model, tool, calls, reasoning)
    return _json_reply(_chat_document(call, model, tool, calls, reasoning))


def _chat_document(
    call: _Call, model: str, tool: str | None, calls: int = 1, reasoning: str | None = None
) -> dict[str, Any]:
    message: dict[str, Any]
    if tool is None:
        completion = call.chunks
        message = {
            "role": "assistant",
            "content": call.kit.text(completion),
            "refusal": None,
            "annotations": [],
        }
        finish = "stop"
    else:
        completion = len(_TOOL_ARG_FRAGMENTS)
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": _new_id("call_"),
                    "type": "function",
                    "function": {"name": tool, "arguments": "".join(_TOOL_ARG_FRAGMENTS)},
                }
                for _ in range(calls)
            ],
            "refusal": None,
            "annotations": [],
        }
        completion *= calls
        finish = "tool_calls"
    if reasoning is not None:
        message["reasoning_content"] = reasoning
        completion += 1
    doc: dict[str, Any] = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": call.created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    if call.with_usage:
        doc["usage"] = _openai_usage(call.prompt_tokens, completion)
    doc["service_tier"] = "default"
    doc["system_fingerprint"] = "fp_mock"
    return doc


def _chat_stream(
    call: _Call, model: str, tool: str | None, calls: int = 1, reasoning: str | None = None
) -> _Reply:
    include_usage = _include_usage(call.body)
    head = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": model,
        "system_fingerprint": "fp_mock",
    }
    # OpenAI sends "usage": null on every chunk once the client asked for usage.
    tail = {"usage": None} if include_usage else {}

    def chunk(delta: Any, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **tail}

    first: dict[str, Any]
    if tool is None:
        first = {"role": "assistant", "content": "", "refusal": None}
        slot = _slotted(chunk({"content": _SLOT}), b"data: ", b"\n\n")
        values = call.kit.word_values(call.chunks)
        finish = "stop"
    else:
        first = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": _new_id("call_"),
                    "type": "function",
                    "function": {"name": tool, "arguments": ""},
                }
            ],
            "refusal": None,
        }
        fragment = {"tool_calls": [{"index": 0, "function": {"arguments": _SLOT}}]}
        slot = _slotted(chunk(fragment), b"data: ", b"\n\n")
        values = [orjson.dumps(f) for f in _TOOL_ARG_FRAGMENTS]
        finish = "tool_calls"
    events = [_sse(chunk(first)), *_fill(slot, values)]
    for k in range(1, calls if tool is not None else 1):
        # A parallel call: its own index and id, then its argument fragments.
        opening = {"index": k, "id": _new_id("call_"), "type": "function", "function": {"name": tool, "arguments": ""}}
        events.append(_sse(chunk({"tool_calls": [opening]})))
        more = _slotted(chunk({"tool_calls": [{"index": k, "function": {"arguments": _SLOT}}]}), b"data: ", b"\n\n")
        events.extend(_fill(more, [orjson.dumps(f) for f in _TOOL_ARG_FRAGMENTS]))
    if reasoning is not None:
        events.insert(0, _sse(chunk({"role": "assistant", "content": None, "reasoning_content": reasoning})))
    events.append(_sse(chunk({}, finish)))
    if include_usage and call.with_usage:
        usage = _openai_usage(call.prompt_tokens, (len(values) * (calls if tool is not None else 1)) + (reasoning is not None))
        events.append(_sse({**head, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return _stream_reply(events)


def _completions(call: _Call) -> _Reply:
    """Legacy text completions (FIM autocomplete clients still use them)."""
    model = call.require_model()
    completion_id = _new_id("cmpl-")
    if call.body.get("stream") is not True:
        doc: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": call.created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "text": call.kit.text(call.chunks),
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        }
        if call.with_usage:
            doc["usage"] = _openai_usage(call.prompt_tokens, call.chunks)
        return _json_reply(doc)
    include_usage = _include_usage(call.body)
    tail = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": call.created,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "model": model,
            "system_fingerprint": "fp_mock",
            **tail,
        }

    slot = _slotted(chunk(_SLOT, None), b"data: ", b"\n\n")
    events = [*_fill(slot, call.kit.word_values(call.chunks)), _sse(chunk("", "stop"))]
    if include_usage and call.with_usage:
        usage = _openai_usage(call.prompt_tokens, call.chunks)
        events.append(_sse({**chunk("", None), "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return _stream_reply(events)


def _embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]  # one token-id array
    if isinstance(value, list) and value:
        return [v if isinstance(v, str) else orjson.dumps(v).decode() for v in value]
    raise _BadRequest("'input' must be a non-empty string or array")


def _embedding_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from the text."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    rng = random.Random(seed)
    raw = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]


def _embeddings(call: _Call) -> _Reply:
    model = call.require_model()
    dim = call.body.get("dimensions", call.kit.options.embedding_dim)
    if not isinstance(dim, int) or not 1 <= dim <= 8192:
        raise _BadRequest("'dimensions' must be an integer within 1..8192")
    as_base64 = call.body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(_embedding_inputs(call.body.get("input"))):
        vector = _embedding_vector(text, dim)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    doc: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if call.with_usage:
        doc["usage"] = {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens}
    return _json_reply(doc)


def _response_object(
    call: _Call,
    response_id: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A Responses API ``Response``, field order as in the real capture."""
    body = call.body
    return {
        "id": response_id,
        "object": "response",
        "created_at": call.created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": call.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def _responses_usage(call: _Call) -> dict[str, Any] | None:
    if not call.with_usage:
        return None
    return {
        "input_tokens": call.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": call.chunks,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": call.prompt_tokens + call.chunks,
    }


def _responses(call: _Call) -> _Reply:
    call.require_model()
    response_id = _new_id("resp_")
    item_id = _new_id("msg_")
    text = call.kit.text(call.chunks)
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "content": [part],
        "role": "assistant",
    }
    usage = _responses_usage(call)
    if call.body.get("stream") is not True:
        return _json_reply(_response_object(call, response_id, "completed", [item], usage))
    return _stream_reply(_responses_events(call, response_id, item, usage))


def _responses_events(
    call: _Call, response_id: str, item: dict[str, Any], usage: dict[str, Any] | None
) -> list[bytes]:
    """The named-event sequence of a streamed Response (cf. docs_responses_stream_text.sse)."""
    item_id = item["id"]
    text = item["content"][0]["text"]
    in_progress = _response_object(call, response_id, "in_progress", [], None)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    done_part = {"type": "output_text", "text": text, "annotations": []}
    open_item = _message_item(item_id, "in_progress", [])
    done_item = _message_item(item_id, "completed", [done_part])
    completed = _response_object(call, response_id, "completed", [done_item], usage)
    words = call.kit.options.words
    payloads: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": in_progress}),
        ("response.in_progress", {"response": in_progress}),
        ("response.output_item.added", {"output_index": 0, "item": open_item}),
        ("response.content_part.added", {**where, "part": empty_part}),
        *(
            (
                "response.output_text.delta",
                {**where, "delta": words[i % len(words)], "logprobs": []},
            )
            for i in range(call.chunks)
        ),
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": done_part}),
        ("response.output_item.done", {"output_index": 0, "item": done_item}),
        ("response.completed", {"response": completed}),
    ]
    return [
        _named_sse(name, {"type": name, "sequence_number": seq, **fields})
        for seq, (name, fields) in enumerate(payloads)
    ]


def _message_item(item_id: str, status: str, content: list[Any]) -> dict[str, Any]:
    """An output message item in the streamed field order (role before content)."""
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _openai_model(model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": _MODELS_CREATED,
        "owned_by": "llm-proxy-mock",
    }


def _openai_models(call: _Call) -> _Reply:
    models = call.kit.options.models
    return _json_reply({"object": "list", "data": [_openai_model(m) for m in models]})


# --------------------------------------------------------------------------- Anthropic


def _anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _tool_name_anthropic(tools: list[Any]) -> str:
    name = tools[0].get("name") if isinstance(tools[0], dict) else None
    return name if isinstance(name, str) and name else "get_weather"


def _thinking_on(body: Mapping[str, Any]) -> bool:
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") == "enabled"


def _messages(call: _Call) -> _Reply:
    model = call.require_model()
    body = call.body
    problem = check_anthropic(body)
    if problem is not None:
        raise _BadRequest(problem)
    tool = None
    text = _last_user_text(body.get("messages"))
    if _wants_weather_tool(body.get("tools"), text):
        tool = _tool_name_anthropic(body["tools"])
    calls = _tool_calls_wanted(text)
    thinking = _thinking_on(body)
    if body.get("stream") is True:
        return _messages_stream(call, model, tool, calls, thinking)
    blocks: list[dict[str, Any]] = []
    if thinking:
        blocks.append({"type": "thinking", "thinking": _THOUGHT, "signature": thinking_signature(_THOUGHT)})
    if tool is None:
        blocks.append({"type": "text", "text": call.kit.text(call.chunks)})
        completion, stop = call.chunks, "end_turn"
    else:
        blocks.extend(
            {"type": "tool_use", "id": _new_id("toolu_"), "name": tool, "input": _TOOL_ARGS} for _ in range(calls)
        )
        completion, stop = len(_TOOL_ARG_FRAGMENTS) * calls, "tool_use"
    completion += thinking
    doc: dict[str, Any] = {
        "model": model,
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
    }
    if call.with_usage:
        doc["usage"] = _anthropic_usage(call.prompt_tokens, completion)
    return _json_reply(doc)


def _messages_stream(
    call: _Call, model: str, tool: str | None, calls: int = 1, thinking: bool = False
) -> _Reply:
    message: dict[str, Any] = {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if call.with_usage:
        # Like the real API: output_tokens starts at 1; message_delta carries the total.
        message["usage"] = _anthropic_usage(call.prompt_tokens, 1)
    first = 1 if thinking else 0   # the index of the first text / tool_use block
    if tool is None:
        block: dict[str, Any] = {"type": "text", "text": ""}
        ready = call.kit.anthropic_deltas
        deltas = [ready[i % len(ready)] for i in range(call.chunks)]
        if first:
            deltas = [d.replace(b'"index":0', b'"index":1', 1) for d in deltas]
        completion, stop = call.chunks, "end_turn"
    else:
        block = {"type": "tool_use", "id": _new_id("toolu_"), "name": tool, "input": {}}
        deltas = [
            _named_sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": first,
                    "delta": {"type": "input_json_delta", "partial_json": f},
                },
            )
            for f in ("", *_TOOL_ARG_FRAGMENTS)  # the real API opens with an empty fragment
        ]
        completion, stop = len(_TOOL_ARG_FRAGMENTS) * calls, "tool_use"
    completion += thinking
    message_delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
    }
    if call.with_usage:
        message_delta["usage"] = {"output_tokens": completion}
    events = [_named_sse("message_start", {"type": "message_start", "message": message})]
    if thinking:
        events.extend(_thinking_events())
    events += [
        _named_sse(
            "content_block_start",
            {"type": "content_block_start", "index": first, "content_block": block},
        ),
        b'event: ping\ndata: {"type": "ping"}\n\n',
        *deltas,
        _named_sse("content_block_stop", {"type": "content_block_stop", "index": first}),
    ]
    for k in range(1, calls if tool is not None else 1):
        index = first + k
        opening: dict[str, Any] = {"type": "tool_use", "id": _new_id("toolu_"), "name": tool, "input": {}}
        events.append(_named_sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": opening}))
        events.extend(
            _named_sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "input_json_delta", "partial_json": f}})
            for f in _TOOL_ARG_FRAGMENTS
        )
        events.append(_named_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    events += [
        _named_sse("message_delta", message_delta),
        _named_sse("message_stop", {"type": "message_stop"}),
    ]
    return _stream_reply(events, _ANTHROPIC_SSE_TYPE)


def _thinking_events() -> list[bytes]:
    """A thinking block at index 0: its text in two deltas, the signature just before stop."""
    half = len(_THOUGHT) // 2
    start = {"type": "thinking", "thinking": "", "signature": ""}
    return [
        _named_sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start}),
        *(
            _named_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "thinking_delta", "thinking": piece}})
            for piece in (_THOUGHT[:half], _THOUGHT[half:])
        ),
        _named_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "signature_delta", "signature": thinking_signature(_THOUGHT)}}),
        _named_sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]


def _count_tokens(call: _Call) -> _Reply:
    call.require_model()
    problem = check_anthropic_count(call.body)
    if problem is not None:
        raise _BadRequest(problem)
    return _json_reply({"input_tokens": call.prompt_tokens})


def _anthropic_model(model_id: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id.replace("-", " ").title(),
        "created_at": _MODELS_CREATED_RFC3339,
    }


def _anthropic_models(call: _Call) -> _Reply:
    models = list(call.kit.options.models)
    try:
        limit = int(call.query.get("limit", 20))
    except ValueError as exc:
        raise _BadRequest("limit: Input should be a valid integer") from exc
    page = models[: max(1, min(limit, 1000))]
    return _json_reply(
        {
            "data": [_anthropic_model(m) for m in page],
            "has_more": len(page) < len(models),
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
    )


# --------------------------------------------------------------------------- Gemini


def _gemini_usage(prompt: int, candidates: int | None) -> dict[str, Any]:
    """usageMetadata; candidatesTokenCount only on the final chunk, as Google does."""
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if candidates is None:
        usage["totalTokenCount"] = prompt
        usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
        return usage
    usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt + candidates
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": candidates}]
    return usage


def _gemini_tool(body: Mapping[str, Any]) -> str | None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not _wants_weather_tool(tools, _last_user_text(body.get("contents"), content_key="parts")):
        return None
    for tool in tools:
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        if isinstance(declarations, list) and declarations and isinstance(declarations[0], dict):
            name = declarations[0].get("name")
            if isinstance(name, str) and name:
                return name
    return None


def _gemini_chunk(
    parts: list[Any], finish: bool, usage: dict[str, Any] | None, model: str
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if finish:
        candidate["finishReason"] = "STOP"
    chunk: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        chunk["usageMetadata"] = usage
    chunk["modelVersion"] = model
    return chunk


def _check_gemini(call: _Call) -> None:
    problem = check_gemini(call.body)
    if problem is not None:
        raise _BadRequest(problem)


def _gemini_thinking(body: Mapping[str, Any]) -> bool:
    config = body.get("generationConfig")
    return isinstance(config, dict) and isinstance(config.get("thinkingConfig"), dict)


def _gemini_call_parts(body: Mapping[str, Any], tool: str) -> list[Any]:
    """The function call parts of a tool turn: with thinking on, a thought part first and
    a thoughtSignature on the first call only, as Gemini does with parallel calls."""
    text = _last_user_text(body.get("contents"), content_key="parts")
    parts: list[Any] = [{"functionCall": {"name": tool, "args": _TOOL_ARGS}} for _ in range(_tool_calls_wanted(text))]
    if _gemini_thinking(body):
        parts[0]["thoughtSignature"] = thinking_signature(tool)
        parts.insert(0, {"text": _THOUGHT, "thought": True})
    return parts


def _generate_content(call: _Call) -> _Reply:
    _check_gemini(call)
    tool = _gemini_tool(call.body)
    if tool is None:
        text = call.kit.text(call.chunks)
        parts: list[Any] = [{"text": text}]
        if _gemini_thinking(call.body):
            # Gemini signs a text-only turn on its last part (checked when sent back).
            parts[0]["thoughtSignature"] = thinking_signature(text)
        completion = call.chunks
    else:
        parts = _gemini_call_parts(call.body, tool)
        completion = len(parts)
    usage = _gemini_usage(call.prompt_tokens, completion) if call.with_usage else None
    return _json_reply(_gemini_chunk(parts, True, usage, call.model), _GOOGLE_JSON_TYPE)


def _gemini_stream_docs(call: _Call) -> list[bytes]:
    """One JSON document per chunk; every one carries usageMetadata, the last finishes."""
    prompt = call.prompt_tokens
    tool = _gemini_tool(call.body)
    if tool is not None:
        # Function calls arrive whole, in one part, never as partial arguments.
        parts = _gemini_call_parts(call.body, tool)
        usage = _gemini_usage(prompt, len(parts)) if call.with_usage else None
        return [orjson.dumps(_gemini_chunk(parts, True, usage, call.model))]
    values = call.kit.word_values(call.chunks)
    middle_usage = _gemini_usage(prompt, None) if call.with_usage else None
    slot = _slotted(_gemini_chunk([{"text": _SLOT}], False, middle_usage, call.model), b"", b"")
    last_usage = _gemini_usage(prompt, call.chunks) if call.with_usage else None
    last_parts: list[Any] = [{"text": _SLOT}]
    if _gemini_thinking(call.body):
        # Streamed, the signature comes on a trailing empty part, as Google sends it.
        last_parts.append({"text": "", "thoughtSignature": thinking_signature(call.kit.text(call.chunks))})
    last_slot = _slotted(_gemini_chunk(last_parts, True, last_usage, call.model), b"", b"")
    return [*_fill(slot, values[:-1]), *_fill(last_slot, values[-1:])]


def _stream_generate_content(call: _Call) -> _Reply:
    _check_gemini(call)
    docs = _gemini_stream_docs(call)
    if call.query.get("alt") == "sse":
        return _stream_reply([b"data: " + d + b"\r\n\r\n" for d in docs])
    # Without alt=sse Google streams one JSON array, element by element.
    pieces = [b"[" + docs[0] + b"\r\n", *(b"," + d + b"\r\n" for d in docs[1:]), b"]"]
    return _stream_reply(pieces, _GOOGLE_JSON_TYPE)


def _gemini_count_tokens(call: _Call) -> _Reply:
    problem = check_gemini_count(call.body, call.model)
    if problem is not None:
        raise _BadRequest(problem)
    return _json_reply(
        {
            "totalTokens": call.prompt_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": call.prompt_tokens}],
        },
        _GOOGLE_JSON_TYPE,
    )


def _gemini_embedding(call: _Call, request: Mapping[str, Any]) -> dict[str, Any]:
    """One ContentEmbedding: the same deterministic vector the OpenAI route gives the text."""
    text = "\n".join(p["text"] for p in request["content"]["parts"])
    dim = request.get("outputDimensionality") or call.kit.options.embedding_dim
    return {"values": _embedding_vector(text, dim)}


def _gemini_embed_usage(call: _Call) -> dict[str, Any]:
    return {"promptTokenCount": call.prompt_tokens, "totalTokenCount": call.prompt_tokens}


def _embed_content(call: _Call) -> _Reply:
    problem = check_gemini_embed(call.body, "EmbedContentRequest", None)
    if problem is not None:
        raise _BadRequest(problem)
    doc: dict[str, Any] = {"embedding": _gemini_embedding(call, call.body)}
    if call.with_usage:
        doc["usageMetadata"] = _gemini_embed_usage(call)
    return _json_reply(doc, _GOOGLE_JSON_TYPE)


def _batch_embed_contents(call: _Call) -> _Reply:
    problem = check_gemini_batch_embed(call.body, call.model)
    if problem is not None:
        raise _BadRequest(problem)
    doc: dict[str, Any] = {"embeddings": [_gemini_embedding(call, r) for r in call.body["requests"]]}
    if call.with_usage:
        doc["usageMetadata"] = _gemini_embed_usage(call)
    return _json_reply(doc, _GOOGLE_JSON_TYPE)


def _gemini_model(model_id: str) -> dict[str, Any]:
    return {
        "name": f"models/{model_id}",
        "version": "001",
        "displayName": model_id,
        "description": "A model served by the llm-proxy mock upstream.",
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 65_536,
        "supportedGenerationMethods": ["generateContent", "countTokens"],
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
    }


def _gemini_models(call: _Call) -> _Reply:
    models = [_gemini_model(m) for m in call.kit.options.models]
    return _json_reply({"models": models}, _GOOGLE_JSON_TYPE)


_GEMINI_METHODS: Mapping[str, _Builder] = {
    "generateContent": _generate_content,
    "streamGenerateContent": _stream_generate_content,
    "countTokens": _gemini_count_tokens,
    "embedContent": _embed_content,
    "batchEmbedContents": _batch_embed_contents,
}


# --------------------------------------------------------------------------- serving


async def _client_gone(request: web.Request) -> None:
    """Return once the client has disconnected or the server is shutting down."""
    closing = request.app[_CLOSING]
    while not closing.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            request.app[mock_stats].disconnects += 1
            return
        try:
            await asyncio.wait_for(closing.wait(), _DISCONNECT_POLL_S)
        except TimeoutError:
            pass


async def _cut_connection(request: web.Request) -> None:
    """Abort the TCP connection, but only after what was written has left the buffer."""
    transport = request.transport
    if transport is None:
        return
    for _ in range(1000):  # bounded: a client that stops reading must not pin us here
        if not transport.get_write_buffer_size() or transport.is_closing():
            break
        await asyncio.sleep(0.001)
    transport.abort()


async def _write_all(resp: web.StreamResponse, pieces: Sequence[bytes], delay_s: float) -> None:
    if delay_s <= 0:
        # The fast path for the benchmark: one write, no per-event wakeups.
        await resp.write(b"".join(pieces))
        return
    for i, piece in enumerate(pieces):
        if i:
            await asyncio.sleep(delay_s)
        await resp.write(piece)


async def _send(request: web.Request, reply: _Reply, plan: _Plan) -> web.StreamResponse:
    broken = plan.fail in (FailMode.MIDSTREAM, FailMode.STALL)
    headers = {"Content-Type": reply.content_type, **reply.headers}
    if reply.events is None and not broken:
        return web.Response(body=reply.body, headers=headers)
    resp = web.StreamResponse(headers=headers)
    if reply.events is None:
        # A document is "streamed" only to break it: announce its full length, send half.
        resp.content_length = len(reply.body)
        pieces: Sequence[bytes] = [reply.body[: len(reply.body) // 2]]
    else:
        pieces = reply.events
        if plan.fail is FailMode.MIDSTREAM:
            pieces = pieces[:3]
        elif plan.fail is FailMode.STALL:
            pieces = pieces[:2]
    try:
        await resp.prepare(request)
        await _write_all(resp, pieces, plan.delay_s)
        if plan.fail is FailMode.MIDSTREAM:
            await _cut_connection(request)
        elif plan.fail is FailMode.STALL:
            await _client_gone(request)
        else:
            await resp.write_eof()
    except ConnectionError:
        request.app[mock_stats].disconnects += 1
    return resp


async def _serve(
    request: web.Request, dialect: _Dialect, build: _Builder, model: str | None = None
) -> web.StreamResponse:
    """The shared request pipeline: auth, steering headers, failures, reply, send."""
    unauthorized = _auth_error(dialect, request)
    if unauthorized is not None:
        return unauthorized
    kit = request.app[_KIT]
    try:
        plan = _plan_for(request.headers, kit.options)
    except ValueError as exc:
        return _error_response(dialect, 400, f"bad mock control header: {exc}")
    raw = await request.read()
    body: Any = {}
    if raw:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error_response(
                dialect, 400, "We could not parse the JSON body of your request."
            )
        if not isinstance(body, dict):
            return _error_response(dialect, 400, "The request body must be a JSON object.")
    if plan.fail is FailMode.HANG:
        await _client_gone(request)
        return web.Response(status=499)  # nobody is listening any more
    if plan.ttfb_s > 0:
        await asyncio.sleep(plan.ttfb_s)
    if plan.fail in (FailMode.ERROR_500, FailMode.ERROR_429, FailMode.ERROR_401_ECHO):
        return _failure_response(dialect, plan.fail, request)
    body_model = body.get("model")
    call = _Call(
        kit=kit,
        plan=plan,
        body=body,
        prompt_tokens=prompt_tokens_for(raw),
        model=model if model is not None else body_model if isinstance(body_model, str) else "",
        query=request.query,
        created=int(time.time()),
    )
    try:
        reply = build(call)
    except _BadRequest as exc:
        return _error_response(dialect, exc.status, str(exc))
    return await _send(request, reply, plan)


def _route(dialect: _Dialect, build: _Builder) -> _Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _serve(request, dialect, build)

    return handler


def _models_dialect(request: web.Request) -> _Dialect:
    """/v1/models is shared: callers are told apart by the credential style they send."""
    headers = request.headers
    if "x-goog-api-key" in headers or "key" in request.query:
        return _Dialect.GEMINI
    if "anthropic-version" in headers or (
        "x-api-key" in headers and "Authorization" not in headers
    ):
        return _Dialect.ANTHROPIC
    return _Dialect.OPENAI


_MODEL_LISTS: Mapping[_Dialect, _Builder] = {
    _Dialect.OPENAI: _openai_models,
    _Dialect.ANTHROPIC: _anthropic_models,
    _Dialect.GEMINI: _gemini_models,
}
_MODEL_ENTRIES: Mapping[_Dialect, Callable[[str], dict[str, Any]]] = {
    _Dialect.OPENAI: _openai_model,
    _Dialect.ANTHROPIC: _anthropic_model,
    _Dialect.GEMINI: _gemini_model,
}


def _model_entry(dialect: _Dialect, model_id: str) -> _Builder:
    def build(call: _Call) -> _Reply:
        if model_id not in call.kit.options.models:
            raise _BadRequest(f"The model '{model_id}' does not exist", status=404)
        content_type = _GOOGLE_JSON_TYPE if dialect is _Dialect.GEMINI else _JSON_TYPE
        return _json_reply(_MODEL_ENTRIES[dialect](model_id), content_type)

    return build


async def _list_models(request: web.Request) -> web.StreamResponse:
    dialect = _models_dialect(request)
    return await _serve(request, dialect, _MODEL_LISTS[dialect])


async def _get_model(request: web.Request) -> web.StreamResponse:
    dialect = _models_dialect(request)
    model_id = request.match_info["model"].removeprefix("models/")
    return await _serve(request, dialect, _model_entry(dialect, model_id))


async def _gemini_get_model(request: web.Request) -> web.StreamResponse:
    model_id = request.match_info["model"]
    return await _serve(request, _Dialect.GEMINI, _model_entry(_Dialect.GEMINI, model_id))


async def _gemini_method(request: web.Request) -> web.StreamResponse:
    """POST /{version}/models/{model}:{method}."""
    model, method = request.match_info["model"], request.match_info["method"]
    build = _GEMINI_METHODS.get(method)
    if build is None:
        return _error_response(
            _Dialect.GEMINI, 404, f"Method '{method}' is not found for model '{model}'."
        )
    return await _serve(request, _Dialect.GEMINI, build, model)


async def _stats(request: web.Request) -> web.Response:
    stats = request.app[mock_stats]
    if request.method == "DELETE":
        stats.reset()
    return web.Response(body=orjson.dumps(stats.to_json()), content_type=_JSON_TYPE)


async def _unknown(request: web.Request) -> web.Response:
    return _error_response(_Dialect.OPENAI, 404, f"Invalid URL ({request.method} {request.path})")


@web.middleware
async def _record(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Count every API request and keep its headers and body for tests to inspect."""
    if not request.path.startswith("/_mock/"):
        body = await request.read() if request.can_read_body else b""
        request.app[mock_stats].record(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
    return await handler(request)


async def _on_shutdown(app: web.Application) -> None:
    app[_CLOSING].set()  # releases hanging/stalled handlers so shutdown is prompt


def build_mock_app(options: MockOptions = MockOptions()) -> web.Application:
    """The mock provider as an aiohttp application (not yet bound to a socket)."""
    app = web.Application(middlewares=[_record], client_max_size=64 * 1024 * 1024)
    app[mock_stats] = MockStats()
    app[_KIT] = _Kit.build(options)
    app[_CLOSING] = asyncio.Event()
    app.on_shutdown.append(_on_shutdown)
    openai, anthropic = _Dialect.OPENAI, _Dialect.ANTHROPIC
    router = app.router
    router.add_post("/v1/chat/completions", _route(openai, _chat_completions))
    router.add_post("/v1/completions", _route(openai, _completions))
    router.add_post("/v1/embeddings", _route(openai, _embeddings))
    router.add_post("/v1/responses", _route(openai, _responses))
    router.add_get("/v1/models", _list_models)
    router.add_post("/v1/messages", _route(anthropic, _messages))
    router.add_post("/v1/messages/count_tokens", _route(anthropic, _count_tokens))
    router.add_get("/v1beta/models", _route(_Dialect.GEMINI, _gemini_models))
    for version in ("v1beta", "v1"):
        router.add_post(f"/{version}/models/{{model:[^/:]+}}:{{method:[A-Za-z]+}}", _gemini_method)
    router.add_get("/v1beta/models/{model}", _gemini_get_model)
    router.add_get("/v1/models/{model}", _get_model)
    router.add_route("GET", "/_mock/stats", _stats)
    router.add_route("DELETE", "/_mock/stats", _stats)
    router.add_route("*", "/{tail:.*}", _unknown)
    return app


@dataclass
class MockServer:
    """A running mock bound to a socket; ``base_url`` has no trailing slash."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def app(self) -> web.Application:
        return self.runner.app

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stats(self) -> MockStats:
        return self.app[mock_stats]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_mock(
    host: str = "127.0.0.1", port: int = 0, options: MockOptions = MockOptions()
) -> MockServer:
    """Start the mock in this event loop; ``port=0`` picks a free port."""
    runner = web.AppRunner(
        build_mock_app(options), access_log=None, shutdown_timeout=options.shutdown_timeout_s
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return MockServer(runner, host, bound_port)


async def run_mock(host: str, port: int, options: MockOptions = MockOptions()) -> None:
    """Serve the mock until cancelled (``llm-proxy mock-upstream``)."""
    server = await start_mock(host, port, options)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
