"""What every API dialect provides: wire-format knowledge and no I/O.

A dialect is the API family a route speaks (openai, anthropic, gemini). It renders
the gateway's own errors in its shape, frames mid-stream errors and keep-alives, and
knows how its upstreams want to be called (URL layout and credential header).
Generic code never branches on a dialect's name; it asks the dialect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.errors import InvalidRequest, ProxyError

# The output caps the OpenAI and Anthropic bodies name (and every dialect accepts).
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
MAX_OUTPUT_CAP = 10_000_000


@dataclass(frozen=True)
class ModelInfo:
    """A model as listed to clients."""

    id: str
    owned_by: str
    created: int
    # An embedding model (proxy.handlers decides): Gemini lists its embedding methods.
    embeds: bool = False


class Dialect(Protocol):
    name: str
    # Bytes written while an upstream is silent; None means this dialect gets none.
    keepalive: bytes | None
    # Whether a client key may come in the query string (`?key=`, Gemini's own style).
    key_in_query: bool

    # Whether a stream asked for with this query string comes as SSE (Gemini streams one
    # JSON array unless the query says `alt=sse`); the upstream's answer is metered so.
    def streams_sse(self, query: str) -> bool: ...
    def error_body(self, err: ProxyError, request_id: str) -> bytes: ...
    def error_status(self, err: ProxyError) -> int: ...
    def stream_error_event(self, err: ProxyError, request_id: str) -> bytes: ...
    def relay_error_body(self, body: bytes, request_id: str) -> bytes: ...
    def upstream_headers(self, api_key: str | None) -> Mapping[str, str]: ...
    def upstream_url(self, base_url: str, endpoint: str, upstream_model: str, stream: bool, query: str) -> str: ...
    def models_body(self, models: Sequence[ModelInfo], query: Mapping[str, str]) -> bytes: ...
    # One model, as the dialect's "get model" call answers it.
    def model_body(self, model: ModelInfo) -> bytes: ...
    # An upstream's model list: a cheap authenticated GET for active health checks.
    def models_url(self, base_url: str) -> str: ...
    # The smallest real call (endpoint name, JSON body) for POST /admin/upstreams/test.
    def test_call(self, upstream_model: str) -> tuple[str, bytes]: ...

    # The output cap the body asks for (InvalidRequest when malformed), None if none.
    def max_output_tokens(self, body: Mapping[str, Any]) -> int | None: ...


def max_tokens_field(body: Mapping[str, Any]) -> int | None:
    """The first of the OpenAI / Anthropic output-cap fields the body sets, checked."""
    for name in _MAX_TOKEN_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(f"'{name}' must be a non-negative integer.", param=name)
        return min(value, MAX_OUTPUT_CAP)
    return None


@dataclass(frozen=True)
class Endpoint:
    """One model-calling route of a dialect."""

    name: str                 # "chat.completions", "messages", "streamGenerateContent", ...
    dialect: Dialect
    # The body carries `model` (OpenAI, Anthropic); Gemini puts it in the path.
    model_in_path: bool = False
    # True when the route itself means streaming (Gemini streamGenerateContent).
    always_stream: bool = False
    # Whether the request may stream at all (embeddings and count_tokens never do).
    can_stream: bool = True
    # Whether the answer holds generated tokens (embeddings and counts: none), so
    # whether the limits reserve an output cap for it.
    generates: bool = True
    # A free call (token counts): it reserves and records no tokens, only a request.
    free: bool = False
    # Whether the gateway asks this endpoint's upstream for a usage chunk (OpenAI chat/completions).
    wants_include_usage: bool = False
    # Body fields the endpoint cannot do without, checked before any upstream call.
    required: tuple[str, ...] = ()
    # Fields that mean the caller is speaking another API on this route, and which route.
    misdirected: tuple[tuple[str, str], ...] = ()
    # Fields that make a body of another API's shape which the translator reads instead
    # (Cursor sends Responses-shaped bodies, `input` for `messages`, to chat completions).
    other_shapes: tuple[str, ...] = ()
    # For endpoints whose model is in the path but also named in the body (Gemini's
    # batchEmbedContents: each request names it): (body, client model, upstream model) →
    # the body for the upstream, or None when it needs no change (the byte-exact path).
    retarget: Callable[[dict[str, Any], str, str], dict[str, Any] | None] | None = None
