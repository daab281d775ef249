"""The route breaker's rules, held the same in memory (breaker.py) and in Redis (shared.py,
a real redis-server), plus what an upstream's answer says and how plans are ordered."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.config import BreakerConfig, Config, ModelConfig, RouteConfig, UpstreamConfig
from proxy.health import breaker, retry_after_s
from proxy.health.breaker import CLOSED, BreakerState
from proxy.health.shared import RedisStates
from proxy.health.verdict import Failure, failure_for_status
from proxy.routing import Router

POLICY = BreakerConfig(failures=2, cooldown_s=10, max_cooldown_s=35, max_retry_after_s=60, probe_timeout_s=5)
KEY = ("up", "m")
T0 = 1_700_000_000.0


class Memory:
    """The pure transitions behind the same async interface as RedisStates."""

    def __init__(self) -> None:
        self.state = CLOSED

    async def failure(self, key: tuple[str, str], now: float, retry_after: float | None) -> BreakerState:
        self.state = breaker.after_failure(self.state, now, POLICY, retry_after)
        return self.state

    async def success(self, key: tuple[str, str], now: float) -> BreakerState:
        self.state = breaker.after_success(self.state, now)
        return self.state

    async def claim(self, key: tuple[str, str], now: float) -> BreakerState | None:
        got = breaker.claim(self.state, now, POLICY)
        if got is not None:
            self.state = got
        return got

    async def release(self, key: tuple[str, str], lease: float) -> None:
        self.state = breaker.release(self.state, lease)


@pytest.fixture(params=["memory", "redis"])
async def states(request, redis_server):
    if request.param == "memory":
        yield Memory()
        return
    shared = RedisStates(redis_server.url, POLICY)
    yield shared
    await shared.close()


async def test_the_breaker_contract(states):
    t = T0
    s = await states.failure(KEY, t, None)
    assert s.phase(t) == "failing" and s.fails == 1
    s = await states.failure(KEY, t, None)                  # the threshold: 10 s
    assert (s.phase(t), s.until, s.level) == ("cooldown", t + 10, 1)
    assert await states.claim(KEY, t + 5) is None           # still cooling
    s = await states.failure(KEY, t + 5, None)              # late failure: no escalation
    assert (s.until, s.level) == (t + 10, 1)
    s = await states.success(KEY, t + 6)                    # late success: the cooldown stands
    assert s.until == t + 10
    t += 10
    probe = await states.claim(KEY, t)                      # half-open: one probe
    assert probe is not None and probe.probe_until == t + 5
    assert await states.claim(KEY, t + 1) is None           # ... and only one
    await states.release(KEY, probe.probe_until)            # never used: someone else may
    probe = await states.claim(KEY, t + 1)
    assert probe is not None
    s = await states.failure(KEY, t + 1, None)              # the probe failed: 20 s
    assert (s.until, s.level) == (t + 21, 2)
    t += 21
    assert await states.claim(KEY, t) is not None
    s = await states.failure(KEY, t, None)                  # 40 s, capped at 35
    assert s.until == t + 35
    t += 35
    assert await states.claim(KEY, t) is not None
    assert await states.success(KEY, t) == CLOSED          # the probe answered: closed, reset
    s = await states.failure(KEY, t, 30)                    # a Retry-After trips at once
    assert (s.until, s.fails) == (t + 30, 1)
    s = await states.failure(KEY, t + 1, 3600)              # extends, capped by max_retry_after_s
    assert s.until == t + 61


async def test_redis_states_are_shared_between_clients(redis_server):
    a, b = RedisStates(redis_server.url, POLICY), RedisStates(redis_server.url, POLICY)
    try:
        await a.failure(KEY, T0, None)
        await b.failure(KEY, T0, None)      # two processes, one count: tripped
        assert (await a.snapshot())[KEY].until == T0 + 10
        assert await a.claim(KEY, T0 + 10) is not None
        assert await b.claim(KEY, T0 + 10) is None
        assert await b.success(KEY, T0 + 11) == CLOSED
        assert await a.snapshot() == {}
    finally:
        await a.close()
        await b.close()


@pytest.mark.fast
@pytest.mark.parametrize(
    "status,kind",
    [(429, "rate_limited"), (529, "overloaded"), (503, "overloaded"), (500, "server_error"), (502, "server_error"),
     (401, "auth"), (403, "auth"), (400, None), (404, None), (422, None), (200, None)],
)
def test_which_answers_fail_a_route(status, kind):
    assert failure_for_status(status) == kind


@pytest.mark.fast
def test_retry_after_forms():
    assert retry_after_s({"retry-after": "17"}) == 17
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


@pytest.mark.fast
def test_the_most_telling_failure():
    rate, refused = Failure("rate_limited", 429, 5), Failure("unreachable")
    assert rate.outranks(refused) and not refused.outranks(rate) and refused.outranks(None)
    assert Failure("timeout").outranks(Failure("auth", 401))


def _router(*routes: RouteConfig, fallbacks: tuple[str, ...] = ()) -> Router:
    ups = tuple(UpstreamConfig(n, "http://127.0.0.1:1/v1", api_key="k") for n in ("a", "b", "c", "d"))
    models = (ModelConfig("m", routes, fallbacks), ModelConfig("fb", (RouteConfig("d", "x"),)))
    return Router(Config(upstreams=ups, models=models), rng=random.Random(7))


@pytest.mark.fast
def test_priority_tiers_then_weights_then_fallbacks():
    router = _router(
        RouteConfig("c", "x", priority=1), RouteConfig("a", "x", weight=3), RouteConfig("b", "x", weight=1),
        fallbacks=("fb",),
    )
    firsts = Counter()
    for _ in range(400):
        plan = [r.upstream.name for r in router.plan("m", "openai")]
        assert set(plan[:2]) == {"a", "b"} and plan[2:] == ["c", "d"]
        firsts[plan[0]] += 1
    assert 240 < firsts["a"] < 360   # weight 3 : 1 inside the first tier
