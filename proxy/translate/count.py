"""Token counting across dialects (pure: no I/O; TRANSLATION.md §5.1).

Two dialects have a counting call: Anthropic `POST /v1/messages/count_tokens` and Gemini
`models/{m}:countTokens`. Each `Counter` is one of them: its body to and from the hub's
`Request`, and its answer (`{"input_tokens": N}`, `{"totalTokens": N}`). A count is then
translated like a generate call: the caller's body → hub → the upstream's counter, and
the upstream's number back in the caller's shape.

OpenAI's protocol has no counter a chat-compatible upstream can be relied on for, so
there the gateway estimates (`estimate_tokens`): the prompt rendered as the chat body
that upstream would receive, through the same estimator the limits use for every
prompt (`proxy.metering.estimate`), images set aside and counted at a flat rate (their
base64 size says nothing of their tokens). The answer says it is an estimate in the
`x-llm-proxy-estimated: true` header: Claude Code counts constantly, and an estimate
serves it better than a refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.metering.estimate import estimate_prompt_tokens
from proxy.translate import anthropic, chat, gemini
from proxy.translate.common import UpstreamOptions
from proxy.translate.hub import Image, Part, Request, Text, ToolResult, Untranslatable

# The answer's header when the gateway estimated the count itself.
ESTIMATED_HEADER = ("x-llm-proxy-estimated", "true")
# What one image counts in an estimate: about the most Anthropic bills for one (~1.15
# megapixels / 750), above OpenAI's high-detail and Gemini's per-tile counts: the high side.
IMAGE_TOKENS = 1600


@dataclass(frozen=True)
class Counter:
    """One dialect's token-counting call."""

    endpoint: str                                                    # its endpoint name (URL, meter, records)
    decode_request: Callable[[dict[str, Any]], Request]              # BadInput when malformed
    encode_request: Callable[[Request, UpstreamOptions], dict[str, Any]]
    decode_response: Callable[[dict[str, Any]], int | None]          # None: not a count
    encode_response: Callable[[int], dict[str, Any]]
    # The client's own body for the upstream's model, where the body names its model in a
    # place the byte-exact path does not rewrite (Gemini's wrapped form); None: as it is.
    readdress: Callable[[dict[str, Any], str], dict[str, Any] | None] = lambda body, model: None


ANTHROPIC = Counter("count_tokens", anthropic.decode_count_request, anthropic.encode_count_request,
                    anthropic.decode_count_response, anthropic.encode_count_response)
GEMINI = Counter("countTokens", gemini.decode_count_request, gemini.encode_count_request,
                 gemini.decode_count_response, gemini.encode_count_response, gemini.readdress_count_request)

# The counter a client endpoint is, and the counter each upstream protocol serves
# (openai: none, estimated).
CLIENT_COUNTERS: dict[str, Counter] = {c.endpoint: c for c in (ANTHROPIC, GEMINI)}
UPSTREAM_COUNTERS: dict[str, Counter] = {"anthropic": ANTHROPIC, "gemini": GEMINI}


def estimate_tokens(req: Request | None, raw: dict[str, Any]) -> int:
    """The prompt tokens of `req`, decoded from the client's body `raw`, estimated; of
    `raw` itself when the hub cannot hold all of it (req None, or chat cannot say it)."""
    if req is None:
        return estimate_prompt_tokens(orjson.dumps(raw))
    images = _set_images_aside(req)
    try:
        rendered = orjson.dumps(chat.encode_request(req, UpstreamOptions(req.model or "model")))
    except Untranslatable:
        return estimate_prompt_tokens(orjson.dumps(raw))
    return estimate_prompt_tokens(rendered) + images * IMAGE_TOKENS


def _set_images_aside(req: Request) -> int:
    """Take the images out of `req`; how many there were."""
    n = 0
    for msg in req.messages:
        for part in msg.parts:
            if isinstance(part, ToolResult):
                kept: list[Text | Image] = [c for c in part.content if not isinstance(c, Image)]
                n += len(part.content) - len(kept)
                part.content = kept
        kept_parts: list[Part] = [p for p in msg.parts if not isinstance(p, Image)]
        n += len(msg.parts) - len(kept_parts)
        msg.parts = kept_parts
    return n
