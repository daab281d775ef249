"""Limiter backends; `make_limiter` picks one from the configured URL."""

from __future__ import annotations

from proxy.limits.base import Limiter, SpendSeed
from proxy.limits.memory import MemoryLimiter
from proxy.limits.redis import RedisLimiter

__all__ = ["make_limiter", "MemoryLimiter", "RedisLimiter"]


def make_limiter(url: str, spend_seed: SpendSeed | None = None) -> Limiter:
    """`memory://` (exact in one process) or `redis://` / `rediss://` (exact across processes)."""
    if url.startswith("memory://"):
        return MemoryLimiter(spend_seed=spend_seed)
    if url.startswith(("redis://", "rediss://")):
        return RedisLimiter(url, spend_seed=spend_seed)
    raise ValueError("limits url must start with memory://, redis:// or rediss://")
