"""Usage meters: read a provider's own token counts off the bytes the tee forwards.

A meter is fed the very bytes objects the client gets (`feed`) or the whole body of a
non-streamed answer (`feed_body`). It decodes JSON only for events that can carry
usage. Provider numbers are kept as they are (explicit 0 stays 0); negative or absurd
values are clamped and flagged; usage repeated in several events counts once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0            # cache reads (included in prompt_tokens for OpenAI)
    cache_creation_tokens: int = 0    # Anthropic cache writes
    reasoning_tokens: int = 0
    flagged: bool = False             # a provider number was negative/absurd and was clamped


class Meter(Protocol):
    def feed(self, chunk: bytes) -> None: ...
    def feed_body(self, body: bytes) -> None: ...
    def usage(self) -> Usage | None: ...          # provider usage, None if never seen
    def delivered_tokens(self) -> int: ...        # estimate of output delivered so far
