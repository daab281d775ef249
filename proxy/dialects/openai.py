"""The OpenAI dialect: chat completions, completions, embeddings, responses, models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from proxy.dialects.base import Endpoint, ModelInfo, max_tokens_field
from proxy.errors import ProxyError

_PATHS = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
}


class OpenAIDialect:
    name = "openai"
    # Not ": ping": Continue's SSE parser mis-reads that prefix (CLIENTS.md item 25).
    keepalive: bytes | None = b": keep-alive\n\n"
    key_in_query = False

    def streams_sse(self, query: str) -> bool:
        return True

    def error_status(self, err: ProxyError) -> int:
        return err.status

    def _error(self, err: ProxyError) -> dict[str, object]:
        return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}

    def error_body(self, err: ProxyError, request_id: str) -> bytes:
        return orjson.dumps(self._error(err))

    def stream_error_event(self, err: ProxyError, request_id: str) -> bytes:
        # One data event, then the stream closes without [DONE] (truncation is visible).
        return b"data: " + orjson.dumps(self._error(err)) + b"\n\n"

    def relay_error_body(self, body: bytes, request_id: str) -> bytes:
        return body

    def upstream_headers(self, api_key: str | None) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def upstream_url(self, base_url: str, endpoint: str, upstream_model: str, stream: bool, query: str) -> str:
        return base_url.rstrip("/") + _PATHS[endpoint]

    def models_url(self, base_url: str) -> str:
        return base_url.rstrip("/") + "/models"

    def test_call(self, upstream_model: str) -> tuple[str, bytes]:
        body = {"model": upstream_model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        return "chat.completions", orjson.dumps(body)

    def max_output_tokens(self, body: Mapping[str, Any]) -> int | None:
        return max_tokens_field(body)

    def models_body(self, models: Sequence[ModelInfo], query: Mapping[str, str]) -> bytes:
        return orjson.dumps(
            {
                "object": "list",
                "data": [_model(m) for m in models],
            }
        )

    def model_body(self, model: ModelInfo) -> bytes:
        return orjson.dumps(_model(model))


def _model(m: ModelInfo) -> dict[str, object]:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}


OPENAI = OpenAIDialect()
# Cursor sends Responses-shaped bodies (`input`, `instructions`) to chat completions and
# expects chat chunks back: they are translated (proxy/translate). What cannot be
# (`previous_response_id`) gets a 400 that names the field, never an upstream 500.
CHAT = Endpoint(
    "chat.completions",
    OPENAI,
    wants_include_usage=True,
    required=("messages",),
    misdirected=(("previous_response_id", "/v1/responses"),),
    other_shapes=("input",),
)
COMPLETIONS = Endpoint("completions", OPENAI, wants_include_usage=True, required=("prompt",))
EMBEDDINGS = Endpoint("embeddings", OPENAI, can_stream=False, generates=False, required=("input",))
RESPONSES = Endpoint("responses", OPENAI)
