"""One contract for both limiter backends (memory and a real redis-server)."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from _redis import RedisServer
from proxy.limits import MemoryLimiter, RedisLimiter, make_limiter
from proxy.limits.base import Decision, Limiter, LimiterUnavailable, LimitSpec, SpendSeed
from proxy.middleware.limits import Admission
from proxy.store.base import KeyRecord

T = TypeVar("T")
KEY = "key-1"
STEP_TIMEOUT_S = 10.0   # every awaited step is bounded: a hang fails, it does not stall the run


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, STEP_TIMEOUT_S)


@dataclass
class FakeClock:
    now: float = 1_700_000_000.5     # 2023-11-14 22:13:20.5 UTC

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    url: str
    clock: FakeClock = field(default_factory=FakeClock)
    made: list[Limiter] = field(default_factory=list)

    def make(self, ttl_s: float = 900, spend_seed: SpendSeed | None = None) -> Limiter:
        lim: Limiter
        if self.name == "memory":
            lim = MemoryLimiter(clock=self.clock, reservation_ttl_s=ttl_s, spend_seed=spend_seed)
        else:
            # Semantics, not timeouts (test_redis_outage_* has the fail-fast ones): bursts of
            # 100 admissions open ~100 connections at once, and the default connect
            # timeout (0.5 s, loop delays included) failed one now and then on a busy machine.
            lim = RedisLimiter(self.url, reservation_ttl_s=ttl_s, spend_seed=spend_seed, socket_timeout_s=10.0)
        self.made.append(lim)
        return lim

    async def advance(self, seconds: float) -> None:
        """Let time pass: the fake clock jumps; against Redis (whose TIME is the clock) we wait."""
        if self.name == "memory":
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    def now(self) -> float:
        return self.clock.now if self.name == "memory" else time.time()


@asynccontextmanager
async def _backend(name: str, url: str) -> AsyncIterator[Backend]:
    if name == "redis":                      # every test starts from an empty db
        r = Redis.from_url(url)
        await r.flushdb()
        await r.aclose()
    b = Backend(name, url)
    try:
        yield b
    finally:
        for lim in b.made:
            await lim.close()


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else "memory://"
    async with _backend(request.param, url) as b:
        yield b


@pytest.fixture
async def redis_backend(redis_url: str) -> AsyncIterator[Backend]:
    async with _backend("redis", redis_url) as b:
        yield b


async def admit_many(
    lims: Sequence[Limiter], spec: LimitSpec, n: int, tokens: int = 1, costs: Sequence[float] | None = None
) -> list[Decision]:
    """n concurrent admissions, spread round-robin over the limiters."""
    return await bounded(asyncio.gather(*(
        lims[i % len(lims)].admit(KEY, spec, f"req-{i}", tokens, costs[i] if costs else 0.0) for i in range(n)
    )))


def admitted(ds: Sequence[Decision]) -> list[Decision]:
    return [d for d in ds if d.admitted]


async def test_rpm_burst_admits_exactly_the_limit(backend: Backend) -> None:
    lim = backend.make()
    ds = await admit_many([lim], LimitSpec(rpm=10), 100)
    assert len(admitted(ds)) == 10
    refused = [d for d in ds if not d.admitted]
    assert {d.reason for d in refused} == {"rpm"}
    assert all(59 <= d.retry_after_s <= 60 and d.remaining_requests == 0 for d in refused)
    assert all(d.reservation is None for d in refused)


async def test_parallel_burst_and_settle_releases_once(backend: Backend) -> None:
    lim = backend.make()
    spec = LimitSpec(max_parallel=5)
    ds = await admit_many([lim], spec, 50)
    ok = admitted(ds)
    assert len(ok) == 5
    assert {d.reason for d in ds if not d.admitted} == {"parallel"}
    assert all(d.retry_after_s == 1 for d in ds if not d.admitted)
    first = ok[0].reservation
    assert first is not None
    await lim.settle(first, 1, 0.0)
    await lim.settle(first, 1, 0.0)          # idempotent: frees one slot, not two
    again = await bounded(asyncio.gather(*(lim.admit(KEY, spec, f"b-{i}", 1, 0.0) for i in range(10))))
    assert len(admitted(again)) == 1


async def test_tpm_reserves_then_settles_to_actual(backend: Backend) -> None:
    lim = backend.make()
    spec = LimitSpec(tpm=1000)
    a = await lim.admit(KEY, spec, "a", 600, 0.0)
    assert a.admitted and a.remaining_tokens == 400 and a.limit_tokens == 1000
    b = await lim.admit(KEY, spec, "b", 500, 0.0)
    assert not b.admitted and b.reason == "tpm" and 59 <= b.retry_after_s <= 60
    assert a.reservation is not None
    await lim.settle(a.reservation, 100, 0.0)
    await lim.settle(a.reservation, 100, 0.0)
    c = await lim.admit(KEY, spec, "c", 500, 0.0)
    assert c.admitted and c.remaining_tokens == 400
    assert not (await lim.admit(KEY, spec, "d", 401, 0.0)).admitted
    assert (await lim.admit(KEY, spec, "e", 400, 0.0)).remaining_tokens == 0
    # Larger than the whole tpm: never fits, waiting a full window is the honest answer.
    huge = await lim.admit(KEY, LimitSpec(tpm=10), "f", 11, 0.0)
    assert huge.reason == "tpm" and huge.retry_after_s == 60


async def test_budget_race_never_overspends(backend: Backend) -> None:
    lim = backend.make()
    spec = LimitSpec(budget_usd=0.05)
    ds = await admit_many([lim], spec, 50, costs=[0.01] * 50)
    ok = admitted(ds)
    assert len(ok) == 5                      # spent + reserved + estimate <= budget, exactly
    assert {d.reason for d in ds if not d.admitted} == {"budget"}
    # In-flight reservations fill the budget: they may settle lower, so retry soon.
    assert all(d.retry_after_s == 1 for d in ds if not d.admitted)
    for d in ok:
        assert d.reservation is not None
        await lim.settle(d.reservation, 10, 0.01)
    spent = await lim.admit(KEY, spec, "late", 1, 0.001)
    assert spent.reason == "budget" and spent.retry_after_s == 0   # lifetime budget: no recovery


async def test_budget_race_uneven_costs(backend: Backend) -> None:
    lim = backend.make()
    rnd = random.Random(5)
    costs = [rnd.choice([0.001, 0.003, 0.007, 0.01]) for _ in range(50)]
    ds = await admit_many([lim], LimitSpec(budget_usd=0.05), 50, costs=costs)
    reserved = sum(d.reservation.cost_usd for d in ds if d.reservation is not None)
    assert 0.04 < reserved <= 0.05 + 1e-12   # filled close to the budget, never beyond it


async def test_refusal_reserves_nothing(backend: Backend) -> None:
    lim = backend.make()
    spec = LimitSpec(rpm=3, tpm=100, max_parallel=1)
    a = await lim.admit(KEY, spec, "a", 10, 0.0)
    assert a.admitted and a.reservation is not None
    refused = await admit_many([lim], spec, 5, tokens=10)
    assert {d.reason for d in refused} == {"parallel"}
    await lim.settle(a.reservation, 10, 0.0)
    for rid in ("b", "c"):                   # rpm and tpm untouched by the refusals
        d = await lim.admit(KEY, spec, rid, 10, 0.0)
        assert d.admitted and d.reservation is not None
        await lim.settle(d.reservation, 10, 0.0)
    assert d.remaining_requests == 0 and d.remaining_tokens == 70
    assert (await lim.admit(KEY, spec, "d", 10, 0.0)).reason == "rpm"

    spec2 = LimitSpec(rpm=2, budget_usd=0.01)
    for i in range(3):
        assert (await lim.admit("key-2", spec2, f"x{i}", 1, 0.02)).reason == "budget"
    for i in range(2):
        assert (await lim.admit("key-2", spec2, f"y{i}", 1, 0.001)).admitted


async def test_headers_and_retry_after(backend: Backend) -> None:
    lim = backend.make()
    spec = LimitSpec(rpm=3, tpm=100)
    for i, left in enumerate((2, 1, 0)):
        d = await lim.admit(KEY, spec, f"r{i}", 10, 0.0)
        assert d.admitted and d.limit_requests == 3 and d.remaining_requests == left
        assert d.remaining_tokens == 90 - 10 * i
        assert d.reset_requests_s is not None and 59 < d.reset_requests_s <= 60
        assert d.reset_tokens_s is not None and 59 < d.reset_tokens_s <= 60
    d = await lim.admit(KEY, spec, "r3", 10, 0.0)
    assert not d.admitted and d.reason == "rpm" and 59 <= d.retry_after_s <= 60
    # Both rpm and tpm refuse: rpm names the reason; the longer wait is reported.
    d = await lim.admit(KEY, spec, "r4", 95, 0.0)
    assert d.reason == "rpm" and 59 <= d.retry_after_s <= 60
    rpm_only = await lim.admit("key-3", LimitSpec(rpm=1), "z", 10, 0.0)
    assert rpm_only.limit_tokens is None and rpm_only.remaining_tokens is None


async def test_reservation_ttl_frees_slot_and_late_settle_still_charges(backend: Backend) -> None:
    lim = backend.make(ttl_s=0.5)           # expires 0.5 s after admission, forgotten at 1 s
    par, spec = LimitSpec(max_parallel=1), LimitSpec(budget_usd=0.05)
    assert (await lim.admit(KEY, par, "p1", 1, 0.0)).admitted
    r1 = await lim.admit("key-b", spec, "b1", 1, 0.05)
    f1 = await lim.admit("key-f", spec, "f1", 1, 0.05)
    assert r1.reservation is not None and f1.reservation is not None
    await backend.advance(0.25)
    assert (await lim.admit(KEY, par, "p2", 1, 0.0)).reason == "parallel"
    refused = await lim.admit("key-b", spec, "b2", 1, 0.01)
    assert refused.reason == "budget" and refused.retry_after_s == 1

    await backend.advance(0.3)              # expired, not yet forgotten
    assert (await lim.admit(KEY, par, "p3", 1, 0.0)).admitted
    r2 = await lim.admit("key-b", spec, "b3", 1, 0.01)
    assert r2.admitted and r2.reservation is not None
    await lim.settle(r1.reservation, 1, 0.04)   # late: still charged (0.04 spent)
    await lim.settle(r1.reservation, 1, 0.04)   # ... once
    assert (await lim.admit("key-b", spec, "b4", 1, 0.01)).reason == "budget"
    await lim.settle(r2.reservation, 1, 0.0)
    assert (await lim.admit("key-b", spec, "b5", 1, 0.01)).admitted   # 0.04 + 0.01 <= 0.05

    await backend.advance(0.5)              # f1 is forgotten: settling it charges nothing
    await lim.settle(f1.reservation, 1, 0.05)
    assert (await lim.admit("key-f", spec, "f2", 1, 0.05)).admitted


def _period_start(now: float, period: str) -> tuple[float, float]:
    dt = datetime.fromtimestamp(now, tz=timezone.utc)
    if period == "day":
        start = dt.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp(), (start + timedelta(days=1)).timestamp()
    start = dt.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp(), (start + timedelta(days=32)).replace(day=1).timestamp()


@pytest.mark.parametrize("period", ["day", "month"])
async def test_spend_seed_called_once_and_honoured(backend: Backend, period: str) -> None:
    calls: list[tuple[str, float]] = []

    async def seed(key_id: str, since: float) -> float:
        calls.append((key_id, since))
        await asyncio.sleep(0.01)            # a store query: concurrent admits wait for it
        return 0.04

    lim = backend.make(spend_seed=seed)
    spec = LimitSpec(budget_usd=0.05, budget_period=period)
    start, end = _period_start(backend.now(), period)
    ds = await admit_many([lim], spec, 20, costs=[0.02] * 20)
    assert calls == [(KEY, start)]
    assert {d.reason for d in ds} == {"budget"}
    expected_wait = end - backend.now()
    assert all(abs(d.retry_after_s - expected_wait) <= 2 for d in ds)
    ok = await lim.admit(KEY, spec, "small", 1, 0.01)
    assert ok.admitted and calls == [(KEY, start)]


async def test_failing_spend_seed_is_unavailable(backend: Backend) -> None:
    async def seed(key_id: str, since: float) -> float:
        raise OSError("store down")

    lim = backend.make(spend_seed=seed)
    with pytest.raises(LimiterUnavailable):
        await lim.admit(KEY, LimitSpec(budget_usd=1.0), "a", 1, 0.01)


async def test_empty_spec_is_admitted(backend: Backend) -> None:
    lim = backend.make()
    d = await lim.admit(KEY, LimitSpec(), "a", 10**9, 10.0)
    assert d.admitted and d.reservation is not None and d.limit_requests is None
    await lim.settle(d.reservation, 1, 0.0)


# --- Redis only -------------------------------------------------------------------------


async def test_empty_spec_never_touches_redis(redis_url: str) -> None:
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://:s3cret-pw@127.0.0.1:{s.getsockname()[1]}/0"
    lim = RedisLimiter(dead)
    try:
        d = await bounded(lim.admit(KEY, LimitSpec(), "a", 1, 0.0))
        assert d.admitted and d.reservation is not None
        await bounded(lim.settle(d.reservation, 1, 0.0))
        with pytest.raises(LimiterUnavailable) as err:
            await bounded(lim.admit(KEY, LimitSpec(rpm=1), "b", 1, 0.0))
        assert "s3cret" not in str(err.value) and "127.0.0.1" not in str(err.value)
    finally:
        await lim.close()


async def test_two_limiters_share_one_redis(redis_backend: Backend) -> None:
    a, b = redis_backend.make(), redis_backend.make()
    assert len(admitted(await admit_many([a, b], LimitSpec(rpm=10), 100))) == 10
    ds = await bounded(asyncio.gather(*(
        (a, b)[i % 2].admit("key-p", LimitSpec(max_parallel=7), f"p{i}", 1, 0.0) for i in range(100)
    )))
    assert len(admitted(ds)) == 7
    ds = await bounded(asyncio.gather(*(
        (a, b)[i % 2].admit("key-t", LimitSpec(tpm=1000), f"t{i}", 30, 0.0) for i in range(100)
    )))
    assert len(admitted(ds)) == 33


async def test_redis_keys_are_namespaced_and_expire(redis_backend: Backend) -> None:
    lim = redis_backend.make()
    spec = LimitSpec(rpm=5, tpm=100, max_parallel=2, budget_usd=1.0, budget_period="day")
    d = await lim.admit(KEY, spec, "a", 10, 0.01)
    assert d.admitted
    r = Redis.from_url(redis_backend.url)
    try:
        keys = sorted(k.decode() for k in await r.keys("*"))
        assert keys and all(k.startswith(f"llmp:{{{KEY}}}:") for k in keys)
        assert all(ttl > 0 for ttl in [await r.pttl(k) for k in keys])
    finally:
        await r.aclose()


async def test_redis_outage_fails_fast_and_recovers(redis_server: RedisServer) -> None:
    calls: list[float] = []

    async def seed(key_id: str, since: float) -> float:
        calls.append(since)
        return 0.0

    lim = RedisLimiter(redis_server.url, spend_seed=seed)
    spec = LimitSpec(rpm=100, max_parallel=10, budget_usd=1.0)
    try:
        ok = await bounded(lim.admit(KEY, spec, "before", 1, 0.01))
        assert ok.admitted and ok.reservation is not None and len(calls) == 1
        await bounded(lim.ping())

        redis_server.kill()
        for call in (
            lambda: lim.admit(KEY, spec, "during", 1, 0.01),
            lambda: lim.settle(ok.reservation, 1, 0.01),     # type: ignore[arg-type]
            lim.ping,
        ):
            started = time.monotonic()
            with pytest.raises(LimiterUnavailable):
                await bounded(call())
            assert time.monotonic() - started < 2.0

        redis_server.start()                 # same port, empty data
        after = await bounded(lim.admit(KEY, spec, "after", 1, 0.01))
        assert after.admitted
        assert len(calls) == 2               # the lost spend counter was re-seeded
        await bounded(lim.ping())
    finally:
        await lim.close()


async def test_make_limiter_picks_backend() -> None:
    assert isinstance(make_limiter("memory://"), MemoryLimiter)
    lim = make_limiter("redis://127.0.0.1:1/0")
    assert isinstance(lim, RedisLimiter)
    await lim.close()
    with pytest.raises(ValueError):
        make_limiter("http://nope")


async def test_memory_backend_admits_and_settles_without_waiting() -> None:
    """The in-process backend answers admit_now at once (a budget's first request seeds
    first) and settles inline: no coroutine on admission, no task per settlement."""
    async def seed(key_id: str, since: float) -> float:
        return 0.0

    lim = MemoryLimiter(spend_seed=seed)
    key = KeyRecord(id="key-m", name="m", prefix="sk-m", digest="d", models=(), rpm=100, tpm=10_000,
                    max_parallel=5, budget_usd=10.0, budget_period="day", expires_at=None, revoked_at=None,
                    created_at=0.0)
    admission = Admission(lim, fail_open=False)
    assert admission.admit_now(key, "first", 10, 0.01) is None          # the day's spend is seeded first
    reservation, lines = await admission.admit(key, "first", 10, 0.01)
    assert reservation is not None and b"x-ratelimit-remaining-requests: 99\r\n" in lines
    admitted = admission.admit_now(key, "second", 10, 0.01)
    assert admitted is not None and admitted[0] is not None
    for r in (reservation, admitted[0]):
        admission.settle(r, 5, 0.001)
    assert not admission._settling                                      # settled inline
    third = lim.admit_now(key.id, LimitSpec(100, 10_000, 5, 10.0, "day"), "third", 10, 0.01)
    assert third is not None and third.remaining_tokens == 10_000 - 5 - 5 - 10   # settled amounts count
