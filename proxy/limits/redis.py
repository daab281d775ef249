"""Redis limiter: exact across processes (semantics: see the comment in base.py).

One Lua script per admission and one per settlement, so check-and-reserve is a single
atomic step on the server; `redis.call('TIME')` is the only clock (also for budget
periods), so process clocks never disagree. All keys of an API key share the hash tag
`llmp:{key_id}:` (one cluster slot) and every write refreshes a TTL.

Integers only: timestamps in microseconds, spend in nano-USD. Lua 5.1 formats numbers
with %.14g when concatenating and Redis may print large ones in exponent form, so every
number handed back to Redis goes through I() (exact integer text).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast, get_args

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
from proxy.limits.resp import RedisAddress, RedisClient, RedisError, Reply, Script, bulks, pack

SPEND_TTL_MS = 40 * 86_400 * 1000   # an idle key's spend counter is re-seeded from the store
_NEED_SEED = 2
_SEED_ZERO = -2                     # no SpendSeed configured: new counters start at 0
_NO_SEED = -1                       # no seed value offered in this call
_REASONS = frozenset(get_args(Reason))

# ARGV common to both scripts: window_us, ttl_us, spend_ttl_ms, rid, tokens, cost.
_LUA_COMMON = """
local function I(x) return string.format('%.0f', x + 0) end   -- + 0: never '-0' (Redis rejects it)
local WINDOW, ttl, SPEND_MS = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local rid, tokens, cost = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local K_RPM, K_TPM, K_TPMV, K_LIVE, K_STALE, K_HELD, K_SUMS, K_SPENT = unpack(KEYS)
local WIN_MS = math.floor(WINDOW / 1000) + 1000          -- key TTLs: a window, or 2 ttl
local HOLD_MS = math.floor(2 * ttl / 1000) + 1000
local SUMS_MS = math.max(WIN_MS, HOLD_MS)
local function chunks(list, fn)    -- unpack() has a stack limit: work in slices
  for i = 1, #list, 500 do fn({unpack(list, i, math.min(i + 499, #list))}) end
end
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now = now_s * 1000000 + tonumber(t[2])
"""

# period_bounds(now_s, kind) -> start, end (unix s, UTC; end -1 for a lifetime budget).
# Civil-date algorithms (proleptic Gregorian): Lua in Redis has no calendar.
LUA_PERIOD_BOUNDS = """
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function period_bounds(now_s, kind)
  if kind == 'day' then
    local start = now_s - now_s % 86400
    return start, start + 86400
  elseif kind == 'month' then
    local y, m = civil_from_days(math.floor(now_s / 86400))
    local start = days_from_civil(y, m, 1) * 86400
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    return start, days_from_civil(y, m, 1) * 86400
  end
  return 0, -1
end
"""

# KEYS: rpm, tpm, tpmv, live, stale, held, sums, spent
#   rpm   zset  "<ts>:<rid>" -> admission ts
#   tpm   zset  rid -> admission ts;     tpmv hash rid -> tokens;   sums.tpm = sum(tpmv)
#   live  zset  rid -> expiry ts;        held hash rid -> "<cost> <period>" (live or stale)
#   stale zset  rid -> forget ts (expired reservations a late settlement may still charge)
#   sums  hash  tpm, reserved (nano-USD of live reservations)
#   spent hash  period start (s) -> nano-USD
# ARGV after the common six: rpm, tpm, max_parallel, budget (-1 = unset), period kind
#       (life|day|month), seed period (-1 none offered, -2 start at zero), seed value
_ADMIT_LUA = _LUA_COMMON + LUA_PERIOD_BOUNDS + """
local rpm, tpm, maxp, budget = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local pkind, seed_period, seed_value = ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13])

-- The budget period's spend counter must exist (seeded once) before anything is checked.
local period, period_end, spent = 0, -1, 0
if budget >= 0 then
  period, period_end = period_bounds(now_s, pkind)
  local s = redis.call('HGET', K_SPENT, I(period))
  if not s then
    if seed_period ~= period and seed_period ~= -2 then return {2, I(period)} end
    s = (seed_period == -2) and 0 or seed_value
    -- Keep the last month of periods (late settlements), drop older ones.
    for _, f in ipairs(redis.call('HKEYS', K_SPENT)) do
      if tonumber(f) < period - 32 * 86400 then redis.call('HDEL', K_SPENT, f) end
    end
    redis.call('HSET', K_SPENT, I(period), I(s))
    redis.call('PEXPIRE', K_SPENT, SPEND_MS)
  end
  spent = tonumber(s)
end

-- Prune: windows by admission ts, reservations by expiry.
local cutoff = now - WINDOW
if rpm >= 0 then redis.call('ZREMRANGEBYSCORE', K_RPM, '-inf', I(cutoff)) end
if tpm >= 0 then
  local old = redis.call('ZRANGEBYSCORE', K_TPM, '-inf', I(cutoff))
  if #old > 0 then
    local gone = 0
    chunks(old, function(c)
      for _, v in ipairs(redis.call('HMGET', K_TPMV, unpack(c))) do gone = gone + (tonumber(v) or 0) end
      redis.call('HDEL', K_TPMV, unpack(c))
    end)
    redis.call('ZREMRANGEBYSCORE', K_TPM, '-inf', I(cutoff))
    redis.call('HINCRBY', K_SUMS, 'tpm', I(-gone))
  end
  if redis.call('ZCARD', K_TPM) == 0 and redis.call('HEXISTS', K_SUMS, 'tpm') == 1 then
    redis.call('DEL', K_TPMV)              -- self-heal: an empty window sums to 0
    redis.call('HDEL', K_SUMS, 'tpm')
  end
end
local live_n = 0                                   -- reservations live after the expiry below
if maxp >= 0 or budget >= 0 then
  local exp = redis.call('ZRANGEBYSCORE', K_LIVE, '-inf', I(now), 'WITHSCORES')
  if #exp > 0 then
    local ids, freed = {}, 0
    for i = 1, #exp, 2 do
      ids[#ids + 1] = exp[i]
      redis.call('ZADD', K_STALE, I(tonumber(exp[i + 1]) + ttl), exp[i])
    end
    chunks(ids, function(c)
      for _, v in ipairs(redis.call('HMGET', K_HELD, unpack(c))) do
        if v then freed = freed + tonumber(string.match(v, '^(%S+)')) end
      end
    end)
    redis.call('ZREMRANGEBYSCORE', K_LIVE, '-inf', I(now))
    redis.call('HINCRBY', K_SUMS, 'reserved', I(-freed))
  end
  local forgotten = redis.call('ZRANGEBYSCORE', K_STALE, '-inf', I(now))
  if #forgotten > 0 then
    chunks(forgotten, function(c) redis.call('HDEL', K_HELD, unpack(c)) end)
    redis.call('ZREMRANGEBYSCORE', K_STALE, '-inf', I(now))
  end
  live_n = redis.call('ZCARD', K_LIVE)
  if live_n == 0 then
    redis.call('HDEL', K_SUMS, 'reserved')  -- self-heal: nothing live reserves nothing
    if redis.call('ZCARD', K_STALE) == 0 then redis.call('DEL', K_HELD) end
  end
end

-- Check every limit; the first refusal names the reason.
local reason, wait = '', 0
local function refuse(r, w)
  if reason == '' then reason, wait = r, w
  elseif reason ~= 'budget' and w > wait then wait = w end
end
if budget >= 0 then
  local reserved = tonumber(redis.call('HGET', K_SUMS, 'reserved') or '0')
  if spent + reserved + cost > budget then
    if spent + cost <= budget then refuse('budget', 1000000)
    elseif period_end < 0 then refuse('budget', -1)
    else refuse('budget', period_end * 1000000 - now) end
  end
end
local rpm_used = 0
if rpm >= 0 then
  rpm_used = redis.call('ZCARD', K_RPM)
  if rpm_used >= rpm then
    local e = redis.call('ZRANGE', K_RPM, rpm_used - rpm, rpm_used - rpm, 'WITHSCORES')
    refuse('rpm', e[2] and (tonumber(e[2]) + WINDOW - now) or WINDOW)
  end
end
local tpm_used = 0
if tpm >= 0 then
  tpm_used = tonumber(redis.call('HGET', K_SUMS, 'tpm') or '0')
  if tpm_used + tokens > tpm then
    -- Walk the oldest entries until enough have left the window.
    local w, left = WINDOW, tpm_used
    local all = redis.call('ZRANGE', K_TPM, 0, -1, 'WITHSCORES')
    local ids = {}
    for i = 1, #all, 2 do ids[#ids + 1] = all[i] end
    local vals = {}
    chunks(ids, function(c)
      for _, v in ipairs(redis.call('HMGET', K_TPMV, unpack(c))) do vals[#vals + 1] = tonumber(v) or 0 end
    end)
    for i = 1, #vals do
      left = left - vals[i]
      if left + tokens <= tpm then w = tonumber(all[2 * i]) + WINDOW - now; break end
    end
    refuse('tpm', w)
  end
end
if maxp >= 0 and live_n >= maxp then refuse('parallel', 1000000) end

local function newest(k)
  local e = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  if e[2] then return tonumber(e[2]) + WINDOW - now end
  return 0
end
if reason ~= '' then
  return {0, reason, I(wait), rpm_used, I(newest(K_RPM)), I(tpm_used), I(newest(K_TPM))}
end

-- Reserve everything.
if rpm >= 0 then
  redis.call('ZADD', K_RPM, I(now), I(now) .. ':' .. rid)
  redis.call('PEXPIRE', K_RPM, WIN_MS)
  rpm_used = rpm_used + 1
end
if tpm >= 0 then
  local prev = tonumber(redis.call('HGET', K_TPMV, rid) or '0')
  redis.call('ZADD', K_TPM, I(now), rid)
  redis.call('HSET', K_TPMV, rid, I(tokens))
  redis.call('HINCRBY', K_SUMS, 'tpm', I(tokens - prev))
  redis.call('PEXPIRE', K_TPM, WIN_MS)
  redis.call('PEXPIRE', K_TPMV, WIN_MS)
  tpm_used = tpm_used + tokens - prev
end
if maxp >= 0 or budget >= 0 then
  local prev = redis.call('HGET', K_HELD, rid)   -- a re-admitted id replaces its reservation
  if prev and redis.call('ZREM', K_LIVE, rid) == 1 then
    redis.call('HINCRBY', K_SUMS, 'reserved', I(-tonumber(string.match(prev, '^(%S+)'))))
  end
  redis.call('ZREM', K_STALE, rid)
  local held_cost, held_period = 0, -1
  if budget >= 0 then held_cost, held_period = cost, period end
  redis.call('ZADD', K_LIVE, I(now + ttl), rid)
  redis.call('HSET', K_HELD, rid, I(held_cost) .. ' ' .. I(held_period))
  redis.call('HINCRBY', K_SUMS, 'reserved', I(held_cost))
  redis.call('PEXPIRE', K_LIVE, HOLD_MS)
  redis.call('PEXPIRE', K_STALE, HOLD_MS)
  redis.call('PEXPIRE', K_HELD, HOLD_MS)
end
if tpm >= 0 or maxp >= 0 or budget >= 0 then redis.call('PEXPIRE', K_SUMS, SUMS_MS) end
-- A set window's newest entry is this admission: it resets a full window from now (as
-- in memory.py; an unset limit's reset is not used).
local full = I(WINDOW)
return {1, '', '0', rpm_used, rpm >= 0 and full or '0', I(tpm_used), tpm >= 0 and full or '0'}
"""

# KEYS as above; ARGV: the common six (tokens and cost are the actual ones).
_SETTLE_LUA = _LUA_COMMON + """
-- tpm: still in the window? correct the amount in place (idempotent: set, not add).
local sums = false                 -- written: its TTL is refreshed once, at the end
local old = redis.call('HGET', K_TPMV, rid)
if old then
  redis.call('HSET', K_TPMV, rid, I(tokens))
  redis.call('HINCRBY', K_SUMS, 'tpm', I(tokens - tonumber(old)))
  sums = true
end
-- The held record exists until the first settlement: charge once, release the slot.
-- Charged only before its forget time (expiry + ttl), judged by the clock, not by
-- whether an admission has pruned it yet (so both backends agree).
local h = redis.call('HGET', K_HELD, rid)
if h then
  local held_cost, period = string.match(h, '^(%S+) (%S+)$')
  local forget = 0
  local expiry = redis.call('ZSCORE', K_LIVE, rid)
  if expiry then
    forget = tonumber(expiry) + ttl
    redis.call('ZREM', K_LIVE, rid)
    redis.call('HINCRBY', K_SUMS, 'reserved', I(-tonumber(held_cost)))
    sums = true
  else
    forget = tonumber(redis.call('ZSCORE', K_STALE, rid) or '0')
    redis.call('ZREM', K_STALE, rid)
  end
  redis.call('HDEL', K_HELD, rid)
  if forget > now and tonumber(period) >= 0 and redis.call('HEXISTS', K_SPENT, period) == 1 then
    redis.call('HINCRBY', K_SPENT, period, I(cost))
    redis.call('PEXPIRE', K_SPENT, SPEND_MS)
  end
end
if sums then redis.call('PEXPIRE', K_SUMS, SUMS_MS) end
return 1
"""


_KEY_NAMES = ("rpm", "tpm", "tpmv", "live", "stale", "held", "sums", "spent")
_ADMIT = Script(_ADMIT_LUA)
_SETTLE = Script(_SETTLE_LUA)


def _keys(key_id: str) -> list[str]:
    prefix = f"llmp:{{{key_id}}}:"
    return [prefix + name for name in _KEY_NAMES]


def _opt(value: int | None) -> int:
    return -1 if value is None else int(value)


def _spec_args(spec: LimitSpec) -> bytes:
    """ARGV 7-11 of the admission script: the spec's limits, packed."""
    budget = -1 if spec.budget_usd is None else usd_to_nano(spec.budget_usd)
    return bulks((_opt(spec.rpm), _opt(spec.tpm), _opt(spec.max_parallel), budget, spec.budget_period or "life"))


# ARGV: the six common to both scripts, the spec's five (admission), the seed offer's two.
_SETTLE_NARGS = 6
_ADMIT_NARGS = 13
_SEED_ZERO_OFFER = bulks((_SEED_ZERO, 0))
_NO_SEED_OFFER = bulks((_NO_SEED, 0))


class RedisLimiter:
    def __init__(
        self,
        url: str,
        reservation_ttl_s: float = 900,
        spend_seed: SpendSeed | None = None,
        *,
        socket_timeout_s: float = 1.0,
    ) -> None:
        self._ttl_us = round(reservation_ttl_s * US_PER_S)
        self._spend_seed = spend_seed
        # Fail fast when Redis is gone: a command unanswered within the timeout fails
        # (and is not re-run); a connection lost after serving earlier commands (a Redis
        # restart) is replaced once at once (resp.py). Both scripts are idempotent per
        # request id, so that one re-send cannot count twice.
        self._redis = RedisClient(
            RedisAddress.parse(url), timeout_s=socket_timeout_s, connect_timeout_s=socket_timeout_s / 2
        )
        # The arguments that repeat are packed once: the first three (constants), each
        # key's eight Redis keys, each spec's five limits (specs repeat per cached key).
        self._constants = bulks((WINDOW_US, self._ttl_us, SPEND_TTL_MS))
        self._packed_keys: dict[str, bytes] = {}
        self._packed_specs: dict[LimitSpec, bytes] = {}
        self._seed_lock = asyncio.Lock()

    async def open(self) -> None:
        """Nothing to do: connections are made on demand, so the gateway starts (and
        answers per its fail-open/closed policy) even while Redis is down."""

    async def close(self) -> None:
        await self._redis.close()

    async def ping(self) -> None:
        try:
            await self._redis.execute(_PING)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def admit(
        self, key_id: str, spec: LimitSpec, request_id: str, tokens: int, cost_usd: float, fresh: bool = False
    ) -> Decision:
        # `fresh` changes nothing here: the id is the member of the window's sorted set.
        tokens = max(0, tokens)
        reservation = Reservation(key_id, request_id, tokens, cost_usd, spec)
        if spec.empty:
            return Decision(admitted=True, reservation=reservation)   # no Redis round trip
        limits = self._packed_specs.get(spec)
        if limits is None:
            check_spec(spec)
            if len(self._packed_specs) >= 10_000:
                self._packed_specs.clear()
            limits = self._packed_specs[spec] = _spec_args(spec)
        args = self._common(request_id, tokens, cost_usd) + limits
        reply = await self._admit(key_id, args + (_SEED_ZERO_OFFER if self._spend_seed is None else _NO_SEED_OFFER))
        if reply[0] == _NEED_SEED:
            # Rare: first request of this key in this period. Serialise seeding, re-check
            # under the lock (another task may have seeded), then offer the store's value.
            async with self._seed_lock:
                reply = await self._admit(key_id, args + _NO_SEED_OFFER)
                while reply[0] == _NEED_SEED:
                    period = int(reply[1])
                    value = await self._seed(key_id, period)
                    reply = await self._admit(key_id, args + bulks((period, value)))
        admitted, reason = reply[0] == 1, _reason(bytes(reply[1]).decode())
        rpm_used, rpm_reset, tpm_used, tpm_reset = (int(x) for x in reply[3:7])
        return make_decision(
            spec, reservation if admitted else None, reason, int(reply[2]),
            rpm_used, rpm_reset, tpm_used, tpm_reset,
        )

    def admit_now(
        self, key_id: str, spec: LimitSpec, request_id: str, tokens: int, cost_usd: float, fresh: bool = False
    ) -> Decision | None:
        return None  # a Redis round trip: admit() it is

    def settle_now(self, reservation: Reservation, tokens: int, cost_usd: float) -> bool:
        return False  # a Redis round trip: settle() it is

    async def settle(self, reservation: Reservation, tokens: int, cost_usd: float) -> None:
        """Idempotent. Raises LimiterUnavailable if Redis is down (the reservation then
        expires by its TTL)."""
        spec = reservation.spec
        if spec.tpm is None and spec.max_parallel is None and spec.budget_usd is None:
            return   # rpm-only or empty: nothing held, no Redis round trip
        await self._run(
            _SETTLE, reservation.key_id, self._common(reservation.request_id, max(0, tokens), cost_usd), _SETTLE_NARGS
        )

    def _common(self, request_id: str, tokens: int, cost_usd: float) -> bytes:
        """ARGV 1-6 of both scripts."""
        return self._constants + bulks((request_id, tokens, usd_to_nano(cost_usd)))

    async def _admit(self, key_id: str, args: bytes) -> list[Any]:
        reply = await self._run(_ADMIT, key_id, args, _ADMIT_NARGS)
        if not isinstance(reply, list) or len(reply) not in (2, 7):   # (need a seed, period) or a decision
            raise LimiterUnavailable("redis limiter: unexpected script reply")
        return reply

    async def _run(self, script: Script, key_id: str, args: bytes, nargs: int) -> Reply:
        keys = self._packed_keys.get(key_id)
        if keys is None:
            if len(self._packed_keys) >= 10_000:
                self._packed_keys.clear()
            keys = self._packed_keys[key_id] = bulks(_keys(key_id))
        try:
            return await self._redis.run(script, keys, len(_KEY_NAMES), args, nargs)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def _seed(self, key_id: str, period: int) -> int:
        assert self._spend_seed is not None   # else the script seeds 0 itself
        try:
            return usd_to_nano(await self._spend_seed(key_id, float(period)))
        except Exception as exc:  # the store behind the seed is down: same as backend down
            raise LimiterUnavailable("spend seed failed") from exc


_PING = pack("PING")


def _unavailable(exc: BaseException) -> LimiterUnavailable:
    # The class name only, as before: never the URL or password.
    return LimiterUnavailable(f"redis limiter unavailable ({type(exc).__name__})")


def _reason(value: str) -> Reason | None:
    if not value:
        return None
    if value not in _REASONS:
        raise LimiterUnavailable("redis limiter: unexpected script reply")
    return cast(Reason, value)
