"""The Anthropic Messages dialect: messages, count_tokens, models (Anthropic list shape)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from proxy.dialects.base import Endpoint, ModelInfo, max_tokens_field
from proxy.errors import ProxyError

# Anthropic's documented status → error.type map (docs_error_shape_not_found.json's page).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_PATHS = {"messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"}
ANTHROPIC_VERSION = "2023-06-01"


class AnthropicDialect:
    name = "anthropic"
    keepalive: bytes | None = b'event: ping\ndata: {"type": "ping"}\n\n'
    key_in_query = False

    def streams_sse(self, query: str) -> bool:
        return True

    def error_status(self, err: ProxyError) -> int:
        # Anthropic's own "overloaded" status: its SDKs raise OverloadedError for it.
        return 529 if err.code == "upstream_overloaded" else err.status

    def _error(self, err: ProxyError, request_id: str) -> dict[str, object]:
        kind = _TYPES.get(self.error_status(err), "api_error")
        return {"type": "error", "error": {"type": kind, "message": err.message}, "request_id": request_id}

    def error_body(self, err: ProxyError, request_id: str) -> bytes:
        return orjson.dumps(self._error(err, request_id))

    def stream_error_event(self, err: ProxyError, request_id: str) -> bytes:
        return b"event: error\ndata: " + orjson.dumps(self._error(err, request_id)) + b"\n\n"

    def relay_error_body(self, body: bytes, request_id: str) -> bytes:
        """An upstream error passed on under this gateway's id, as in the `request-id` header."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if not isinstance(doc, dict) or "request_id" not in doc:
            return body
        return orjson.dumps({**doc, "request_id": request_id})

    def upstream_headers(self, api_key: str | None) -> Mapping[str, str]:
        return {"x-api-key": api_key} if api_key else {}

    def upstream_url(self, base_url: str, endpoint: str, upstream_model: str, stream: bool, query: str) -> str:
        url = base_url.rstrip("/") + _PATHS[endpoint]
        return url + "?beta=true" if "beta=true" in query else url

    def models_url(self, base_url: str) -> str:
        return base_url.rstrip("/") + "/v1/models"

    def test_call(self, upstream_model: str) -> tuple[str, bytes]:
        body = {"model": upstream_model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
        return "messages", orjson.dumps(body)

    def max_output_tokens(self, body: Mapping[str, Any]) -> int | None:
        return max_tokens_field(body)

    def models_body(self, models: Sequence[ModelInfo], query: Mapping[str, str]) -> bytes:
        try:
            limit = max(1, min(1000, int(query.get("limit", "1000"))))
        except ValueError:
            limit = 1000
        items = list(models)
        ids = [m.id for m in items]
        # The SDKs page with after_id (or before_id) while has_more is true (CLIENTS.md item 44).
        if (after := query.get("after_id")) is not None:
            items = items[ids.index(after) + 1 :] if after in ids else []
            shown = items[:limit]
        elif (before := query.get("before_id")) is not None:
            items = items[: ids.index(before)] if before in ids else []
            shown = items[-limit:]
        else:
            shown = items[:limit]
        data = [_model(m) for m in shown]
        return orjson.dumps(
            {
                "data": data,
                "has_more": len(items) > len(shown),
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def model_body(self, model: ModelInfo) -> bytes:
        return orjson.dumps(_model(model))


def _model(m: ModelInfo) -> dict[str, str]:
    created = datetime.datetime.fromtimestamp(m.created, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "model", "id": m.id, "display_name": m.id, "created_at": created}


ANTHROPIC = AnthropicDialect()
MESSAGES = Endpoint("messages", ANTHROPIC)
COUNT_TOKENS = Endpoint("count_tokens", ANTHROPIC, can_stream=False, generates=False, free=True)
