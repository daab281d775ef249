"""Carriers: opaque upstream state, parked in a field the client echoes back.

Multi-turn tool use with reasoning models only works when the next request hands the
provider back its own opaque state (TRANSLATION.md §2.5): Anthropic thinking blocks
with their signature, Gemini thoughtSignature, a chat upstream's reasoning_content. The
gateway keeps nothing between requests, so it writes that state into the one place of
the *client's* dialect the client sends back unchanged:

| client dialect | slot                                                         |
|----------------|--------------------------------------------------------------|
| Anthropic      | `thinking.signature` = `lpx1.<owner>.<value>`; a tool call's own state rides on `tool_use.id` |
| Responses      | `reasoning.encrypted_content` = `lpx1.<owner>.<value>`       |
| Gemini         | `thoughtSignature` = base64 of `lpx1.<owner>.<value>` (the field is bytes to google-genai); the turn's thinking also rides on its first `functionCall.id` (Gemini CLI drops thought parts) |
| Chat           | the tool call id: `<id>_lpx1_<base64url(json)>` (ids are echoed verbatim by every client, unknown fields are not) |

Gemini also signs text parts (a text-only turn carries its signature on its last part).
Anthropic and Responses clients have no slot on text, so that signature rides in a
thinking block (Anthropic) or reasoning item (Responses) right after the text, its owner
marked `<owner>+text`; on the way back it returns to the text part before it
(`anchor_signatures`). A Gemini call's signature reaches a Responses client the same
way, on a reasoning item right before the call (`<owner>+call`: a `call_id` is at most 64
characters, too short for it). Chat clients echo nothing on a text-only turn: there it is
not carried (Gemini does not require it there, as it does on function calls).

A value without the `lpx1.` prefix is the client dialect's own (a real Anthropic
signature from a same-dialect turn). The owner decides where a carrier may be replayed:
an upstream encoder uses a Sig only when it issued it and drops it otherwise, since
providers verify their signatures. Carriers are not encrypted or signed by the gateway:
they hold only what the provider already gave this client, and a forged one is
rejected by the provider that checks it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import orjson

from proxy.translate.hub import Part, Sig, Text, Thinking, ToolCall

PREFIX = "lpx1."
ID_MARK = "_lpx1_"
TEXT_MARK = "+text"    # a text part's signature, carried where the client keeps thinking
CALL_MARK = "+call"    # a tool call's signature, where the call itself has no slot (Responses)


def wrap(sig: Sig) -> str:
    return f"{PREFIX}{sig.owner}.{sig.value}"


def unwrap(value: str, native_owner: str) -> Sig:
    """A signature string from the client: a carrier, or the client dialect's own."""
    if value.startswith(PREFIX):
        owner, _, inner = value[len(PREFIX):].partition(".")
        return Sig(owner, inner)
    return Sig(native_owner, value)


def wrap_base64(sig: Sig) -> str:
    """For a slot typed as bytes (Gemini's thoughtSignature: google-genai decodes it as
    base64 and encodes it again when it sends it back)."""
    return base64.b64encode(wrap(sig).encode()).decode("ascii")


def unwrap_base64(value: str, native_owner: str) -> Sig:
    """The inverse of `wrap_base64`; a provider's own signature (base64 of other bytes)
    or a plain carrier is taken as `unwrap` takes it."""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raw = b""
    return unwrap(raw.decode("utf-8", "replace") if raw.startswith(PREFIX.encode()) else value, native_owner)


def wrap_text(sig: Sig) -> str:
    """The carrier of a text part's signature, for a thinking-shaped slot."""
    return wrap(Sig(sig.owner + TEXT_MARK, sig.value))


def wrap_call(sig: Sig) -> str:
    """The carrier of a tool call's signature, for a reasoning item before the call."""
    return wrap(Sig(sig.owner + CALL_MARK, sig.value))


def _carried(p: Part) -> bool:
    return isinstance(p, Thinking) and p.sig is not None and p.sig.owner.endswith((TEXT_MARK, CALL_MARK))


def anchor_signatures(parts: list[Part]) -> list[Part]:
    """An assistant turn's parts with each carrier of another part's signature given back
    to that part: a text signature (`wrap_text`) to the text part before it (or to an empty
    text part where there is none), a call signature (`wrap_call`) to the call after it."""
    if not any(_carried(p) for p in parts):
        return parts
    out: list[Part] = []
    for_call: Sig | None = None
    for p in parts:
        if isinstance(p, Thinking) and p.sig is not None and p.sig.owner.endswith(TEXT_MARK):
            sig = Sig(p.sig.owner[: -len(TEXT_MARK)], p.sig.value)
            last = out[-1] if out else None
            if isinstance(last, Text) and last.sig is None:
                last.sig = sig
            else:
                out.append(Text("", sig=sig))
            continue
        if isinstance(p, Thinking) and p.sig is not None and p.sig.owner.endswith(CALL_MARK):
            for_call = Sig(p.sig.owner[: -len(CALL_MARK)], p.sig.value)
            continue
        if isinstance(p, ToolCall) and for_call is not None:
            p.sig = p.sig or for_call
            for_call = None
        out.append(p)
    return out


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def id_with(call_id: str, payload: dict[str, Any]) -> str:
    """A tool call id that also carries `payload` ([A-Za-z0-9_-] only: valid everywhere)."""
    return call_id + ID_MARK + _b64(orjson.dumps(payload))


def split_id(call_id: str) -> tuple[str, dict[str, Any] | None]:
    """The original id and its payload; a malformed payload is ignored, never fatal."""
    head, mark, tail = call_id.partition(ID_MARK)
    if not mark:
        return call_id, None
    try:
        payload = orjson.loads(_unb64(tail))
    except (ValueError, orjson.JSONDecodeError):
        return head, None
    return head, payload if isinstance(payload, dict) else None


def thinking_payload(blocks: list[Thinking]) -> list[list[Any]]:
    return [[b.text, b.sig.owner if b.sig else None, b.sig.value if b.sig else None, b.redacted] for b in blocks]


def thinking_from_payload(items: Any) -> list[Thinking]:
    out: list[Thinking] = []
    if not isinstance(items, list):
        return out
    for item in items:
        if isinstance(item, list) and len(item) == 4 and isinstance(item[0], str):
            text, owner, value, redacted = item
            sig = Sig(owner, value) if isinstance(owner, str) and isinstance(value, str) else None
            out.append(Thinking(text, sig, bool(redacted)))
    return out


_ID_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")


def safe_id(call_id: str) -> str:
    """An id valid for Anthropic (`^[a-zA-Z0-9_-]+$`) and Responses (≤ 64): kept when it
    already is, else a deterministic clean form, so a re-sent history maps the same way."""
    if _ID_OK.fullmatch(call_id):
        return call_id
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", call_id)[:40] or "call"
    return f"{clean}_{hashlib.sha256(call_id.encode()).hexdigest()[:12]}"
