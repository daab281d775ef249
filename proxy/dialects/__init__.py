"""API dialects, one module each; they know their wire format and nothing of storage."""

from urllib.parse import unquote

from proxy.dialects.anthropic import ANTHROPIC, COUNT_TOKENS, MESSAGES
from proxy.dialects.azure import AzureOpenAIDialect
from proxy.dialects.base import Dialect, Endpoint, ModelInfo
from proxy.dialects.gemini import BATCH_EMBED, EMBED, GEMINI, GENERATE, STREAM_GENERATE
from proxy.dialects.gemini import COUNT_TOKENS as GEMINI_COUNT_TOKENS
from proxy.dialects.openai import CHAT, COMPLETIONS, EMBEDDINGS, OPENAI, RESPONSES
from proxy.errors import NotFound

BY_PROTOCOL: dict[str, Dialect] = {d.name: d for d in (OPENAI, ANTHROPIC, GEMINI)}


def upstream_dialect(protocol: str, kind: str | None, api_version: str | None) -> Dialect:
    """How to call an upstream: its protocol's dialect, or a provider kind's variant of it
    (config.KINDS: `azure`, Azure OpenAI's deployment URLs and api-key header)."""
    if kind == "azure":
        return AzureOpenAIDialect(api_version or "")
    return BY_PROTOCOL[protocol]


# POST path -> the model-calling endpoint it serves (versioned and un-versioned).
MODEL_PATHS: dict[str, Endpoint] = {
    prefix + path: endpoint
    for prefix in ("/v1", "")
    for path, endpoint in (
        ("/chat/completions", CHAT),
        ("/completions", COMPLETIONS),
        ("/embeddings", EMBEDDINGS),
        ("/responses", RESPONSES),
        ("/messages", MESSAGES),
        ("/messages/count_tokens", COUNT_TOKENS),
    )
}
# Gemini puts the model and method in the path: {prefix}{model}:{method}.
GEMINI_MODEL_PREFIXES = ("/v1beta/models/", "/v1/models/")
GEMINI_METHODS: dict[str, Endpoint] = {
    "generateContent": GENERATE,
    "streamGenerateContent": STREAM_GENERATE,
    "countTokens": GEMINI_COUNT_TOKENS,
    "embedContent": EMBED,
    "batchEmbedContents": BATCH_EMBED,
}


def model_endpoint(path: str) -> tuple[Endpoint, str | None] | None:
    """The endpoint a POST to `path` calls (and, for Gemini, the model the path names);
    None when `path` is no model route. NotFound for an unknown Gemini method."""
    endpoint = MODEL_PATHS.get(path)
    if endpoint is not None:
        return endpoint, None
    if path.startswith(GEMINI_MODEL_PREFIXES):
        tail = unquote(path.split("/models/", 1)[1])
        model, _, method = tail.rpartition(":")
        found = GEMINI_METHODS.get(method)
        if found is None or not model:
            raise NotFound(f"Unknown Gemini method '{method[:64]}'.")
        return found, model
    return None

__all__ = [
    "ANTHROPIC", "BY_PROTOCOL", "Dialect", "Endpoint", "GEMINI", "GEMINI_METHODS", "GEMINI_MODEL_PREFIXES",
    "MODEL_PATHS", "ModelInfo", "OPENAI", "model_endpoint", "upstream_dialect",
]
