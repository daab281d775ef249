"""The Anthropic Messages dialect: messages, count_tokens, models (Anthropic list shape)."""

from __future__ import annotations

import datetime
from typing import Mapping, Sequence

import orjson

from proxy.dialects.base import Endpoint, ModelInfo
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

    def error_status(self, err: ProxyError) -> int:
        return err.status

    def _error(self, err: ProxyError, request_id: str) -> dict[str, object]:
        kind = _TYPES.get(err.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": err.message}, "request_id": request_id}

    def error_body(self, err: ProxyError, request_id: str) -> bytes:
        return orjson.dumps(self._error(err, request_id))

    def stream_error_event(self, err: ProxyError, request_id: str) -> bytes:
        return b"event: error\ndata: " + orjson.dumps(self._error(err, request_id)) + b"\n\n"

    def upstream_headers(self, api_key: str | None) -> Mapping[str, str]:
        return {"x-api-key": api_key} if api_key else {}

    def upstream_url(self, base_url: str, endpoint: str, upstream_model: str, stream: bool, query: str) -> str:
        url = base_url.rstrip("/") + _PATHS[endpoint]
        return url + "?beta=true" if "beta=true" in query else url

    def models_body(self, models: Sequence[ModelInfo], query: Mapping[str, str]) -> bytes:
        try:
            limit = max(1, min(1000, int(query.get("limit", "1000"))))
        except ValueError:
            limit = 1000
        shown = list(models)[:limit]
        data = [
            {
                "type": "model",
                "id": m.id,
                "display_name": m.id,
                "created_at": datetime.datetime.fromtimestamp(m.created, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            for m in shown
        ]
        return orjson.dumps(
            {
                "data": data,
                "has_more": len(models) > len(shown),
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )


ANTHROPIC = AnthropicDialect()
MESSAGES = Endpoint("messages", ANTHROPIC)
COUNT_TOKENS = Endpoint("count_tokens", ANTHROPIC, can_stream=False)
