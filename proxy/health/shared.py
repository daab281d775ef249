"""Breaker states shared by every gateway process through Redis (limits.url is Redis).

One hash, `llm-proxy:routes`: a field per route with an unhealthy state, valued
"fails level until_ms probe_ms". Every transition is one Lua script (the same rules as
`breaker.py`, in milliseconds), so two processes that fail the same route at once count
two failures and only one of them gets a half-open route's probe. Processes read the
whole hash every `routing.shared_sync_s` (a handful of fields: only unhealthy routes
are stored) and after each transition they made themselves.
"""

from __future__ import annotations

from proxy.health.breaker import BreakerState, Policy
from proxy.limits.resp import RedisAddress, RedisClient, Script, bulks, pack

HASH = b"llm-proxy:routes"

_LOAD = """
local function load(v)
  if not v then return 0, 0, 0, 0 end
  local a, b, c, d = string.match(v, "(%d+) (%d+) (%d+) (%d+)")
  return tonumber(a), tonumber(b), tonumber(c), tonumber(d)
end
local function save(fails, level, untl, probe)
  local v = string.format("%d %d %d %d", math.floor(fails), math.floor(level), math.floor(untl), math.floor(probe))
  redis.call("HSET", KEYS[1], ARGV[1], v)
  return v
end
"""

# ARGV: field, now_ms, failures, cooldown_ms, max_cooldown_ms, retry_after_ms (0: none), max_retry_after_ms
_FAILURE = Script(_LOAD + """
local fails, level, untl, probe = load(redis.call("HGET", KEYS[1], ARGV[1]))
local now = tonumber(ARGV[2])
local told = math.min(tonumber(ARGV[6]), tonumber(ARGV[7]))
fails = fails + 1
if untl > 0 and now < untl then
  untl = math.max(untl, now + told)
else
  local tripped = untl > 0 or fails >= tonumber(ARGV[3])
  if tripped or told > 0 then
    local cooldown = told
    if tripped then
      cooldown = math.max(math.min(tonumber(ARGV[4]) * 2 ^ math.min(level, 30), tonumber(ARGV[5])), told)
    end
    level = level + 1
    untl = now + cooldown
    probe = 0
  end
end
return save(fails, level, untl, probe)
""")

# ARGV: field, now_ms
_SUCCESS = Script(_LOAD + """
local v = redis.call("HGET", KEYS[1], ARGV[1])
local fails, level, untl, probe = load(v)
if untl > 0 and tonumber(ARGV[2]) < untl then return v end
redis.call("HDEL", KEYS[1], ARGV[1])
return "0 0 0 0"
""")

# ARGV: field, now_ms, lease_ms
_CLAIM = Script(_LOAD + """
local fails, level, untl, probe = load(redis.call("HGET", KEYS[1], ARGV[1]))
local now = tonumber(ARGV[2])
if untl > 0 and now >= untl and probe <= now then
  return save(fails, level, untl, now + tonumber(ARGV[3]))
end
return false
""")

# ARGV: field, lease_ms
_RELEASE = Script(_LOAD + """
local v = redis.call("HGET", KEYS[1], ARGV[1])
if not v then return 0 end
local fails, level, untl, probe = load(v)
if probe == tonumber(ARGV[2]) then save(fails, level, untl, 0) end
return 1
""")


def _field(key: tuple[str, str]) -> bytes:
    return key[0].encode() + b"\x00" + key[1].encode()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _state(value: object) -> BreakerState:
    if not isinstance(value, bytes):
        raise ValueError("unexpected reply for a route state")
    fails, level, until, probe = (int(p) for p in value.split())
    return BreakerState(fails, level, until / 1000, probe / 1000)


class RedisStates:
    def __init__(self, url: str, policy: Policy, client: RedisClient | None = None) -> None:
        self._redis = client or RedisClient(RedisAddress.parse(url))
        self.policy = policy
        self._keys = bulks([HASH])

    async def _run(self, script: Script, *args: str | bytes | int) -> object:
        return await self._redis.run(script, self._keys, 1, bulks(args), len(args))

    async def failure(self, key: tuple[str, str], now: float, retry_after: float | None) -> BreakerState:
        p = self.policy
        reply = await self._run(
            _FAILURE, _field(key), _ms(now), p.failures, _ms(p.cooldown_s), _ms(p.max_cooldown_s),
            _ms(retry_after) if retry_after and retry_after > 0 else 0, _ms(p.max_retry_after_s),
        )
        return _state(reply)

    async def success(self, key: tuple[str, str], now: float) -> BreakerState:
        return _state(await self._run(_SUCCESS, _field(key), _ms(now)))

    async def claim(self, key: tuple[str, str], now: float) -> BreakerState | None:
        reply = await self._run(_CLAIM, _field(key), _ms(now), _ms(self.policy.probe_timeout_s))
        return None if reply is None else _state(reply)

    async def release(self, key: tuple[str, str], lease: float) -> None:
        await self._run(_RELEASE, _field(key), _ms(lease))

    async def snapshot(self) -> dict[tuple[str, str], BreakerState]:
        reply = await self._redis.execute(pack(b"HGETALL", HASH))
        out: dict[tuple[str, str], BreakerState] = {}
        if not isinstance(reply, list):
            return out
        for name, value in zip(reply[::2], reply[1::2], strict=True):
            if isinstance(name, bytes) and b"\x00" in name:
                upstream, model = name.decode().split("\x00", 1)
                out[(upstream, model)] = _state(value)
        return out

    async def close(self) -> None:
        await self._redis.close()
