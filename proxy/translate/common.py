"""Small helpers every codec uses: typed reads of client JSON, ids, argument parsing."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.translate.hub import BadInput, Text


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    """What a request encoder needs to know about the route (from operator config)."""

    model: str                    # the upstream's model name
    default_max_tokens: int = 4096  # for upstreams that require max_tokens (Anthropic)


@dataclass(slots=True)
class ClientContext:
    """What a response encoder needs to know about the client's call."""

    model: str                    # the model name the client asked for
    stream: bool
    include_usage: bool = False
    prompt_estimate: int = 0      # shown where a dialect needs input tokens before the upstream says
    created: int = 0
    freeform_tools: frozenset[str] = frozenset()   # upstream names of free-form tools (hub.Tool)
    namespaces: dict[str, str] = field(default_factory=dict)   # upstream name → its namespace
    sse: bool = True              # Gemini streams without alt=sse are one JSON array

    def __post_init__(self) -> None:
        if not self.created:
            self.created = int(time.time())


def new_id(prefix: str) -> str:
    # An id must be unique, not secret: 96 bits from `random` (reseeded in a forked child)
    # instead of a getrandom syscall per id, which cost the translated non-streamed call
    # ~2 % of its CPU (bench.ab --messages, bench/RESULTS.md "Translation").
    return prefix + random.getrandbits(96).to_bytes(12).hex()


def obj(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one (lenient reads of upstream JSON)."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadInput(f"'{name}' must be an array.", name)
    return value


def as_dict(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadInput(f"'{name}' must be an object.", name)
    return value


def opt_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput(f"'{name}' must be a string.", name)
    return value


def opt_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"'{name}' must be an integer.", name)
    return value


def opt_num(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"'{name}' must be a number.", name)
    return float(value)


def parse_args(arguments: str) -> dict[str, Any]:
    """Tool arguments as an object: "" is {}, and so is JSON that is not an object
    (a call cut by max_tokens, a local model's bad JSON): never a crash (TRANSLATION §2.3)."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def dump_args(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def joined_text(parts: list[Any]) -> str:
    return "".join(p.text for p in parts if isinstance(p, Text))


def split_data_url(url: str) -> tuple[str, str] | None:
    """`data:<mime>;base64,<data>` → (mime, data), else None."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return head[: -len(";base64")] or "application/octet-stream", data


def effort_for_budget(budget: int) -> str:
    if budget <= 2048:
        return "low"
    return "medium" if budget <= 12288 else "high"


BUDGET_FOR_EFFORT = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}
