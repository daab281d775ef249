"""Token estimates for when the provider's own usage is missing (aborted or cut streams).

How the estimate is made
------------------------
* Text: about 4 bytes per token (`estimate_tokens_from_bytes`), rounded up, so any
  non-empty text is at least 1 token.
* Prompt: the request body's byte length / 4. The JSON syntax and field names are
  counted as text, so this leans high, which is the safe side for a reservation.
* Delivered output (`DeliveryEstimate`): each meter reports only the *content-bearing*
  events it forwarded (OpenAI chat/completions chunks with choices, Responses `*.delta`
  events, Anthropic `content_block_delta`, Gemini chunks with `parts`, elements of the
  Gemini JSON-array stream) with their raw size; nothing is decoded. Every such event
  repeats a JSON envelope (ids, model, indices) around a little text. The envelope is
  taken as the smallest content event seen (capped per dialect, so that a stream of one
  or two large events still counts its text) plus a per-dialect slack, and

      delivered = max(content events, ceil(max(0, sum(sizes) - events * envelope) / 4))

  The first term holds because every content event carries at least one token, so the
  estimate is never 0 once content went out. For OpenAI it is the main term: OpenAI
  streams about one token per chunk and pads chunks with a random-length
  `obfuscation` field, so sizes say little; the 40-byte slack keeps that noise out while
  chunks with real bulk (Azure batches several tokens per chunk) still count by size.
  Anthropic and Gemini deltas carry several tokens each, so their size term dominates.
  On the test vectors the estimate is 0.5x-2.6x of the provider's count for OpenAI and
  Anthropic and up to 4x for the short Gemini ones (their envelope grows as
  usageMetadata fills in, and thought signatures count as text). Errors lean high: the
  record is flagged `estimated` anyway, and over-counting is the safe side of I3.
"""

from __future__ import annotations

BYTES_PER_TOKEN = 4


def estimate_tokens_from_bytes(n: int) -> int:
    """≈ n / 4 tokens, rounded up: at least 1 for any n > 0, 0 for n <= 0."""
    return (n + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN if n > 0 else 0


def estimate_prompt_tokens(body: bytes) -> int:
    """Prompt tokens of a request body, from its size alone (leans high)."""
    return estimate_tokens_from_bytes(len(body))


class DeliveryEstimate:
    """Running estimate of output tokens delivered, from content-event sizes only."""

    __slots__ = ("_events", "_bytes", "_min", "_slack")

    def __init__(self, envelope_cap: int, slack: int = 0) -> None:
        self._events = 0
        self._bytes = 0
        self._min = envelope_cap  # smallest content event seen, never above the cap
        self._slack = slack

    def add(self, event_size: int) -> None:
        self._events += 1
        self._bytes += event_size
        if event_size < self._min:
            self._min = event_size

    @property
    def events(self) -> int:
        return self._events

    def tokens(self, partial: int = 0) -> int:
        """Estimate so far; `partial` is the size of a content event still arriving."""
        envelope = self._min + self._slack
        events, text = self._events, self._bytes - self._events * envelope
        if partial > 0:
            events += 1
            text += max(0, partial - envelope)
        return max(events, estimate_tokens_from_bytes(text)) if events else 0
