"""The limiter interface: per-key rpm, tpm, parallel and budget (issue: limits).

Admission is one atomic step that checks every limit and reserves; settlement replaces
the reservation with what the request really used and releases the parallel slot.
Backends: `memory.py` (one process) and `redis.py` (many processes, one Lua script per
admission and per settlement, Redis TIME as the clock). Both pass one contract suite.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple, Protocol

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

    # Derived values are computed on first use and then kept on the spec (a spec lives as
    # long as its cached key), not recomputed per admission. First use is where they
    # were always computed, so an unusable budget (inf) still fails at admission only.
    @cached_property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_parallel is None and self.budget_usd is None

    @cached_property
    def budget_nano(self) -> int | None:
        return None if self.budget_usd is None else usd_to_nano(self.budget_usd)


# Reservation and Decision are made on every request: immutable NamedTuples, which
# cost a third of a frozen dataclass to build (one per-field object.__setattr__ each).
class Reservation(NamedTuple):
    key_id: str
    request_id: str
    tokens: int            # reserved token estimate (prompt estimate + max_tokens)
    cost_usd: float        # reserved spend estimate
    spec: LimitSpec
    slot: int = -1         # memory backend, fresh ids: the tpm slot to correct at settlement


class Decision(NamedTuple):
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
    # fresh=True: the caller vouches that request_id was never admitted before and will
    # not be again (the gateway's own ids), so no index of ids is needed to replace a
    # re-admission's entries; the answers are the same.
    async def admit(
        self, key_id: str, spec: LimitSpec, request_id: str, tokens: int, cost_usd: float, fresh: bool = False
    ) -> Decision: ...
    # Admit at once if this backend can without waiting (in-process, spend counter
    # seeded); None: use admit(). Same answer as admit() would give.
    def admit_now(
        self, key_id: str, spec: LimitSpec, request_id: str, tokens: int, cost_usd: float, fresh: bool = False
    ) -> Decision | None: ...
    async def settle(self, reservation: Reservation, tokens: int, cost_usd: float) -> None: ...
    # Settle at once if this backend can without waiting (in-process); False: use settle().
    def settle_now(self, reservation: Reservation, tokens: int, cost_usd: float) -> bool: ...


# --- Shared by the backends, so both report identical numbers ------------------------
#
# Semantics (identical in memory.py and redis.py; one contract suite checks both):
# - rpm: sliding 60 s window of admissions. An admission at t counts while now - t < 60 s,
#   so it has left the window exactly 60 s later. Refused when count >= rpm.
# - tpm: sliding 60 s window of token amounts, keyed by request id and stamped at admission.
#   Admission reserves the estimate; settlement corrects the amount in place (same stamp).
#   Refused when used + estimate > tpm; an estimate larger than tpm itself never fits
#   (retry_after 60: waiting does not help, the client must lower max_tokens).
# - max_parallel: unsettled reservations. A reservation stops holding its slot (and its
#   reserved spend) reservation_ttl_s after admission, so a crashed process cannot leak it;
#   it is remembered for another ttl so a late settlement still charges its actual cost.
# - budget: admitted only if spent(period) + reserved + estimate <= budget, so the sum of
#   reservations never exceeds the budget (overspend is bounded by actual > estimate).
#   Period: None lifetime, "day" since UTC midnight, "month" since the UTC 1st; the spend
#   counter of a key+period is seeded once from SpendSeed. Settlement charges the actual
#   cost to the period the request was admitted in.
#   retry_after: until the period resets; 1 s when only in-flight reservations are in the
#   way; 0 for a spent lifetime budget (waiting cannot help).
# - reason: the first refusing limit in the order budget, rpm, tpm, parallel; for rate
#   limits retry_after is the longest wait among the refusing ones (rpm/tpm: until enough
#   old entries leave the window; parallel: 1 s). Nothing is reserved when anything refuses.
# - request_id must be unique per admission; re-admitting a held id replaces its entries.

WINDOW_US = 60_000_000          # the rpm/tpm sliding window, in microseconds
US_PER_S = 1_000_000
NANO_PER_USD = 1_000_000_000    # spend is counted in integer nano-USD: sums never drift
BUDGET_PERIODS = (None, "day", "month")


def usd_to_nano(usd: float) -> int:
    return max(0, round(usd * NANO_PER_USD))


def check_spec(spec: LimitSpec) -> None:
    if spec.budget_period not in BUDGET_PERIODS:
        raise ValueError(f"budget_period must be one of {BUDGET_PERIODS}, not {spec.budget_period!r}")


def retry_after_s(wait_us: int) -> int:
    """Whole seconds to wait, at least 1; a negative wait means waiting cannot help (0)."""
    if wait_us < 0:
        return 0
    return max(1, -(-wait_us // US_PER_S))


def make_decision(
    spec: LimitSpec,
    reservation: Reservation | None,
    reason: Reason | None,
    wait_us: int,
    requests_used: int,
    requests_reset_us: int,
    tokens_used: int,
    tokens_reset_us: int,
) -> Decision:
    """Build a Decision from a backend's raw counters (after the reservation, if admitted).

    `reset_*` follow OpenAI: the time until the window is back to its initial (empty) state.
    """
    rpm, tpm = spec.rpm, spec.tpm
    return Decision(
        admitted=reservation is not None,
        reservation=reservation,
        reason=reason,
        retry_after_s=0 if reason is None else retry_after_s(wait_us),
        limit_requests=rpm,
        remaining_requests=None if rpm is None else max(0, rpm - requests_used),
        reset_requests_s=None if rpm is None else requests_reset_us / US_PER_S,
        limit_tokens=tpm,
        remaining_tokens=None if tpm is None else max(0, tpm - tokens_used),
        reset_tokens_s=None if tpm is None else tokens_reset_us / US_PER_S,
    )
