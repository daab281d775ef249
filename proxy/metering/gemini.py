"""Gemini meters: generateContent bodies, streamGenerateContent as SSE (`alt=sse`, CRLF
framing) and as a progressively streamed JSON array (no `alt=sse`).

Mapping of `usageMetadata` (the last one wins; every chunk repeats it, cumulatively):
    prompt_tokens     = promptTokenCount + toolUsePromptTokenCount
                        (promptTokenCount already includes cachedContentTokenCount)
    completion_tokens = candidatesTokenCount + thoughtsTokenCount
    reasoning_tokens  = thoughtsTokenCount
    cached_tokens     = cachedContentTokenCount

Every SSE event carries usageMetadata, so decoding each would mean decoding the whole
stream. Instead the last usage-bearing event is only remembered (a reference, no copy)
and decoded when usage() is asked for.
"""

from __future__ import annotations

import re
from typing import Any

from .base import MeterBase, Usage, build_usage, clamp_count, load_event_json, load_json

_USAGE_META = re.compile(rb'"usageMetadata"\s*:\s*\{')
# Array form: the key, positioned so that the match ends on the object's "{".
_USAGE_KEY = re.compile(rb'"usageMetadata"\s*:\s*(?=\{)')
# JSON strings are skipped whole so braces inside them are not counted.
_BRACE_OR_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}]')
_KEY_SPAN = 64                 # bytes kept so a key can straddle two chunks
_MAX_USAGE_OBJECT = 64 * 1024  # a usageMetadata object is ~300 bytes; beyond this it is not one
_PARTIAL_ELEMENT = 8           # trailing bytes beyond this count as a (partial) delivered element


def gemini_usage(meta: dict[str, Any], bound: int) -> Usage:
    prompt, f1 = clamp_count(meta.get("promptTokenCount"), bound)
    tool_prompt, f2 = clamp_count(meta.get("toolUsePromptTokenCount"), bound)
    candidates, f3 = clamp_count(meta.get("candidatesTokenCount"), bound)
    thoughts, f4 = clamp_count(meta.get("thoughtsTokenCount"), bound)
    return build_usage(
        prompt=prompt + tool_prompt,
        completion=candidates + thoughts,
        cached=meta.get("cachedContentTokenCount"),
        reasoning=thoughts,
        bound=bound,
        flagged=f1 or f2 or f3 or f4,
    )


class GeminiMeter(MeterBase):
    """generateContent bodies and `alt=sse` streams."""

    ENVELOPE_CAP = 240

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last: bytes | None = None    # newest usage-bearing event, not yet decoded
        self._last_final = False

    def _on_event(self, event: bytes) -> None:
        if b'"parts"' in event:
            self._delivery.add(len(event))
        if b'"finishReason"' in event or b'"blockReason"' in event:
            self.final = True  # the last chunk
        if _USAGE_META.search(event) is not None:
            self._last = event
            # A chunk with finishReason (or a blocked prompt) is the last one.
            self._last_final = b'"finishReason"' in event or b'"blockReason"' in event

    def finish(self) -> None:
        # Decode the last whole event first: an unterminated tail that fails to parse
        # must not hide the usage that came before it.
        self._decode_last()
        super().finish()

    def usage(self) -> Usage | None:
        self._decode_last()
        return self._usage

    def complete(self) -> bool:
        self._decode_last()
        return self._complete

    def delivered_tokens(self) -> int:
        self._decode_last()
        return super().delivered_tokens()

    def _decode_last(self) -> None:
        if self._last is None:
            return
        obj = load_event_json(self._last)
        self._last = None
        if isinstance(obj, dict):
            usage = self._body_usage(obj)
            if usage is not None:
                self._set_usage(usage, complete=self._last_final)

    def _parse_body(self, body: bytes | bytearray) -> None:
        obj = self._body_json(body)
        if isinstance(obj, list):          # a whole streamGenerateContent array
            obj = next((o for o in reversed(obj) if isinstance(o, dict) and "usageMetadata" in o), None)
        if isinstance(obj, dict) and (usage := self._body_usage(obj)) is not None:
            self._set_usage(usage, complete=True)

    def _body_usage(self, obj: dict[str, Any]) -> Usage | None:
        meta = obj.get("usageMetadata")
        return gemini_usage(meta, self._bound) if isinstance(meta, dict) else None


def _object_end(buf: bytes | bytearray, start: int) -> int | None:
    """End offset of the JSON object opening at buf[start], or None if not complete yet."""
    depth = 0
    for m in _BRACE_OR_STRING.finditer(buf, start):
        token = m.group()
        if token == b"{":
            depth += 1
        elif token == b"}":
            depth -= 1
            if depth == 0:
                return m.end()
    return None


class GeminiEmbeddingsMeter(MeterBase):
    """embedContent / batchEmbedContents bodies: `usageMetadata.promptTokenCount` where the
    API reports it (else the record is estimated from the request), and no output tokens.
    The body is mostly floats: the usage object is read off the tail when it is there."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["stream"] = False
        super().__init__(**kwargs)

    def _body_json(self, body: bytes | bytearray) -> object:
        start = body.rfind(b'"usageMetadata"')
        brace = body.find(b"{", start) if start != -1 else -1
        end = _object_end(body, brace) if brace != -1 else None
        if end is not None:
            return {"usageMetadata": load_json(body[brace:end])}
        return super()._body_json(body)

    def _body_usage(self, obj: dict[str, Any]) -> Usage | None:
        meta = obj.get("usageMetadata")
        if not isinstance(meta, dict):
            return None
        prompt, flagged = clamp_count(meta.get("promptTokenCount"), self._bound)
        return build_usage(prompt=prompt, bound=self._bound, flagged=flagged)

    def output_estimate(self) -> int:
        return 0   # an embedding has no output tokens, whatever the size of its vectors


class GeminiArrayStreamMeter(GeminiMeter):
    """streamGenerateContent without `alt=sse`: `[{...}\\r\\n,{...}\\r\\n]`, streamed.

    No SSE framing and no element splitting: the meter looks for `"usageMetadata": {`
    in the bytes, keeps only a short tail between chunks (or an incomplete usage object),
    and decodes just that small object each time one completes. The usage is complete
    when the array's closing `]` arrived.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["stream"] = True
        super().__init__(**kwargs)
        self._splitter = None
        self._tail = bytearray()   # unscanned bytes; starts at stream offset _base
        self._base = 0
        self._fed = 0
        self._mark = 0             # stream offset just past the last usage object

    def feed(self, chunk: bytes) -> None:
        self._fed += len(chunk)
        if b'"finishReason"' in chunk or b'"blockReason"' in chunk:
            self.final = True  # the last element (a key split across two reads is missed: then "cut")
        tail = self._tail
        tail += chunk
        pos = 0
        while (m := _USAGE_KEY.search(tail, pos)) is not None:
            end = _object_end(tail, m.end())
            meta = load_json(tail[m.end():end]) if end is not None else None
            if end is not None and isinstance(meta, dict):
                self._set_usage(gemini_usage(meta, self._bound), complete=False)
                self._delivery.add(self._base + end - self._mark)   # one element
                self._mark = self._base + end
                pos = end
            elif len(tail) - m.start() > _MAX_USAGE_OBJECT:
                pos = m.end()          # not a real usage object: skip the key
            else:
                keep = m.start()       # incomplete: wait for more bytes
                break
        else:
            keep = max(pos, len(tail) - _KEY_SPAN)
        del tail[:keep]
        self._base += keep

    def finish(self) -> None:
        if self._usage is not None and bytes(self._tail).rstrip().endswith(b"]"):
            self._complete = True
        self._tail.clear()

    def delivered_tokens(self) -> int:
        partial = self._fed - self._mark
        return self._delivery.tokens(partial if partial > _PARTIAL_ELEMENT else 0)

    def output_estimate(self) -> int:
        return self.delivered_tokens()

    def usage(self) -> Usage | None:
        return self._usage

    def complete(self) -> bool:
        return self._complete
