"""Tool names the upstream accepts, and the way back to the client's own.

Each protocol has its own rule for function names (TRANSLATION §1.5): OpenAI and
Anthropic take `[a-zA-Z0-9_-]{1,64}`, Gemini starts with a letter or `_` and also takes
`.` and `:`. Clients do not keep to the upstream's rule: Claude Code's MCP tools
(`mcp__<plugin>_<server>__<tool>`) outgrow 64 characters, Codex's namespaced tools are
flattened to `<namespace>__<name>`, a Gemini client's `github.search:issues` holds
characters OpenAI refuses, and an OpenAI name may start with a digit, which Gemini
refuses (P20).

A name the upstream would refuse is replaced, everywhere the request names a tool (the
tool list, the tool choice, the calls and results of the history: P39), by a short form
that is valid for every protocol: its characters cleaned, its head and tail kept (the
model reads the name to choose the tool), and a hash of the whole name. The form is a
pure function of the name, so a history re-sent next turn maps the same way and the
upstream sees one name per tool over the whole conversation (its prompt cache and its
signatures stay valid); the answer's tool calls get the client's name back, in bodies
and in streams, so the client never sees the short form. Names the upstream accepts
pass unchanged.
"""

from __future__ import annotations

import hashlib
import re

from proxy.translate.hub import Request, ToolCall, ToolResult

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_HEAD, _TAIL = 20, 33          # 20 + "_" + 33 + "_" + 8 hex ≤ 63, + a leading "_" at most


def short_name(name: str) -> str:
    """The stand-in for a name an upstream refuses: `[A-Za-z_][A-Za-z0-9_-]{..63}`."""
    clean = _UNSAFE.sub("_", name)
    if len(clean) > _HEAD + 1 + _TAIL:
        clean = f"{clean[:_HEAD]}_{clean[-_TAIL:]}"
    short = f"{clean}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return short if short[0].isalpha() or short[0] == "_" else "_" + short


def map_names(req: Request, valid: re.Pattern[str]) -> dict[str, str]:
    """Rename, in `req`, every tool name `valid` refuses; the map short form → original."""
    back: dict[str, str] = {}

    def fix(name: str) -> str:
        if valid.fullmatch(name):
            return name
        short = short_name(name)
        back[short] = name
        return short

    for tool in req.tools:
        tool.name = fix(tool.name)
    if req.tool_choice is not None and req.tool_choice.name is not None:
        req.tool_choice.name = fix(req.tool_choice.name)
    for msg in req.messages:
        for part in msg.parts:
            if isinstance(part, ToolCall):
                part.name = fix(part.name)
            elif isinstance(part, ToolResult) and part.name is not None:
                part.name = fix(part.name)
    return back
