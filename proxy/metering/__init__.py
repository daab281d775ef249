"""Usage metering: provider-exact token counts read off the bytes the tee forwards.

    meter = meter_for("chat.completions", stream=True)
    for chunk in upstream: send(chunk); meter.feed(chunk)   # or meter.feed_body(body)
    meter.finish()                                          # at upstream EOF
    usage, estimated = settle(meter, estimate_prompt_tokens(request_body))

Endpoint names for `meter_for`: "chat.completions", "completions", "embeddings",
"responses", "messages", "count_tokens", "generateContent", "streamGenerateContent".
streamGenerateContent always streams; `sse=True` (the `alt=sse` form) selects the SSE
meter, `sse=False` the JSON-array stream meter. embeddings never stream and
count_tokens is free (its response is a count, not a charge): both ignore `stream`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from .anthropic import AnthropicMeter
from .base import DEFAULT_MAX_TOKENS_BOUND, Meter, MeterBase, Usage
from .estimate import estimate_prompt_tokens, estimate_tokens_from_bytes
from .gemini import GeminiArrayStreamMeter, GeminiMeter
from .openai import (
    OpenAIChatMeter,
    OpenAIEmbeddingsMeter,
    OpenAIResponsesMeter,
    UsageChunkDropper,
    ensure_include_usage,
)
from .sse import SSEEventTooLarge, SSESplitter, event_data, event_name

__all__ = [
    "AnthropicMeter", "FreeMeter", "GeminiArrayStreamMeter", "GeminiMeter", "Meter",
    "MeterBase", "OpenAIChatMeter", "OpenAIEmbeddingsMeter", "OpenAIResponsesMeter",
    "SSEEventTooLarge", "SSESplitter", "Usage", "UsageChunkDropper", "ensure_include_usage",
    "estimate_prompt_tokens", "estimate_tokens_from_bytes", "event_data", "event_name",
    "meter_for", "settle",
]

_METERS: MappingProxyType[str, type[MeterBase]] = MappingProxyType({
    "chat.completions": OpenAIChatMeter,
    "completions": OpenAIChatMeter,
    "responses": OpenAIResponsesMeter,
    "messages": AnthropicMeter,
    "generateContent": GeminiMeter,
})


class FreeMeter:
    """count_tokens: no charge, so the usage is an explicit zero, known from the start."""

    final = False  # never streams

    def feed(self, chunk: bytes) -> None:
        pass

    def frames_sse(self) -> bool:
        return False

    def feed_events(self, events: list[bytes] | None, data: bytes) -> None:
        pass

    def feed_body(self, body: bytes) -> None:
        pass

    def finish(self) -> None:
        pass

    def usage(self) -> Usage | None:
        return Usage()

    def complete(self) -> bool:
        return True

    def delivered_tokens(self) -> int:
        return 0


def meter_for(
    endpoint: str,
    stream: bool,
    *,
    sse: bool = True,
    max_tokens_bound: int = DEFAULT_MAX_TOKENS_BOUND,
    **limits: Any,
) -> Meter:
    """A fresh meter for one upstream request. `limits`: max_event_size, max_body_size."""
    if endpoint == "count_tokens":
        return FreeMeter()
    if endpoint == "embeddings":
        return OpenAIEmbeddingsMeter(max_tokens_bound=max_tokens_bound, **limits)
    if endpoint == "streamGenerateContent":
        if sse:
            return GeminiMeter(stream=True, max_tokens_bound=max_tokens_bound, **limits)
        return GeminiArrayStreamMeter(max_tokens_bound=max_tokens_bound, **limits)
    try:
        cls = _METERS[endpoint]
    except KeyError:
        raise ValueError(f"no meter for endpoint {endpoint!r}") from None
    return cls(stream=stream, max_tokens_bound=max_tokens_bound, **limits)


def settle(meter: Meter, prompt_estimate: int) -> tuple[Usage, bool]:
    """The usage to record and whether it is estimated (RELIABILITY I3/I4).

    Complete, unflagged provider usage is taken as is. Otherwise the record is
    estimated: the provider's prompt count where it was seen (else `prompt_estimate`),
    and at least the delivered-output estimate, so an aborted stream that delivered
    content is never charged 0.
    """
    usage = meter.usage()
    if usage is not None and meter.complete() and not usage.flagged:
        return usage, False
    delivered = meter.delivered_tokens()
    if usage is None:
        return Usage(prompt_tokens=prompt_estimate, completion_tokens=delivered), True
    return usage._replace(completion_tokens=max(usage.completion_tokens, delivered)), True
