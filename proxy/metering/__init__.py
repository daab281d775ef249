"""Usage metering: provider-exact token counts read off the bytes the tee forwards.

    meter = meter_for("chat.completions", stream=True)
    for chunk in upstream: send(chunk); meter.feed(chunk)   # or meter.feed_body(body)
    meter.finish()                                          # at upstream EOF
    usage, estimated = settle(meter, estimate_prompt_tokens(request_body))

Endpoint names for `meter_for`: "chat.completions", "completions", "embeddings",
"responses", "messages", "count_tokens", "generateContent", "streamGenerateContent",
"countTokens", "embedContent", "batchEmbedContents".
streamGenerateContent always streams; `sse=True` (the `alt=sse` form) selects the SSE
meter, `sse=False` the JSON-array stream meter. Embeddings (both APIs) never stream and
have no output tokens; counting tokens (Anthropic count_tokens, Gemini countTokens) is
free (its response is a count, not a charge): both ignore `stream`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from .anthropic import AnthropicMeter
from .base import DEFAULT_MAX_TOKENS_BOUND, Meter, MeterBase, Usage
from .estimate import estimate_prompt_tokens, estimate_tokens_from_bytes
from .gemini import GeminiArrayStreamMeter, GeminiEmbeddingsMeter, GeminiMeter
from .openai import (
    OpenAIChatMeter,
    OpenAIEmbeddingsMeter,
    OpenAIResponsesMeter,
    UsageChunkDropper,
    ensure_include_usage,
)
from .sse import SSEEventTooLarge, SSESplitter, event_data, event_name

__all__ = [
    "AnthropicMeter", "FreeMeter", "GeminiArrayStreamMeter", "GeminiEmbeddingsMeter", "GeminiMeter", "Meter",
    "MeterBase", "OpenAIChatMeter", "OpenAIEmbeddingsMeter", "OpenAIResponsesMeter",
    "SSEEventTooLarge", "SSESplitter", "Usage", "UsageChunkDropper", "ensure_include_usage",
    "estimate_prompt_tokens", "estimate_tokens_from_bytes", "event_data", "event_name",
    "implausible", "meter_for", "settle", "settle_usage",
]

_METERS: MappingProxyType[str, type[MeterBase]] = MappingProxyType({
    "chat.completions": OpenAIChatMeter,
    "completions": OpenAIChatMeter,
    "responses": OpenAIResponsesMeter,
    "messages": AnthropicMeter,
    "generateContent": GeminiMeter,
})


# The token counters: Anthropic's and Gemini's (the free calls).
_FREE = frozenset({"count_tokens", "countTokens"})


class FreeMeter:
    """count_tokens / countTokens: no charge, so the usage is an explicit zero, known from the start."""

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

    def output_estimate(self) -> int:
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
    if endpoint in _FREE:
        return FreeMeter()
    if endpoint == "embeddings":
        return OpenAIEmbeddingsMeter(max_tokens_bound=max_tokens_bound, **limits)
    if endpoint in ("embedContent", "batchEmbedContents"):
        return GeminiEmbeddingsMeter(max_tokens_bound=max_tokens_bound, **limits)
    if endpoint == "streamGenerateContent":
        if sse:
            return GeminiMeter(stream=True, max_tokens_bound=max_tokens_bound, **limits)
        return GeminiArrayStreamMeter(max_tokens_bound=max_tokens_bound, **limits)
    try:
        cls = _METERS[endpoint]
    except KeyError:
        raise ValueError(f"no meter for endpoint {endpoint!r}") from None
    return cls(stream=stream, max_tokens_bound=max_tokens_bound, **limits)


# Output tokens a provider may count past max_tokens before its numbers are implausible.
_OUTPUT_SLACK = 16


def settle(meter: Meter, prompt_estimate: int) -> tuple[Usage, bool]:
    """settle_usage() without the request's output bound: (usage, estimated)."""
    usage, estimated, _ = settle_usage(meter, prompt_estimate)
    return usage, estimated


def settle_usage(meter: Meter, prompt_estimate: int, max_output: int | None = None) -> tuple[Usage, bool, str | None]:
    """The usage to record, whether it is estimated, and why the provider's numbers were
    not believed (None when they were, or when there were none) (RELIABILITY I3/I4).

    Complete, plausible provider usage is taken as is. Implausible numbers (negative,
    absurd, non-integral, parts larger than their whole, or more visible output than the
    request's `max_output` allows) are replaced by the estimate whole: the prompt estimate
    and the delivered-output estimate; the answer was delivered, so it is never $0, and
    never billed at an impossible count either. Missing or incomplete usage (an aborted
    stream) is estimated too: the provider's prompt count where it was seen (else
    `prompt_estimate`), and at least the delivered-output estimate.
    """
    usage = meter.usage()
    why = None if usage is None else implausible(usage, max_output)
    if usage is not None and why is None and meter.complete():
        return usage, False, None
    if why is not None:
        out = meter.output_estimate()
        return Usage(prompt_tokens=prompt_estimate, completion_tokens=out if max_output is None else min(out, max_output)), True, why
    delivered = meter.delivered_tokens()
    if usage is None:
        return Usage(prompt_tokens=prompt_estimate, completion_tokens=delivered), True, None
    return usage._replace(completion_tokens=max(usage.completion_tokens, delivered)), True, None


def implausible(usage: Usage, max_output: int | None) -> str | None:
    """Why `usage` cannot be what the request produced, or None."""
    if usage.flagged:
        return "negative, absurd or inconsistent token counts"
    # Reasoning tokens may sit outside the output limit (Gemini's thoughts); the visible
    # output never does (n choices: n times it, see the caller's max_output).
    if max_output is not None and usage.completion_tokens - usage.reasoning_tokens > max_output + _OUTPUT_SLACK:
        return f"{usage.completion_tokens - usage.reasoning_tokens} output tokens for at most {max_output}"
    return None
