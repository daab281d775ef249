"""Anthropic Messages meter.

Mapping. Anthropic's `input_tokens` excludes cache traffic, so

    prompt_tokens         = input_tokens + cache_read_input_tokens + cache_creation_input_tokens
    cached_tokens         = cache_read_input_tokens
    cache_creation_tokens = cache_creation_input_tokens
    completion_tokens     = output_tokens

so that prompt_tokens means "all input tokens" on every provider, and the cache parts
are broken out for pricing (reads are cheaper, writes dearer than plain input).

Stream: `message_start` carries message.usage (input side, output_tokens of 1 or so);
`message_delta` carries usage that is CUMULATIVE, so each field takes its last value,
never a sum. Usage is complete once a `message_delta` arrived. Non-stream: the body's
`usage`. (count_tokens is free and metered by `proxy.metering.FreeMeter`.)
"""

from __future__ import annotations

from typing import Any

from .base import USAGE_OBJECT, MeterBase, Usage, build_usage, clamp_count, load_event_json

_FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")


class AnthropicMeter(MeterBase):
    ENVELOPE_CAP = 110

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._raw: dict[str, object] = {}   # last value seen for each usage field

    def _on_event(self, event: bytes) -> None:
        # The event line (or the data's leading "type") names deltas within 64 bytes.
        if event.find(b"content_block_delta", 0, 64) != -1:
            self._delivery.add(len(event))
            return
        if event.find(b"message_stop", 0, 64) != -1:
            self.final = True
            return
        if USAGE_OBJECT.search(event) is None:
            return
        obj = load_event_json(event)   # orjson accepts padding and the CR-free data value
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            usage = obj.get("usage")
        else:
            return
        if isinstance(usage, dict):
            self._merge(usage)
            self._set_usage(self._compose(), complete=self._complete or kind == "message_delta")

    def _body_usage(self, obj: dict[str, Any]) -> Usage | None:
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return None
        self._raw.clear()
        self._merge(usage)
        return self._compose()

    def _merge(self, usage: dict[str, Any]) -> None:
        for field in _FIELDS:
            value = usage.get(field)
            if value is not None:        # message_delta may send null for unchanged fields
                self._raw[field] = value

    def _compose(self) -> Usage:
        raw, bound = self._raw, self._bound
        fresh, f1 = clamp_count(raw.get("input_tokens"), bound)
        read, f2 = clamp_count(raw.get("cache_read_input_tokens"), bound)
        created, f3 = clamp_count(raw.get("cache_creation_input_tokens"), bound)
        return build_usage(
            prompt=fresh + read + created,
            completion=raw.get("output_tokens"),
            cached=read,
            cache_creation=created,
            bound=bound,
            flagged=f1 or f2 or f3,
        )
