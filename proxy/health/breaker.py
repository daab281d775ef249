"""The circuit breaker of one route, as pure functions of its state and the time.

closed (ok, or "failing" while failures count up) → after `failures` consecutive failed
attempts, or at once on a provider's Retry-After: open (cooldown until T). Once T has
passed the route is half-open: one real request may probe it (`claim`); success closes
it, failure opens it again for twice as long (up to the maximum). A failure reported
while the route already cools (a request that was in flight when it tripped) does not
escalate the backoff; a success reported then does not end the cooldown either.

`proxy/health/shared.py` runs the same transitions in Lua; tests hold both to one
contract (tests/test_route_health.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.config import BreakerConfig

Policy = BreakerConfig


@dataclass(frozen=True)
class BreakerState:
    fails: int = 0             # consecutive failed attempts
    level: int = 0             # trips without a success in between: the backoff's exponent
    until: float = 0.0         # end of the cooldown (unix seconds); 0: closed
    probe_until: float = 0.0   # a probe is in flight until then (its lease)

    def phase(self, now: float) -> str:
        """ok | failing | cooldown | half_open (probing counts as cooldown for others)."""
        if not self.until:
            return "failing" if self.fails else "ok"
        if now < self.until:
            return "cooldown"
        return "cooldown" if self.probe_until > now else "half_open"

    def usable(self, now: float) -> bool:
        """May ordinary traffic use the route (closed)?"""
        return not self.until


CLOSED = BreakerState()


def backoff_s(policy: Policy, level: int) -> float:
    return float(min(policy.cooldown_s * 2 ** min(level, 30), policy.max_cooldown_s))


def after_failure(state: BreakerState, now: float, policy: Policy, retry_after: float | None) -> BreakerState:
    fails = state.fails + 1
    told = min(retry_after, policy.max_retry_after_s) if retry_after and retry_after > 0 else 0.0
    if state.until and now < state.until:
        # Already cooling: a late failure neither escalates nor shortens it.
        return replace(state, fails=fails, until=max(state.until, now + told))
    tripped = bool(state.until) or fails >= policy.failures   # a failed probe, or the threshold
    if not tripped and not told:
        return replace(state, fails=fails)
    cooldown = max(backoff_s(policy, state.level), told) if tripped else told
    return BreakerState(fails, state.level + 1, now + cooldown, 0.0)


def after_success(state: BreakerState, now: float) -> BreakerState:
    if state.until and now < state.until:
        return state   # began before the trip: the cooldown stands
    return CLOSED


def claim(state: BreakerState, now: float, policy: Policy) -> BreakerState | None:
    """The state with this caller's probe lease, or None when it may not probe now."""
    if state.until and now >= state.until and state.probe_until <= now:
        return replace(state, probe_until=now + policy.probe_timeout_s)
    return None


def release(state: BreakerState, lease: float) -> BreakerState:
    """Give back a probe lease that was never used (the request ended before that route)."""
    return replace(state, probe_until=0.0) if state.probe_until == lease else state
