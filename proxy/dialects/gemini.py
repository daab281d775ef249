"""The Gemini dialect: generateContent, streamGenerateContent, countTokens, embedContent,
batchEmbedContents, models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from proxy.dialects.base import MAX_OUTPUT_CAP, Endpoint, ModelInfo, max_tokens_field
from proxy.errors import ProxyError

# google.rpc status names by HTTP status.
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class GeminiDialect:
    name = "gemini"
    # Gemini clients accept no SSE comments or extra events (CLIENTS.md item 38).
    keepalive: bytes | None = None
    key_in_query = True   # ?key=, as Google's own API takes it

    def streams_sse(self, query: str) -> bool:
        # streamGenerateContent answers one JSON array unless the caller asks `?alt=sse`.
        return "alt=sse" in query

    def error_status(self, err: ProxyError) -> int:
        return err.status

    def _error(self, err: ProxyError) -> dict[str, object]:
        details: list[dict[str, object]] = [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": err.code.upper(), "domain": "llm-proxy"}
        ]
        message = err.message
        if err.retry_after_s is not None:
            # gemini-cli reads the delay with /Please retry in ([0-9.]+(?:ms|s))/ (CLIENTS.md item 48).
            message = message.replace("Please try again in", "Please retry in")
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{err.retry_after_s}s"})
        # `error` must be the first key: google-genai checks startswith('{"error":').
        return {"error": {"code": err.status, "message": message, "status": _STATUS.get(err.status, "UNKNOWN"), "details": details}}

    def error_body(self, err: ProxyError, request_id: str) -> bytes:
        return orjson.dumps(self._error(err))

    def stream_error_event(self, err: ProxyError, request_id: str) -> bytes:
        return b"data: " + orjson.dumps(self._error(err)) + b"\r\n\r\n"

    def relay_error_body(self, body: bytes, request_id: str) -> bytes:
        return body

    def upstream_headers(self, api_key: str | None) -> Mapping[str, str]:
        return {"x-goog-api-key": api_key} if api_key else {}

    def upstream_url(self, base_url: str, endpoint: str, upstream_model: str, stream: bool, query: str) -> str:
        url = f"{base_url.rstrip('/')}/v1beta/models/{upstream_model}:{endpoint}"
        return url + "?alt=sse" if "alt=sse" in query else url

    def models_url(self, base_url: str) -> str:
        return base_url.rstrip("/") + "/v1beta/models"

    def test_call(self, upstream_model: str) -> tuple[str, bytes]:
        body = {"contents": [{"role": "user", "parts": [{"text": "ping"}]}], "generationConfig": {"maxOutputTokens": 1}}
        return "generateContent", orjson.dumps(body)

    def max_output_tokens(self, body: Mapping[str, Any]) -> int | None:
        cap = max_tokens_field(body)
        if cap is not None:
            return cap
        config = body.get("generationConfig")
        limit = config.get("maxOutputTokens") if isinstance(config, dict) else None
        return max(0, min(limit, MAX_OUTPUT_CAP)) if isinstance(limit, int) else None

    def models_body(self, models: Sequence[ModelInfo], query: Mapping[str, str]) -> bytes:
        return orjson.dumps({"models": [_model(m) for m in models]})

    def model_body(self, model: ModelInfo) -> bytes:
        return orjson.dumps(_model(model))


# The methods the gateway serves on every listed model (proxy.dialects.GEMINI_METHODS).
_METHODS = ("generateContent", "streamGenerateContent", "countTokens")


# What an embedding model serves instead (as Google lists its embedding models).
_EMBED_METHODS = ("embedContent", "batchEmbedContents", "countTokens")


def _model(m: ModelInfo) -> dict[str, object]:
    methods = _EMBED_METHODS if m.embeds else _METHODS
    return {"name": f"models/{m.id}", "displayName": m.id, "supportedGenerationMethods": list(methods)}


def _retarget_batch(body: dict[str, Any], model: str, upstream_model: str) -> dict[str, Any] | None:
    """batchEmbedContents names the model in each request, and Google refuses one that is not
    the URL's: requests naming the client's model name the route's upstream model instead."""
    requests = body.get("requests")
    if not isinstance(requests, list):
        return None
    mine = (f"models/{model}", model)
    if not any(isinstance(r, dict) and r.get("model") in mine for r in requests):
        return None
    want = f"models/{upstream_model}"
    return {**body, "requests": [{**r, "model": want} if isinstance(r, dict) and r.get("model") in mine else r for r in requests]}


def _retarget_single(body: dict[str, Any], model: str, upstream_model: str) -> dict[str, Any] | None:
    """embedContent may name the model in its body too (EmbedContentRequest.model): the
    client's name becomes the route's upstream model, as in a batch."""
    if body.get("model") not in (f"models/{model}", model):
        return None
    return {**body, "model": f"models/{upstream_model}"}


GEMINI = GeminiDialect()
GENERATE = Endpoint("generateContent", GEMINI, model_in_path=True, can_stream=False)
STREAM_GENERATE = Endpoint("streamGenerateContent", GEMINI, model_in_path=True, always_stream=True)
COUNT_TOKENS = Endpoint("countTokens", GEMINI, model_in_path=True, can_stream=False, generates=False, free=True)
EMBED = Endpoint(
    "embedContent", GEMINI, model_in_path=True, can_stream=False, generates=False, required=("content",),
    retarget=_retarget_single,
)
BATCH_EMBED = Endpoint(
    "batchEmbedContents", GEMINI, model_in_path=True, can_stream=False, generates=False, required=("requests",),
    retarget=_retarget_batch,
)
