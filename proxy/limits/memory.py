"""In-process limiter: exact within one process (semantics: see the comment in base.py).

Check-and-reserve runs without any await in between, so on one event loop it is atomic
without locks. The only await is the spend seed, which happens before the check.
Entries are kept in arrival order, which is time order as long as the clock does not
step backwards (if it does, old entries are merely pruned a little late).
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from proxy.limits.base import (
    US_PER_S,
    WINDOW_US,
    Decision,
    LimiterUnavailable,
    LimitSpec,
    Reason,
    Reservation,
    SpendSeed,
    check_spec,
    make_decision,
    usd_to_nano,
)

# Spend counters of periods older than this are dropped when a newer period is seeded
# (late settlements of the previous period still find theirs).
_KEEP_PERIODS_S = 32 * 86_400


def period_bounds(now_s: int, period: str | None) -> tuple[int, int | None]:
    """(start, end) of the budget period containing `now_s`, unix seconds, UTC."""
    if period is None:
        return 0, None
    now = datetime.fromtimestamp(now_s, tz=UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    else:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
    return int(start.timestamp()), int(end.timestamp())


# The rpm and tpm windows keep one entry per admission for 60 s: ~240k for a key at 4k
# req/s. They live in flat arrays of machine integers, not as a list object per entry:
# those lists were containers the garbage collector traverses (a full collection over
# such a window took 54-64 ms, now ~19 ms) and took more memory (57 -> 44 MB for it).
# Entries are appended at the end and pruned from a head index; the dead prefix is cut
# off once it outgrows the live part, so each entry is moved at most once on average.
_COMPACT_MIN = 64
# Token counts are stored as signed 64-bit integers; no real count comes near this.
_TOKENS_CAP = 2**62
# A held reservation: (expiry_us, cost_nano, period). cost_nano is counted in
# `reserved_nano` while the reservation is live; period is the budget period its actual
# cost is charged to (None: no budget).
_Held = tuple[int, int, "int | None"]
_NEVER = 2**63
_WINDOW_S = WINDOW_US / US_PER_S


def _int64s() -> array[int]:
    return array("q")


# Mutable per-key state (not frozen on purpose: it is the counter itself).
@dataclass(slots=True)
class _KeyState:
    # rpm: admission stamps (µs), oldest first; requests[requests_head:] are in the window.
    requests: array[int] = field(default_factory=_int64s)
    requests_head: int = 0
    # tpm: one slot per admission in three parallel sequences (stamp, tokens, request id),
    # oldest first; slots before log_head have left the window. A slot whose request id
    # was admitted again has its tokens zeroed (counted no more) and stays until pruned.
    log_ts: array[int] = field(default_factory=_int64s)
    log_tokens: array[int] = field(default_factory=_int64s)
    log_rids: list[str | None] = field(default_factory=list)   # None: a fresh id (not indexed)
    log_head: int = 0
    log_base: int = 0                   # the sequence number of slot 0 (compaction renumbers)
    tokens: dict[str, int] = field(default_factory=dict)                      # indexed request id -> its slot's sequence number
    tokens_sum: int = 0
    live: OrderedDict[str, _Held] = field(default_factory=OrderedDict)        # holding a slot
    stale: OrderedDict[str, _Held] = field(default_factory=OrderedDict)       # expired, unsettled
    reserved_nano: int = 0
    spent: dict[int, int] = field(default_factory=dict)                       # period -> nano-USD
    due_us: int = 0                     # no reservation expires or is forgotten before this
    checked: LimitSpec | None = None    # the spec last passed check_spec(): specs repeat per key


class MemoryLimiter:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        reservation_ttl_s: float = 900,
        spend_seed: SpendSeed | None = None,
    ) -> None:
        self._clock = clock
        self._ttl_us = round(reservation_ttl_s * US_PER_S)
        self._spend_seed = spend_seed
        self._keys: dict[str, _KeyState] = {}
        # Seeding is rare (once per key and period); one lock keeps concurrent first
        # requests of a key from all querying the store.
        self._seed_lock = asyncio.Lock()
        # The current day / month bounds: two datetime computations per request otherwise.
        self._periods: dict[str | None, tuple[int, int | None]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def admit(
        self, key_id: str, spec: LimitSpec, request_id: str, tokens: int, cost_usd: float, fresh: bool = False
    ) -> Decision:
        while True:
            decision = self.admit_now(key_id, spec, request_id, tokens, cost_usd, fresh)
            if decision is not None:
                return decision
            await self._seed_period(key_id, spec)

    def admit_now(
        self, key_id: str, spec: LimitSpec, request_id: str, tokens: int, cost_usd: float, fresh: bool = False
    ) -> Decision | None:
        """Admission without waiting; None when the budget period's spend counter must be
        seeded from the store first (once per key and period: then await admit()).

        Runs on every request of a key with limits: entries are plain lists and tuples,
        expiry is scanned when due.
        A fresh id (base.py) gets no entry in the tpm window's index of ids: its slot
        travels in the Reservation instead, and the window keeps no string per request.
        """
        if tokens < 0:
            tokens = 0
        elif tokens > _TOKENS_CAP:
            tokens = _TOKENS_CAP
        if spec.empty:
            return Decision(True, Reservation(key_id, request_id, tokens, cost_usd, spec))
        st = self._keys.get(key_id)
        if st is None or st.checked is not spec:
            check_spec(spec)
            if st is None:
                st = self._keys[key_id] = _KeyState()
            st.checked = spec
        now = self._now_us()
        budget = spec.budget_nano
        period, period_end = 0, None
        if budget is not None:
            period, period_end = self._period(now // US_PER_S, spec.budget_period)
            if period not in st.spent:
                return None
        # Check and reserve are one atomic step (no await in this method).
        cost = usd_to_nano(cost_usd)
        cutoff = now - WINDOW_US
        requests, head = st.requests, st.requests_head
        if head < len(requests) and requests[head] <= cutoff:
            self._prune_requests(st, cutoff)
        log_ts = st.log_ts
        if st.log_head < len(log_ts) and log_ts[st.log_head] <= cutoff:
            self._prune_tokens(st, cutoff)
        live = st.live
        if now >= st.due_us:
            self._expire(st, now)
        rpm, tpm, parallel = spec.rpm, spec.tpm, spec.max_parallel
        if (
            (budget is not None and st.spent[period] + st.reserved_nano + cost > budget)
            or (rpm is not None and len(requests) - st.requests_head >= rpm)
            or (tpm is not None and st.tokens_sum + tokens > tpm)
            or (parallel is not None and len(live) >= parallel)
        ):
            return self._refusal(st, spec, tokens, cost, now, period, period_end)
        if rpm is not None:
            requests.append(now)
        slot = -1
        if tpm is not None:
            if fresh:
                slot = st.log_base + len(log_ts)
                st.log_rids.append(None)
            else:
                counted = st.tokens
                old = counted.get(request_id)
                if old is not None:   # re-admitted: its earlier slot counts no more
                    i = old - st.log_base
                    st.tokens_sum -= st.log_tokens[i]
                    st.log_tokens[i] = 0
                counted[request_id] = st.log_base + len(log_ts)
                st.log_rids.append(request_id)
            log_ts.append(now)
            st.log_tokens.append(tokens)
            st.tokens_sum += tokens
        reservation = Reservation(key_id, request_id, tokens, cost_usd, spec, slot)
        if parallel is not None or budget is not None:
            if not fresh and (request_id in live or request_id in st.stale):
                self._release(st, request_id)  # a re-admitted id replaces its reservation
            expiry = now + self._ttl_us
            if budget is None:
                live[request_id] = (expiry, 0, None)
            else:
                st.reserved_nano += cost
                live[request_id] = (expiry, cost, period)
            if expiry < st.due_us:
                st.due_us = expiry
        # make_decision(spec, reservation, None, 0, ...) written out for an admission: a
        # set window's newest entry is this admission, so it resets a full window from now.
        used, tokens_used = len(requests) - st.requests_head, st.tokens_sum
        return Decision(
            admitted=True,
            reservation=reservation,
            limit_requests=rpm,
            remaining_requests=None if rpm is None else max(0, rpm - used),
            reset_requests_s=None if rpm is None else _WINDOW_S,
            limit_tokens=tpm,
            remaining_tokens=None if tpm is None else max(0, tpm - tokens_used),
            reset_tokens_s=None if tpm is None else _WINDOW_S,
        )

    def _refusal(
        self, st: _KeyState, spec: LimitSpec, tokens: int, cost: int, now: int, period: int, period_end: int | None
    ) -> Decision:
        """Why a request does not fit and how long to wait (base.py: first reason, longest wait)."""
        refusals: list[tuple[Reason, int]] = []
        budget = spec.budget_nano
        if budget is not None:
            spent = st.spent[period]
            if spent + st.reserved_nano + cost > budget:
                if spent + cost <= budget:
                    wait = US_PER_S                 # only in-flight reservations are in the way
                elif period_end is None:
                    wait = -1                       # lifetime budget: waiting cannot help
                else:
                    wait = period_end * US_PER_S - now
                refusals.append(("budget", wait))
        count = len(st.requests) - st.requests_head
        if spec.rpm is not None and count >= spec.rpm:
            # The (count - rpm)-th oldest admission must leave before one more fits.
            idx = count - spec.rpm
            wait = st.requests[st.requests_head + idx] + WINDOW_US - now if idx < count else WINDOW_US
            refusals.append(("rpm", wait))
        if spec.tpm is not None and st.tokens_sum + tokens > spec.tpm:
            refusals.append(("tpm", self._tokens_wait(st, spec.tpm, tokens, now)))
        if spec.max_parallel is not None and len(st.live) >= spec.max_parallel:
            refusals.append(("parallel", US_PER_S))
        reason = refusals[0][0]
        wait = refusals[0][1] if reason == "budget" else max(w for _, w in refusals)
        return self._decision(st, spec, None, reason, wait, now)

    async def settle(self, reservation: Reservation, tokens: int, cost_usd: float) -> None:
        self.settle_now(reservation, tokens, cost_usd)

    def settle_now(self, reservation: Reservation, tokens: int, cost_usd: float) -> bool:
        """Nothing here waits: callers settle inline instead of scheduling a task."""
        st = self._keys.get(reservation.key_id)
        if st is None or reservation.spec.empty:
            return True
        rid = reservation.request_id
        slot = reservation.slot
        seq = st.tokens.get(rid) if slot < 0 else slot
        # Still counted (an indexed id is, until pruned; a fresh slot while the window
        # holds it): correct in place.
        if seq is not None and (i := seq - st.log_base) >= st.log_head:
            if tokens < 0:
                tokens = 0
            elif tokens > _TOKENS_CAP:
                tokens = _TOKENS_CAP
            st.tokens_sum += tokens - st.log_tokens[i]
            st.log_tokens[i] = tokens
        held = self._release(st, rid)
        if held is None:
            return True
        # Charged once (the held record is gone after the first settlement), and only
        # until it is forgotten, one TTL after its expiry.
        period = held[2]
        if period is not None and period in st.spent and held[0] + self._ttl_us > self._now_us():
            st.spent[period] += usd_to_nano(cost_usd)
        return True

    # --- internals ---

    def _period(self, now_s: int, kind: str | None) -> tuple[int, int | None]:
        bounds = self._periods.get(kind)
        if bounds is None or not (bounds[0] <= now_s and (bounds[1] is None or now_s < bounds[1])):
            bounds = self._periods[kind] = period_bounds(now_s, kind)
        return bounds

    def _now_us(self) -> int:
        return round(self._clock() * US_PER_S)

    async def _seed_period(self, key_id: str, spec: LimitSpec) -> None:
        """Seed the spend counter of the current budget period (admit_now asked for it)."""
        st = self._keys[key_id]
        period, _ = self._period(self._now_us() // US_PER_S, spec.budget_period)
        async with self._seed_lock:
            if period not in st.spent:
                value = await self._seed(key_id, period)
                st.spent = {p: v for p, v in st.spent.items() if p >= period - _KEEP_PERIODS_S}
                st.spent[period] = value
        # The clock moves during the await (and may cross into a new period): admit() asks again.

    async def _seed(self, key_id: str, period: int) -> int:
        if self._spend_seed is None:
            return 0
        try:
            return usd_to_nano(await self._spend_seed(key_id, float(period)))
        except Exception as exc:  # the store behind the seed is down: same as backend down
            raise LimiterUnavailable("spend seed failed") from exc

    @staticmethod
    def _prune_requests(st: _KeyState, cutoff: int) -> None:
        requests, head = st.requests, st.requests_head
        end = len(requests)
        while head < end and requests[head] <= cutoff:
            head += 1
        if head >= _COMPACT_MIN and head * 2 >= end:
            del requests[:head]
            head = 0
        st.requests_head = head

    @staticmethod
    def _prune_tokens(st: _KeyState, cutoff: int) -> None:
        log_ts, log_tokens, rids, counted = st.log_ts, st.log_tokens, st.log_rids, st.tokens
        head, base = st.log_head, st.log_base
        end = len(log_ts)
        while head < end and log_ts[head] <= cutoff:
            rid = rids[head]
            # (None: a fresh id's slot, not indexed.) Else admitted again since: that slot counts.
            if rid is not None and counted.get(rid) == base + head:
                del counted[rid]
            st.tokens_sum -= log_tokens[head]     # (a replaced slot holds 0)
            rids[head] = None                     # the id string is not kept for the compaction
            head += 1
        if head >= _COMPACT_MIN and head * 2 >= end:
            del log_ts[:head], log_tokens[:head], rids[:head]
            st.log_base = base + head
            head = 0
        st.log_head = head

    def _expire(self, st: _KeyState, now: int) -> None:
        """Move expired reservations to `stale`, forget stale ones, and note when to look
        again (`due_us`: the next expiry or forgetting; settlements only make it early)."""
        live, stale, ttl = st.live, st.stale, self._ttl_us
        while live:
            rid = next(iter(live))
            held = live[rid]
            if held[0] > now:
                break
            del live[rid]
            st.reserved_nano -= held[1]
            stale[rid] = held
        while stale:
            rid = next(iter(stale))
            if stale[rid][0] + ttl > now:
                break
            del stale[rid]
        due = _NEVER
        if live:
            due = live[next(iter(live))][0]
        if stale:
            due = min(due, stale[next(iter(stale))][0] + ttl)
        st.due_us = due

    @staticmethod
    def _release(st: _KeyState, rid: str) -> _Held | None:
        """Free a reservation's slot (and reserved spend, while live); None if not held."""
        held = st.live.pop(rid, None)
        if held is not None:
            st.reserved_nano -= held[1]
            return held
        return st.stale.pop(rid, None)

    @staticmethod
    def _tokens_wait(st: _KeyState, tpm: int, tokens: int, now: int) -> int:
        """Until enough of the oldest token entries have left the window for `tokens`."""
        left = st.tokens_sum
        log_ts, log_tokens = st.log_ts, st.log_tokens
        for i in range(st.log_head, len(log_ts)):
            left -= log_tokens[i]   # a replaced slot holds 0: no change, and no earlier answer
            if left + tokens <= tpm:
                return log_ts[i] + WINDOW_US - now
        return WINDOW_US

    @staticmethod
    def _decision(
        st: _KeyState, spec: LimitSpec, reservation: Reservation | None, reason: Reason | None, wait: int, now: int
    ) -> Decision:
        # The newest entries are always counted ones (a re-admission appends its own).
        requests, log_ts = st.requests, st.log_ts
        used = len(requests) - st.requests_head
        requests_reset = requests[-1] + WINDOW_US - now if used else 0
        tokens_reset = log_ts[-1] + WINDOW_US - now if len(log_ts) > st.log_head else 0
        return make_decision(spec, reservation, reason, wait, used, requests_reset, st.tokens_sum, tokens_reset)
