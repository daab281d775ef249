"""API dialects, one module each; they know their wire format and nothing of storage."""

from proxy.dialects.anthropic import ANTHROPIC
from proxy.dialects.base import Dialect, Endpoint, ModelInfo
from proxy.dialects.gemini import GEMINI
from proxy.dialects.openai import OPENAI

BY_PROTOCOL: dict[str, Dialect] = {d.name: d for d in (OPENAI, ANTHROPIC, GEMINI)}

__all__ = ["ANTHROPIC", "BY_PROTOCOL", "Dialect", "Endpoint", "GEMINI", "ModelInfo", "OPENAI"]
