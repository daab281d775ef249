"""Client authentication: which virtual key is calling.

The key may come as `Authorization: Bearer`, `api-key`, `x-api-key`, `x-goog-api-key`,
or `?key=` (Gemini routes only). It is checked for shape first (junk never costs a
store query), then looked up by SHA-256 digest. Answers are cached for
`cache_ttl_s` (so a revocation made by another process takes effect within that time;
the admin API of this process drops the entry at once) and misses are cached too, so
unknown keys cannot hammer the store. Concurrent lookups of one digest share one store
query. The cache is keyed by the full digest; misses live in their own bounded table,
so a flood of random keys cannot push valid keys out.

Fail closed: when the store errors or does not answer within `lookup_timeout_s` and
nothing is cached, the request gets 503 `auth_unavailable`; a key answered before keeps
working from its stale entry for at most `max_stale_s`. No code path builds a default
identity.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar
from urllib.parse import parse_qsl

from proxy.dialects import Dialect
from proxy.errors import InvalidApiKey, ServiceUnavailable
from proxy.http1.server import Request
from proxy.keys import digest_key, well_formed
from proxy.logs import Outage
from proxy.middleware.last_used import LastUsed
from proxy.pipeline import Call
from proxy.store.base import KeyRecord, Store

log = logging.getLogger("llm_proxy.auth")

V = TypeVar("V")
_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")


def extract_key(headers: Mapping[str, str], query: Callable[[], Mapping[str, str]] | None) -> str | None:
    """The credential the caller presented, or None.

    `Authorization` wins when present; a scheme other than Bearer gives "" (a present
    but unusable credential: 401, never a fall-through to another header). `query`
    (Gemini routes only) is called only when no header carries a key.
    """
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        return value if scheme.lower() == "bearer" else ""
    for name in _HEADERS:
        found = headers.get(name)
        if found is not None:
            return found
    if query is not None:
        return query().get("key")
    return None


class KeyCache:
    """digest → (KeyRecord | None, expires_at). Bounded; oldest entries dropped first.

    Hits and misses are kept in separate tables of `max_entries` each.
    """

    def __init__(
        self, ttl_s: float, negative_ttl_s: float, max_entries: int = 100_000, max_stale_s: float = 300.0
    ) -> None:
        self._ttl = ttl_s
        self._neg_ttl = negative_ttl_s
        self._max = max(1, max_entries)
        self._max_stale = max_stale_s
        self._hits: dict[str, tuple[KeyRecord, float]] = {}
        self._misses: dict[str, float] = {}

    def get(self, digest: str, now: float) -> tuple[bool, KeyRecord | None]:
        hit = self._hits.get(digest)
        if hit is not None and hit[1] > now:
            return True, hit[0]
        miss = self._misses.get(digest)
        if miss is not None and miss > now:
            return True, None
        return False, None

    def stale(self, digest: str, now: float | None = None) -> KeyRecord | None:
        """A known key's last answer, for when the store cannot answer (bounded age)."""
        hit = self._hits.get(digest)
        if hit is None:
            return None
        if now is not None and now - hit[1] > self._max_stale:
            return None
        return hit[0]

    def put(self, digest: str, record: KeyRecord | None, now: float) -> None:
        if record is None:
            self._hits.pop(digest, None)
            _bounded_set(self._misses, digest, now + self._neg_ttl, self._max)
        else:
            self._misses.pop(digest, None)
            _bounded_set(self._hits, digest, (record, now + self._ttl), self._max)

    def forget(self, digest: str) -> None:
        self._hits.pop(digest, None)
        self._misses.pop(digest, None)

    def __len__(self) -> int:
        return len(self._hits) + len(self._misses)


def _bounded_set(table: dict[str, V], key: str, value: V, limit: int) -> None:
    table.pop(key, None)  # re-insert at the end: the oldest entry is the first one
    while len(table) >= limit:
        table.pop(next(iter(table)))
    table[key] = value


class Authenticator:
    def __init__(
        self,
        store: Store,
        cache: KeyCache,
        clock: Callable[[], float] = time.time,
        lookup_timeout_s: float = 5.0,
        last_used: LastUsed | None = None,
    ) -> None:
        self._store = store
        self._last_used = last_used
        self._cache = cache
        self._clock = clock
        self._timeout = lookup_timeout_s
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._generation = 0  # bumped by forget(): answers fetched before it are not cached
        self._outage = Outage(log, "key store")

    def authenticate_now(self, presented: str | None) -> KeyRecord | None:
        """authenticate() without waiting, when the cache holds this key as valid and
        active (the usual case); None: await authenticate(), which gives every other answer."""
        if not presented or not well_formed(presented):
            return None
        now = self._clock()
        hit, record = self._cache.get(digest_key(presented), now)
        if not hit or record is None or not record.is_active(now):
            return None
        if self._last_used is not None:
            self._last_used.touch(record.id, now)
        return record

    async def authenticate(self, presented: str | None) -> KeyRecord:
        if not presented or not well_formed(presented):
            raise InvalidApiKey()
        digest = digest_key(presented)
        hit, record = self._cache.get(digest, self._clock())
        if not hit:
            try:
                record = await self._lookup(digest)
            except Exception as exc:
                # A known key keeps working from its stale entry; unknown ones get 503.
                self._outage.failed(exc, "keys seen in the last few minutes keep working, others get 503")
                record = self._cache.stale(digest, self._clock())
                if record is None:
                    raise ServiceUnavailable(
                        "Authentication is temporarily unavailable.", code="auth_unavailable", retry_after_s=5
                    ) from None
        if record is None:
            raise InvalidApiKey()
        now = self._clock()
        if not record.is_active(now):
            # The caller holds this very key's secret: telling them it was revoked or has
            # expired (same status and code as any bad key, DESIGN §1) reveals nothing to
            # anyone else, and saves them guessing at a typo.
            if record.revoked_at is not None:
                raise InvalidApiKey("This API key has been revoked.")
            raise InvalidApiKey("This API key has expired.")
        if self._last_used is not None:
            self._last_used.touch(record.id, now)
        return record

    async def _lookup(self, digest: str) -> KeyRecord | None:
        """One store query per digest at a time; waiters share it (and may leave early)."""
        fut = self._inflight.get(digest)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch(digest))
            self._inflight[digest] = fut
            fut.add_done_callback(functools.partial(self._done, digest))
        return await asyncio.shield(fut)

    def _done(self, digest: str, fut: asyncio.Future[KeyRecord | None]) -> None:
        if self._inflight.get(digest) is fut:
            del self._inflight[digest]
        if not fut.cancelled():
            fut.exception()  # retrieved: every waiter may have gone away

    async def _fetch(self, digest: str) -> KeyRecord | None:
        generation = self._generation
        async with asyncio.timeout(self._timeout):
            record = await self._store.key_by_digest(digest)
        self._outage.ended()
        if generation == self._generation:
            self._cache.put(digest, record, self._clock())
        return record

    def forget(self, digest: str) -> None:
        """Drop a cached answer (the admin API revoked or changed that key here)."""
        self._generation += 1
        self._inflight.pop(digest, None)
        self._cache.forget(digest)


class Authenticate:
    """The auth step (pipeline.Before): `call.key` is the caller's active key, or the call
    ends in 401 (429 past the brute-force brake's limit). The key may come as `?key=` only
    where the dialect takes it there (Gemini). A key the head check already verified is
    taken as is, without waiting."""

    def __init__(self, authenticator: Authenticator, on_failure: Callable[[str, float], Awaitable[None]]) -> None:
        self._authenticator = authenticator
        self._on_failure = on_failure   # the brake: counts, and raises TooManyAuthFailures past its limit

    def __call__(self, call: Call) -> Awaitable[None] | None:
        admitted = call.ex.request.admitted
        if isinstance(admitted, KeyRecord):   # checked from the head already (head_check)
            call.key = admitted
            return None
        return self._look_up(call)   # a keyed GET, or a model call pipelined behind another

    async def _look_up(self, call: Call) -> None:
        call.key = await self.key_of(call.ex.request, call.dialect, call.client)

    def key_now(self, request: Request, dialect: Dialect) -> KeyRecord | None:
        """The caller's key when the cache knows it as valid (no waiting); None otherwise."""
        query = (lambda: dict(parse_qsl(request.query_string))) if dialect.key_in_query else None
        return self._authenticator.authenticate_now(extract_key(request.headers, query))

    async def key_of(self, request: Request, dialect: Dialect, client: str) -> KeyRecord:
        query = (lambda: dict(parse_qsl(request.query_string))) if dialect.key_in_query else None
        try:
            return await self._authenticator.authenticate(extract_key(request.headers, query))
        except InvalidApiKey:
            await self._on_failure(client, request.started)
            raise
