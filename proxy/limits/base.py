"""The limiter interface: per-key rpm, tpm, parallel and budget (issue: limits).

Admission is one atomic step that checks every limit and reserves; settlement replaces
the reservation with what the request really used and releases the parallel slot.
Backends: `memory.py` (one process) and `redis.py` (many processes, one Lua script per
admission and per settlement, Redis TIME as the clock). Both pass one contract suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Protocol

Reason = Literal["rpm", "tpm", "parallel", "budget"]


class LimiterUnavailable(Exception):
    """The backend cannot answer (e.g. Redis down). The caller decides fail-closed/open."""


@dataclass(frozen=True)
class LimitSpec:
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_usd: float | None = None
    budget_period: str | None = None      # None (lifetime) | "day" | "month" (UTC)

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_parallel is None and self.budget_usd is None


@dataclass(frozen=True)
class Reservation:
    key_id: str
    request_id: str
    tokens: int            # reserved token estimate (prompt estimate + max_tokens)
    cost_usd: float        # reserved spend estimate
    spec: LimitSpec


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reservation: Reservation | None = None
    reason: Reason | None = None
    retry_after_s: int = 0
    # For x-ratelimit-* headers (None where the limit is not set).
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


# Called once per key and budget period when a backend has no spend counter yet, so the
# budget survives restarts: returns the USD already recorded in the usage store since
# `period_start` (unix seconds).
SpendSeed = Callable[[str, float], Awaitable[float]]


class Limiter(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...   # raises LimiterUnavailable
    async def admit(self, key_id: str, spec: LimitSpec, request_id: str, tokens: int, cost_usd: float) -> Decision: ...
    async def settle(self, reservation: Reservation, tokens: int, cost_usd: float) -> None: ...
