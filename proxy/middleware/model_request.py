"""The model request step (pipeline.Before): the body parsed once, what the call asks for, and its plan.

The body is parsed once (orjson) to learn the model, the stream flag and the output cap;
it is re-encoded later only if something must change (proxy/forward.py). Refused here,
before any upstream is asked: compressed bodies, invalid JSON, fields that would choose
hosts or credentials elsewhere, a body that belongs to another API, a model the key may
not use, an unknown model (the router's plan: routes of the caller's protocol, or of one its endpoint translates to).
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.config import Config
from proxy.dialects import Endpoint
from proxy.errors import InvalidRequest, ModelNotAllowed, UnsupportedMediaType, UnsupportedParameter
from proxy.metering.estimate import estimate_prompt_tokens
from proxy.pipeline import Call
from proxy.routing import Router
from proxy.translate import targets
from proxy.upstream import UpstreamPool

# Body fields that would let a caller choose hosts or credentials in other gateways
# (LiteLLM CVE-2024-6587). We never honour them, and refuse them so nobody thinks we do.
FORBIDDEN_FIELDS = frozenset(
    {"api_base", "base_url", "api_key", "user_config", "extra_headers", "custom_llm_provider", "api_version"}
)
# Where a body holds the caller's own content, whose keys are data, not settings: message
# text and history (tool call inputs included), prompts, tool and output schemas (a tool
# may well take an `api_key` parameter). Forbidden fields are looked for everywhere else,
# at any depth (`extra_body`, `litellm_params`, `metadata`, ...).
_CONTENT_FIELDS = frozenset({
    "messages", "input", "contents", "system", "systemInstruction", "instructions", "prompt", "suffix",
    "tools", "functions", "tool_choice", "toolConfig", "response_format", "text",
    "responseSchema", "responseJsonSchema", "response_schema", "json_schema", "parameters", "input_schema", "schema",
})
# The output caps the bodies name (for output_bound; the dialects check them).
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class ModelRequest:
    def __init__(self, config: Config, router: Router, upstreams: UpstreamPool) -> None:
        self.use(config, router, upstreams)

    def use(self, config: Config, router: Router, upstreams: UpstreamPool) -> None:
        """Swap in a (re)loaded configuration: calls that read the router already keep the
        pool they read with it, so each runs wholly on one configuration."""
        self._router = router
        self._upstreams = upstreams
        self._default_max_tokens = config.limits.default_max_tokens

    def __call__(self, call: Call) -> None:
        endpoint = call.endpoint
        assert endpoint is not None   # a model route's stage
        request = call.ex.request
        encoding = request.headers.get("content-encoding")
        if encoding is not None and encoding.lower() != "identity":
            # Compressed request bodies are a decompression-bomb surface; no client needs them.
            raise UnsupportedMediaType("Compressed request bodies are not accepted.", code="unsupported_content_encoding")
        body = parse_body(request.body)
        if endpoint.required:
            check_fields(body, endpoint)
        model = model_of(body, endpoint, call.path_model)
        stream = stream_flag(body, endpoint)
        key = call.key
        if key is not None and key.models and model not in key.models:
            raise ModelNotAllowed(f"This key may not use the model '{model[:64]}'.", param="model")
        call.plan = self._router.plan(model, endpoint.dialect.name, targets(endpoint.name))
        call.upstreams = self._upstreams   # read with the plan: one configuration per call
        cap = endpoint.dialect.max_output_tokens(body)
        call.body, call.model, call.stream = body, model, stream
        # A free call (a token count) reserves nothing and records no tokens; one that
        # generates nothing (embeddings, counts) reserves no output cap.
        call.prompt_estimate = 0 if endpoint.free else estimate_prompt_tokens(request.body)
        call.max_output = 0 if not endpoint.generates else self._default_max_tokens if cap is None else cap
        call.output_bound = output_bound(body)


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    name = forbidden_field(body)
    if name is not None:
        raise UnsupportedParameter(f"The parameter '{name}' is not accepted by this gateway.", param=name)
    return body


def forbidden_field(body: dict[str, Any]) -> str | None:
    """The first forbidden field (dotted path) in the body's objects, outside the caller's
    content; None when there is none. Iterative: a deeply nested body cannot exhaust the stack."""
    bad = FORBIDDEN_FIELDS.intersection(body)
    if bad:
        return sorted(bad)[0]  # the usual place: the top level
    stack: list[tuple[str, Any]] = []
    for name, value in body.items():  # (a loop, not a list per request: most bodies nest nothing else)
        if (type(value) is dict or type(value) is list) and name not in _CONTENT_FIELDS:
            stack.append((name, value))
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            bad = FORBIDDEN_FIELDS.intersection(value)
            if bad:
                return f"{path}.{sorted(bad)[0]}"[:128]
            stack.extend((f"{path}.{k}", v) for k, v in value.items() if k not in _CONTENT_FIELDS)
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (dict, list)))
    return None


def check_fields(body: dict[str, Any], endpoint: Endpoint) -> None:
    if any(name in body for name in endpoint.other_shapes):
        return   # another API's shape: the translator checks it
    for name in endpoint.required:
        if name not in body:
            for field_name, route in endpoint.misdirected:
                if field_name in body:
                    raise InvalidRequest(
                        f"'{field_name}' belongs to another API; this endpoint needs '{name}'. Use {route}.",
                        param=field_name,
                    )
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)


def model_of(body: dict[str, Any], endpoint: Endpoint, path_model: str | None) -> str:
    if endpoint.model_in_path:
        model = (path_model or "").removeprefix("models/")
    else:
        named = body.get("model")
        if not isinstance(named, str) or not named:
            raise InvalidRequest("The request needs a 'model' string.", param="model")
        model = named
    if not model or len(model) > 256:
        raise InvalidRequest("The model name is missing or too long.", param="model")
    return model


def stream_flag(body: dict[str, Any], endpoint: Endpoint) -> bool:
    if endpoint.always_stream:
        return True
    value = body.get("stream", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    if value and not endpoint.can_stream:
        raise InvalidRequest("This endpoint does not stream.", param="stream")
    return value


def output_bound(body: dict[str, Any]) -> int | None:
    """The most output tokens the request allows when it says (max_tokens and its
    spellings, Gemini's maxOutputTokens, times the choices asked for), else None."""
    limit: int | None = None
    for name in _MAX_TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            limit = value
            break
    config = body.get("generationConfig")
    choices = body.get("n")
    if isinstance(config, dict):
        if limit is None and isinstance(config.get("maxOutputTokens"), int):
            limit = config["maxOutputTokens"]
        choices = config.get("candidateCount", choices)
    if limit is None:
        return None
    if not isinstance(choices, int) or isinstance(choices, bool) or choices < 1:
        choices = 1
    return limit * min(choices, 128)
