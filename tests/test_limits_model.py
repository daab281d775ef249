"""MemoryLimiter against a plain reference model (lists, filters, no running sums), with
a fake clock that steps onto window and TTL edges; and the Lua budget periods against
Python's calendar."""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from redis.asyncio import Redis

from proxy.limits.base import Decision, LimitSpec, Reservation
from proxy.limits.memory import MemoryLimiter, period_bounds
from proxy.limits.redis import LUA_PERIOD_BOUNDS

T0_MS = 1_000_000_000        # fake epoch start, in ms (small enough for exact float µs)
W_MS = 60_000                # the window
TTL_MS = 90_000              # reservation TTL: expiry and forgetting interleave with windows


@dataclass
class Held:
    expiry_ms: int
    cost_cents: int


@dataclass
class Model:
    """What the limits mean, written as directly as possible."""

    spec: LimitSpec
    requests: list[int] = field(default_factory=list)                 # admission times
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # rid -> (time, tokens)
    held: dict[str, Held] = field(default_factory=dict)               # until settled/forgotten
    spent_cents: int = 0

    def admit(self, now: int, rid: str, tokens: int, cents: int) -> tuple[object, ...]:
        spec = self.spec
        if spec.empty:
            return (True, None, 0, None, None, None, None)
        in_window = sorted(t for t in self.requests if now - t < W_MS)
        token_entries = sorted((t, n) for t, n in self.tokens.values() if now - t < W_MS)
        used = sum(n for _, n in token_entries)
        live = [h for h in self.held.values() if h.expiry_ms > now]
        refusals: list[tuple[str, int]] = []
        if spec.budget_usd is not None:
            budget = round(spec.budget_usd * 100)
            reserved = sum(h.cost_cents for h in live)
            if self.spent_cents + reserved + cents > budget:
                refusals.append(("budget", 1000 if self.spent_cents + cents <= budget else -1))
        if spec.rpm is not None and len(in_window) >= spec.rpm:
            k = len(in_window) - spec.rpm
            refusals.append(("rpm", in_window[k] + W_MS - now if k < len(in_window) else W_MS))
        if spec.tpm is not None and used + tokens > spec.tpm:
            wait = W_MS
            for i in range(len(token_entries)):
                if sum(n for _, n in token_entries[i + 1:]) + tokens <= spec.tpm:
                    wait = token_entries[i][0] + W_MS - now
                    break
            refusals.append(("tpm", wait))
        if spec.max_parallel is not None and len(live) >= spec.max_parallel:
            refusals.append(("parallel", 1000))
        if not refusals:
            if spec.rpm is not None:
                self.requests.append(now)
                in_window.append(now)
            if spec.tpm is not None:
                self.tokens[rid] = (now, tokens)   # replaces the entry of an id admitted before
                token_entries = sorted((t, n) for t, n in self.tokens.values() if now - t < W_MS)
                used = sum(n for _, n in token_entries)
            if spec.max_parallel is not None or spec.budget_usd is not None:
                self.held[rid] = Held(now + TTL_MS, cents if spec.budget_usd is not None else 0)
        reason = refusals[0][0] if refusals else None
        wait_ms = 0
        if refusals:
            wait_ms = refusals[0][1] if reason == "budget" else max(w for _, w in refusals)
        retry = 0 if reason is None or wait_ms < 0 else max(1, math.ceil(wait_ms / 1000))
        return (
            not refusals, reason, retry,
            None if spec.rpm is None else max(0, spec.rpm - len(in_window)),
            None if spec.rpm is None else (max(in_window) + W_MS - now if in_window else 0) / 1000,
            None if spec.tpm is None else max(0, spec.tpm - used),
            None if spec.tpm is None else (max(t for t, _ in token_entries) + W_MS - now if token_entries else 0) / 1000,
        )

    def settle(self, now: int, rid: str, tokens: int, cents: int) -> None:
        if rid in self.tokens:
            self.tokens[rid] = (self.tokens[rid][0], tokens)
        held = self.held.pop(rid, None)
        # Charged once, if settled before it is forgotten (expiry + one more TTL).
        if held is not None and held.expiry_ms + TTL_MS > now and self.spec.budget_usd is not None:
            self.spent_cents += cents


def observed(d: Decision) -> tuple[object, ...]:
    return (
        d.admitted, d.reason, d.retry_after_s,
        d.remaining_requests, d.reset_requests_s, d.remaining_tokens, d.reset_tokens_s,
    )


specs = st.builds(
    LimitSpec,
    rpm=st.none() | st.integers(0, 5),
    tpm=st.none() | st.integers(0, 100),
    max_parallel=st.none() | st.integers(0, 3),
    budget_usd=st.none() | st.integers(0, 10).map(lambda c: c / 100),
)
# Steps that land exactly on (and just around) the window and TTL edges.
steps_ms = st.sampled_from([0, 1, 999, 1000, 1001, 30_000, 59_999, 60_000, 60_001, 90_000]) | st.integers(0, 200_000)


class LimiterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now_ms = 0
        self.limiter = MemoryLimiter(clock=lambda: (T0_MS + self.now_ms) / 1000, reservation_ttl_s=TTL_MS / 1000)
        self.model = Model(LimitSpec())
        self.reservations: list[tuple[Reservation, int]] = []   # with admission order, settled or not
        self.count = 0

    def teardown(self) -> None:
        self.loop.close()

    @initialize(spec=specs)
    def choose_spec(self, spec: LimitSpec) -> None:
        self.model.spec = spec

    @rule(ms=steps_ms)
    def advance(self, ms: int) -> None:
        self.now_ms += ms

    @rule(tokens=st.integers(0, 60), cents=st.integers(0, 6), fresh=st.booleans())
    def admit(self, tokens: int, cents: int, fresh: bool) -> None:
        # Every id here is new, so a fresh admission (no index of ids) must answer the same.
        rid = f"r{self.count}"
        self.count += 1
        got = self.loop.run_until_complete(self.limiter.admit("k", self.model.spec, rid, tokens, cents / 100, fresh))
        want = self.model.admit(T0_MS + self.now_ms, rid, tokens, cents)
        assert observed(got) == want
        if got.reservation is not None:
            self.reservations.append((got.reservation, self.count))

    @precondition(lambda self: bool(self.reservations))
    @rule(data=st.data(), tokens=st.integers(0, 60), cents=st.integers(0, 6))
    def settle(self, data: st.DataObject, tokens: int, cents: int) -> None:
        # Any reservation, including ones already settled (settling twice is harmless).
        res, _ = data.draw(st.sampled_from(self.reservations))
        self.loop.run_until_complete(self.limiter.settle(res, tokens, cents / 100))
        self.model.settle(T0_MS + self.now_ms, res.request_id, tokens, cents)

    @invariant()
    def reservations_fit_the_budget(self) -> None:
        # Admission keeps spent + reserved within the budget, so what is reserved alone does.
        spec, now = self.model.spec, T0_MS + self.now_ms
        if spec.budget_usd is not None:
            live = [h.cost_cents for h in self.model.held.values() if h.expiry_ms > now]
            assert sum(live) <= round(spec.budget_usd * 100)


TestLimiterModel = pytest.mark.fast(LimiterMachine.TestCase)
TestLimiterModel.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.fast
@settings(max_examples=12, deadline=None)
@given(spec=specs.map(lambda s: LimitSpec(
    rpm=None if s.rpm is None else s.rpm * 100, tpm=None if s.tpm is None else s.tpm * 300,
    max_parallel=s.max_parallel, budget_usd=s.budget_usd,
)), seed=st.integers(0, 2**32), fresh=st.booleans())
def test_long_runs_match_the_model(spec: LimitSpec, seed: int, fresh: bool) -> None:
    """Thousands of steps, hundreds of entries per window: the windows' storage is cut
    back many times (compaction) while admissions, settlements and re-admissions of an
    earlier request id go on; every decision still matches the model. With `fresh`, ids
    are never re-admitted and the limiter is told so: settlements find their slots
    through the reservation, also after compactions and once the slot left the window."""
    rnd = random.Random(seed)
    now_ms = [0]
    lim = MemoryLimiter(clock=lambda: (T0_MS + now_ms[0]) / 1000, reservation_ttl_s=TTL_MS / 1000)
    model = Model(spec)
    admitted: list[Reservation] = []
    loop = asyncio.new_event_loop()
    try:
        for n in range(3000):
            now_ms[0] += rnd.choice((0, 1, 50, 200, 400, 999))
            if admitted and rnd.random() < 0.4:
                res = rnd.choice(admitted)
                tokens, cents = rnd.randrange(0, 60), rnd.randrange(0, 6)
                loop.run_until_complete(lim.settle(res, tokens, cents / 100))
                model.settle(T0_MS + now_ms[0], res.request_id, tokens, cents)
                continue
            # Now and then an id admitted before (the contract: its entries are replaced).
            again = admitted and not fresh and rnd.random() < 0.05
            rid = rnd.choice(admitted).request_id if again else f"r{n}"
            tokens, cents = rnd.randrange(0, 60), rnd.randrange(0, 6)
            got = loop.run_until_complete(lim.admit("k", spec, rid, tokens, cents / 100, fresh))
            want = model.admit(T0_MS + now_ms[0], rid, tokens, cents)
            assert observed(got) == want, n
            if got.reservation is not None:
                admitted.append(got.reservation)
    finally:
        loop.close()


@pytest.mark.fast
def test_exact_window_edge() -> None:
    """Written out once by hand: an admission leaves the window exactly 60 s later."""
    now = [1000.0]
    lim = MemoryLimiter(clock=lambda: now[0])
    spec = LimitSpec(rpm=1)

    async def run() -> None:
        assert (await lim.admit("k", spec, "a", 1, 0.0)).admitted
        now[0] += 59.999
        refused = await lim.admit("k", spec, "b", 1, 0.0)
        assert refused.reason == "rpm" and refused.retry_after_s == 1
        now[0] = 1060.0
        assert (await lim.admit("k", spec, "c", 1, 0.0)).admitted

    asyncio.run(run())


async def test_lua_budget_periods_match_python(redis_url: str) -> None:
    """The server-side calendar (Lua) agrees with Python's at edges and at random instants."""
    edges = [
        datetime(y, m, d, hh, mm, ss, tzinfo=timezone.utc).timestamp()
        for y, m, d, hh, mm, ss in [
            (2024, 2, 29, 0, 0, 0), (2024, 2, 29, 23, 59, 59), (2024, 3, 1, 0, 0, 0), (2023, 2, 28, 23, 59, 59),
            (2023, 12, 31, 23, 59, 59), (2024, 1, 1, 0, 0, 0), (2100, 2, 28, 12, 0, 0), (2000, 2, 29, 12, 0, 0),
            (1970, 1, 1, 0, 0, 0), (2038, 1, 19, 3, 14, 8),
        ]
    ]
    rnd = random.Random(20240229)
    instants = [int(t) for t in edges] + [rnd.randrange(0, 4_102_444_800) for _ in range(3000)]
    script = LUA_PERIOD_BOUNDS + """
local out = {}
for i = 1, #ARGV do
  for _, kind in ipairs({'day', 'month'}) do
    local s, e = period_bounds(tonumber(ARGV[i]), kind)
    out[#out + 1] = string.format('%.0f %.0f', s, e)
  end
end
return out
"""
    r = Redis.from_url(redis_url)
    try:
        got = await asyncio.wait_for(r.eval(script, 0, *instants), 10)
    finally:
        await r.aclose()
    want = [f"{s} {e}" for t in instants for kind in ("day", "month") for s, e in [period_bounds(t, kind)]]
    assert [g.decode() for g in got] == want
