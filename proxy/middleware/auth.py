"""Client authentication: which virtual key is calling.

The key may come as `Authorization: Bearer`, `api-key`, `x-api-key`, `x-goog-api-key`,
or `?key=` (Gemini routes only). It is checked for shape first (junk never costs a
store query), then looked up by SHA-256 digest. Answers are cached for
`cache_ttl_s` (so a revocation takes effect within that time) and misses are cached
too, so unknown keys cannot hammer the store. The cache is keyed by the full digest.

Fail closed: when the store errors and nothing is cached, the request gets 503;
no code path builds a default identity.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from aiohttp import web

from proxy.errors import InvalidApiKey, ServiceUnavailable
from proxy.keys import digest_key, well_formed
from proxy.store.base import KeyRecord, Store

log = logging.getLogger("llm_proxy.auth")

KEY = web.RequestKey("llm_proxy_key", KeyRecord)
_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")


def extract_key(request: web.Request, allow_query: bool) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        return value if scheme.lower() == "bearer" else ""
    for name in _HEADERS:
        value = request.headers.get(name)
        if value is not None:
            return value
    if allow_query:
        return request.query.get("key")
    return None


class KeyCache:
    """digest → (KeyRecord | None, expires_at). Bounded; oldest entries dropped first."""

    def __init__(self, ttl_s: float, negative_ttl_s: float, max_entries: int = 100_000) -> None:
        self._ttl = ttl_s
        self._neg_ttl = negative_ttl_s
        self._max = max_entries
        self._entries: dict[str, tuple[KeyRecord | None, float]] = {}

    def get(self, digest: str, now: float) -> tuple[bool, KeyRecord | None]:
        hit = self._entries.get(digest)
        if hit is None or hit[1] <= now:
            return False, None
        return True, hit[0]

    def stale(self, digest: str) -> KeyRecord | None:
        hit = self._entries.get(digest)
        return hit[0] if hit else None

    def put(self, digest: str, record: KeyRecord | None, now: float) -> None:
        if len(self._entries) >= self._max:
            self._entries.pop(next(iter(self._entries)))
        self._entries[digest] = (record, now + (self._ttl if record else self._neg_ttl))

    def forget(self, digest: str) -> None:
        self._entries.pop(digest, None)


class Authenticator:
    def __init__(self, store: Store, cache: KeyCache, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._cache = cache
        self._clock = clock

    async def authenticate(self, presented: str | None) -> KeyRecord:
        if not presented or not well_formed(presented):
            raise InvalidApiKey()
        digest = digest_key(presented)
        now = self._clock()
        hit, record = self._cache.get(digest, now)
        if not hit:
            try:
                record = await self._store.key_by_digest(digest)
            except Exception as exc:
                # A known key keeps working from the stale cache entry; unknown ones get 503.
                record = self._cache.stale(digest)
                if record is None:
                    log.warning("key store unavailable during auth (%s)", type(exc).__name__)
                    raise ServiceUnavailable(
                        "Authentication is temporarily unavailable.", code="auth_unavailable", retry_after_s=5
                    ) from None
            else:
                self._cache.put(digest, record, now)
        if record is None or not record.is_active(now):
            raise InvalidApiKey()
        return record

    def forget(self, digest: str) -> None:
        """Drop a cached answer (the admin API revoked or changed that key here)."""
        self._cache.forget(digest)


