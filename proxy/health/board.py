"""The process's view of every route's health, and what the forwarder asks of it.

- `arrange(plan)`: the plan without the routes that cool down (kept in order: priority
  tiers and weights stay as the router made them), each half-open route in it given to
  this request as its one probe. When every route cools down, the plan is all of them,
  soonest back first: a route in cooldown is used only when every route is.
- `succeeded` / `failed`: each attempt's outcome; `release`: probes a request claimed
  but never got to (it was answered by an earlier route, or went away).

Breaker states live in this process (memory) or in Redis, shared by every process
(`shared.RedisStates`); the local copy is what `arrange` reads, so the hot path never
waits for Redis unless a route is half-open. While nothing is unsettled (no route has a
failure on record) `unsettled` is False and the forwarder skips the board entirely.
Recent error rates and latencies are this process's own (for GET /admin/upstreams).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from proxy.health import breaker
from proxy.health.breaker import CLOSED, BreakerState, Policy

log = logging.getLogger("llm_proxy.health")

RouteKey = tuple[str, str]   # (upstream name, upstream model)
_RECENT = 100                # attempts an error rate is computed over
_EWMA = 0.2


class Routed(Protocol):
    """What the board needs of a route (proxy.routing.Route has it)."""

    @property
    def key(self) -> RouteKey: ...


R = TypeVar("R", bound=Routed)


class SharedStates(Protocol):
    """Breaker states kept where every process sees them; each call applies one
    transition atomically and returns the resulting state."""

    policy: Policy

    async def failure(self, key: RouteKey, now: float, retry_after: float | None) -> BreakerState: ...
    async def success(self, key: RouteKey, now: float) -> BreakerState: ...
    async def claim(self, key: RouteKey, now: float) -> BreakerState | None: ...
    async def release(self, key: RouteKey, lease: float) -> None: ...
    async def snapshot(self) -> dict[RouteKey, BreakerState]: ...
    async def close(self) -> None: ...


class _Stats:
    """Attempts, and the error rate over roughly the last _RECENT of them: both counts are
    halved whenever the window fills (a few integer operations per attempt, no deque)."""

    __slots__ = ("attempts", "failed", "last_error", "last_error_at", "latency_ms", "window")

    def __init__(self) -> None:
        self.attempts = 0
        self.window = 0
        self.failed = 0.0
        self.latency_ms: float | None = None
        self.last_error: str | None = None      # status or error class, never upstream text
        self.last_error_at: float | None = None

    def add(self, failed: bool, latency_ms: float | None) -> None:
        self.attempts += 1
        if self.window >= _RECENT:
            self.window //= 2
            self.failed /= 2
        self.window += 1
        if failed:
            self.failed += 1
        if latency_ms is not None:
            last = self.latency_ms
            self.latency_ms = latency_ms if last is None else last + _EWMA * (latency_ms - last)

    @property
    def error_rate(self) -> float | None:
        return self.failed / self.window if self.window else None


@dataclass(frozen=True)
class RouteView:
    """One route's state for the admin API."""

    upstream: str
    model: str
    state: str                    # ok | failing | cooldown | half_open
    cooldown_until: float | None
    consecutive_failures: int
    error_rate: float | None      # over this process's last attempts
    attempts: int
    latency_ms: float | None
    last_error: str | None = None
    last_error_at: float | None = None

    def to_json(self) -> dict[str, object]:
        at = self.last_error_at
        return {
            "upstream": self.upstream, "model": self.model, "state": self.state,
            "cooldown_until": self.cooldown_until, "consecutive_failures": self.consecutive_failures,
            "error_rate": self.error_rate, "attempts": self.attempts,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 1),
            "last_error": self.last_error,
            "last_error_at": None if at is None else datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
        }


class RouteHealth:
    def __init__(self, policy: Policy, shared: SharedStates | None = None, clock: Clock | None = None) -> None:
        self.policy = policy
        self._shared = shared
        self.now = clock or time.time   # the clock (tests set their own)
        self._states: dict[RouteKey, BreakerState] = {}   # only routes that are not plain ok
        self._stats: dict[RouteKey, _Stats] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._shared_down = False

    def use_policy(self, policy: Policy) -> None:
        """A reloaded routing.breaker: applies to the next transition of every route."""
        self.policy = policy
        if self._shared is not None:
            self._shared.policy = policy

    @property
    def unsettled(self) -> bool:
        """Some route has a failure on record: plans must be arranged."""
        return bool(self._states)

    @property
    def shared(self) -> bool:
        return self._shared is not None

    # ------------------------------------------------------------------ the forwarder's calls

    async def arrange(self, plan: Sequence[R]) -> tuple[list[R], list[tuple[RouteKey, float]]]:
        """The routes to try, and the probe leases this request holds."""
        now = self.now()
        ready: list[R] = []
        cooling: list[tuple[float, int, R]] = []
        leases: list[tuple[RouteKey, float]] = []
        for i, route in enumerate(plan):
            key = route.key
            state = self._states.get(key)
            if state is None or state.usable(now):
                ready.append(route)
                continue
            if state.phase(now) == "half_open":
                claimed = await self._claim(key, state, now)
                if claimed is not None:
                    leases.append((key, claimed.probe_until))
                    ready.append(route)
                    continue
                state = self._states.get(key, state)
            cooling.append((state.until, i, route))
        if ready:
            return ready, leases
        return [route for _, _, route in sorted(cooling, key=lambda c: (c[0], c[1]))], leases

    def succeeded(self, route: Routed, latency_ms: float | None) -> None:
        """On every answered attempt: kept to a dict lookup and a few operations."""
        key = route.key
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = _Stats()
        stats.add(False, latency_ms)
        if not self._states:
            return
        state = self._states.get(key)
        if state is None:
            return
        now = self.now()
        after = breaker.after_success(state, now)
        if after is state:
            return
        self._set(key, after)
        if self._shared is not None:
            self._spawn(self._shared_success(key, now))

    async def failed(
        self, route: Routed, retry_after: float | None, latency_ms: float | None, error: str | None = None
    ) -> BreakerState:
        """`error`: the status or error class, for the admin view (never upstream text)."""
        key = route.key
        now = self.now()
        stats = self._stat(key)
        stats.add(True, latency_ms)
        stats.last_error, stats.last_error_at = error, now
        before = self._states.get(key, CLOSED)
        after: BreakerState | None = None
        if self._shared is not None:
            try:
                after = await self._shared.failure(key, now, retry_after)
                self._shared_ok()
            except Exception as exc:
                self._shared_failed(exc)
        if after is None:
            after = breaker.after_failure(before, now, self.policy, retry_after)
        self._set(key, after)
        if after.until and after.until != before.until:
            log.warning(
                "route %s/%s cools down for %.1fs (%d consecutive failures)",
                key[0], key[1], max(0.0, after.until - now), after.fails,
            )
        return after

    def release(self, leases: Iterable[tuple[RouteKey, float]]) -> None:
        """Give back probe leases whose route this request never tried (the shared copy
        in the background: this runs as a request ends, also when it is cancelled)."""
        for key, lease in leases:
            state = self._states.get(key)
            if state is not None and state.probe_until == lease:
                self._set(key, breaker.release(state, lease))
                if self._shared is not None:
                    self._spawn(self._shared_release(key, lease))

    # ------------------------------------------------------------------ views

    def state(self, key: RouteKey) -> BreakerState:
        return self._states.get(key, CLOSED)

    def in_cooldown(self, keys: Iterable[RouteKey]) -> int:
        now = self.now()
        return sum(1 for k in keys if self.state(k).phase(now) == "cooldown")

    def view(self, key: RouteKey) -> RouteView:
        now = self.now()
        state = self.state(key)
        stats = self._stats.get(key)
        phase = state.phase(now)
        return RouteView(
            key[0], key[1], phase,
            state.until if phase == "cooldown" else None,
            state.fails,
            stats.error_rate if stats else None,
            stats.attempts if stats else 0,
            stats.latency_ms if stats else None,
            stats.last_error if stats else None,
            stats.last_error_at if stats else None,
        )

    # ------------------------------------------------------------------ shared states

    async def sync(self) -> None:
        """Replace the local copy with the shared states (a no-op in memory)."""
        if self._shared is None:
            return
        try:
            states = await self._shared.snapshot()
        except Exception as exc:
            self._shared_failed(exc)
            return
        self._shared_ok()
        self._states = {k: s for k, s in states.items() if s != CLOSED}

    async def run_sync(self, interval_s: float) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1)
        if self._shared is not None:
            await self._shared.close()

    # ------------------------------------------------------------------ internals

    def _stat(self, key: RouteKey) -> _Stats:
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = _Stats()
        return stats

    def _set(self, key: RouteKey, state: BreakerState) -> None:
        if state == CLOSED:
            self._states.pop(key, None)
        else:
            self._states[key] = state

    async def _claim(self, key: RouteKey, state: BreakerState, now: float) -> BreakerState | None:
        if self._shared is not None:
            try:
                claimed = await self._shared.claim(key, now)
                self._shared_ok()
            except Exception as exc:
                self._shared_failed(exc)
                claimed = breaker.claim(state, now, self.policy)
        else:
            claimed = breaker.claim(state, now, self.policy)
        if claimed is not None:
            self._set(key, claimed)
        return claimed

    async def _shared_success(self, key: RouteKey, now: float) -> None:
        assert self._shared is not None
        try:
            self._set(key, await self._shared.success(key, now))
            self._shared_ok()
        except Exception as exc:
            self._shared_failed(exc)

    async def _shared_release(self, key: RouteKey, lease: float) -> None:
        assert self._shared is not None
        try:
            await self._shared.release(key, lease)
        except Exception as exc:
            self._shared_failed(exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _shared_failed(self, exc: Exception) -> None:
        # Logged once per outage: the breaker keeps working on this process's own view.
        if not self._shared_down:
            self._shared_down = True
            log.warning("shared route states unavailable (%s): using this process's own", type(exc).__name__)

    def _shared_ok(self) -> None:
        if self._shared_down:
            self._shared_down = False
            log.info("shared route states available again")


class Clock(Protocol):
    def __call__(self) -> float: ...
