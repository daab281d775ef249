"""Usage meters: read a provider's own token counts off the bytes the tee forwards.

A meter is fed the very bytes objects the client gets (`feed`) or the whole body of a
non-streamed answer (`feed_body`). It decodes JSON only for events that can carry
usage. Provider numbers are kept as they are (explicit 0 stays 0); negative or absurd
values are clamped and flagged; usage repeated in several events counts once.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, NamedTuple, Protocol

import orjson

from .estimate import DeliveryEstimate, estimate_tokens_from_bytes
from .sse import DEFAULT_MAX_EVENT_SIZE, SSEEventTooLarge, SSESplitter, event_data


class Usage(NamedTuple):
    """Immutable; a NamedTuple because one is built per request (a third of the cost
    of a frozen dataclass)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0            # cache reads (included in prompt_tokens for OpenAI)
    cache_creation_tokens: int = 0    # Anthropic cache writes
    reasoning_tokens: int = 0
    flagged: bool = False             # a provider number was negative/absurd and was clamped


class Meter(Protocol):
    """Fed by the tee: `feed` per chunk (stream or body), or `feed_body` once; `finish`
    at upstream EOF. `usage()` may be partial until `complete()` (e.g. Anthropic after
    `message_start` only); `proxy.metering.settle` turns the pair into a record."""

    def feed(self, chunk: bytes) -> None: ...
    def frames_sse(self) -> bool: ...             # reads SSE events (so `feed_events` serves)
    def feed_events(self, events: list[bytes] | None, data: bytes) -> None: ...
    def feed_body(self, body: bytes) -> None: ...
    def usage(self) -> Usage | None: ...          # provider usage, None if never seen
    def delivered_tokens(self) -> int: ...        # estimate of output delivered so far
    def output_estimate(self) -> int: ...         # the same from the bytes alone (provider numbers distrusted)
    def finish(self) -> None: ...                 # end of the upstream body: parse what is left
    def complete(self) -> bool: ...               # the provider's final usage has been seen
    # The stream's final event ([DONE], response.completed, message_stop, Gemini's chunk
    # with finishReason) has been fed: once it is sent, the answer was delivered whole.
    final: bool


DEFAULT_MAX_TOKENS_BOUND = 10_000_000


def clamp_count(value: object, bound: int) -> tuple[int, bool]:
    """One provider number → (count, flagged). Missing (None) is 0 and not flagged.

    An explicit 0 stays 0. Negative, non-numeric or non-integral values and values
    above `bound` are clamped into [0, bound] and flagged: a negative count must never
    become a credit, an absurd one never a bill.
    """
    if type(value) is int and 0 <= value <= bound:
        return value, False             # the usual case, first
    if value is None:
        return 0, False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0, True
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return 0, True
        flagged = not value.is_integer()
        value = int(value)
    else:
        flagged = False
    if value < 0:
        return 0, True
    if value > bound:
        return bound, True
    return value, flagged


def build_usage(
    *,
    prompt: object = None,
    completion: object = None,
    cached: object = None,
    cache_creation: object = None,
    reasoning: object = None,
    bound: int = DEFAULT_MAX_TOKENS_BOUND,
    flagged: bool = False,
) -> Usage:
    """A sanitised Usage from raw provider values (see clamp_count).

    The parts may not exceed their whole: cached_tokens and cache_creation_tokens are
    parts of prompt_tokens, reasoning_tokens a part of completion_tokens; a provider
    saying otherwise is clamped and flagged so cost = (prompt - cached) * price can
    never turn negative.
    """
    if (
        # The usual answer, taken as is: plain counts in range, parts within their whole.
        type(prompt) is int and type(completion) is int and 0 <= prompt <= bound and 0 <= completion <= bound
        and (cached is None or (type(cached) is int and 0 <= cached <= prompt))
        and cache_creation is None
        and (reasoning is None or (type(reasoning) is int and 0 <= reasoning <= completion))
    ):
        return Usage(prompt, completion, cached or 0, 0, reasoning or 0, flagged)
    p, f1 = clamp_count(prompt, bound)
    c, f2 = clamp_count(completion, bound)
    ca, f3 = clamp_count(cached, bound)
    cc, f4 = clamp_count(cache_creation, bound)
    r, f5 = clamp_count(reasoning, bound)
    flagged = flagged or f1 or f2 or f3 or f4 or f5
    if ca + cc > p:
        ca, cc, flagged = min(ca, p), min(cc, p - min(ca, p)), True
    if r > c:
        r, flagged = c, True
    return Usage(p, c, ca, cc, r, flagged)


DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024
_BODY_TAIL = 64 * 1024

# A "usage" key whose value is an object (not the `"usage":null` OpenAI puts on every
# chunk once include_usage is on). Inside JSON strings quotes are escaped, so this byte
# pattern only occurs as a real key; it is a filter, the decoded JSON decides.
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def load_json(data: bytes | bytearray | None) -> object:
    """orjson.loads, or None for missing/invalid JSON (a bad chunk never breaks a stream)."""
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def load_event_json(event: bytes) -> object:
    return load_json(event_data(event))


class MeterBase:
    """What all meters share: framing, the body buffer, the sanity bound, the estimate.

    Stream meters split SSE and hand each complete event to `_on_event`; body meters
    accumulate chunks and parse once in `finish()` (or get the whole body through
    `feed_body`). `feed` never raises: an oversized event makes the meter fall back to
    estimating from raw byte counts, because metering must never break the stream.
    """

    ENVELOPE_CAP: ClassVar[int] = 240   # see estimate.DeliveryEstimate
    ENVELOPE_SLACK: ClassVar[int] = 0

    def __init__(
        self,
        *,
        stream: bool,
        max_tokens_bound: int = DEFAULT_MAX_TOKENS_BOUND,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        self._bound = max_tokens_bound
        self._splitter = SSESplitter(max_event_size) if stream else None
        self._stream = stream
        self._body = bytearray()
        self._max_body = max_body_size
        self._body_truncated = False       # only the tail of an oversized body is kept
        self._raw_bytes = 0                # bytes not framed (body, or after giving up on SSE)
        self._delivery = DeliveryEstimate(self.ENVELOPE_CAP, self.ENVELOPE_SLACK)
        self._usage: Usage | None = None
        self._complete = False
        self.final = False

    # -- Meter interface -------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if self._splitter is None:
            self._raw_bytes += len(chunk)
            if self._stream:
                return                     # framing abandoned: count bytes only
            self._buffer_body(chunk)
            return
        try:
            events = self._splitter.feed(chunk)
        except SSEEventTooLarge:
            self._raw_bytes += len(self._splitter.flush())
            self._splitter = None
            return
        for event in events:
            self._on_event(event)

    def frames_sse(self) -> bool:
        return self._splitter is not None

    def feed_events(self, events: list[bytes] | None, data: bytes) -> None:
        """Like `feed(data)` for a caller that split `data` into SSE events already (the
        stream relay: one split serves both). None: the caller passes bytes through
        unsplit (an oversized event), so they are counted raw from here on."""
        if events is None or self._splitter is None:
            self._splitter = None
            self._raw_bytes += len(data)
            return
        for event in events:
            self._on_event(event)

    def feed_body(self, body: bytes | bytearray) -> None:
        self._raw_bytes += len(body)
        self._parse_body(body)

    def _parse_body(self, body: bytes | bytearray) -> None:
        obj = self._body_json(body)
        if isinstance(obj, dict):
            usage = self._body_usage(obj)
            if usage is not None:
                self._set_usage(usage, complete=True)

    def finish(self) -> None:
        if self._splitter is not None:
            rest = self._splitter.flush()
            if rest.strip():
                self._on_event(rest)       # last event without its blank line
        elif not self._stream and self._body:
            self._parse_body(self._body)
            self._body = bytearray()

    def usage(self) -> Usage | None:
        return self._usage

    def complete(self) -> bool:
        return self._complete

    def delivered_tokens(self) -> int:
        if not self._stream and self._complete and self._usage is not None:
            return self._usage.completion_tokens   # the whole body went out
        return self.output_estimate()

    def output_estimate(self) -> int:
        return self._delivery.tokens() + estimate_tokens_from_bytes(self._raw_bytes)

    # -- for subclasses --------------------------------------------------------------
    # Hooks, not placeholders: a meter for a route that never streams (embeddings)
    # has no events, so these are not abstract; reaching one there is a bug.
    def _on_event(self, event: bytes) -> None:
        """One complete SSE event of this dialect's stream."""
        raise NotImplementedError(f"{type(self).__name__} does not meter streams")

    def _body_usage(self, obj: dict[str, Any]) -> Usage | None:
        """The usage in a decoded non-streamed answer."""
        raise NotImplementedError(f"{type(self).__name__} does not meter bodies")

    def _body_json(self, body: bytes | bytearray) -> object:
        return None if self._body_truncated else load_json(body)

    def _set_usage(self, usage: Usage, complete: bool) -> None:
        # Last complete usage wins: a repeated usage object replaces, never adds.
        self._usage = usage
        self._complete = complete

    def _buffer_body(self, chunk: bytes) -> None:
        self._body += chunk
        if len(self._body) > self._max_body:
            del self._body[:-_BODY_TAIL]
            self._body_truncated = True
