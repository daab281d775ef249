"""Admission: turn a key's limits into one atomic limiter call, and its answer into
429s and `x-ratelimit-*` headers. Settlement runs off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import math

from proxy.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from proxy.limits.base import Decision, Limiter, LimiterUnavailable, LimitSpec, Reservation
from proxy.store.base import KeyRecord

log = logging.getLogger("llm_proxy.limits")

_WHAT = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}


def spec_of(key: KeyRecord) -> LimitSpec:
    return LimitSpec(key.rpm, key.tpm, key.max_parallel, key.budget_usd, key.budget_period)


def ratelimit_headers(d: Decision) -> list[tuple[str, str]]:
    h: list[tuple[str, str]] = []
    if d.limit_requests is not None:
        h += (
            ("x-ratelimit-limit-requests", str(d.limit_requests)),
            ("x-ratelimit-remaining-requests", str(max(0, d.remaining_requests or 0))),
            ("x-ratelimit-reset-requests", f"{math.ceil(d.reset_requests_s or 0)}s"),
        )
    if d.limit_tokens is not None:
        h += (
            ("x-ratelimit-limit-tokens", str(d.limit_tokens)),
            ("x-ratelimit-remaining-tokens", str(max(0, d.remaining_tokens or 0))),
            ("x-ratelimit-reset-tokens", f"{math.ceil(d.reset_tokens_s or 0)}s"),
        )
    return h


class Admission:
    def __init__(self, limiter: Limiter, fail_open: bool) -> None:
        self._limiter = limiter
        self._fail_open = fail_open
        self._settling: set[asyncio.Task[None]] = set()
        # key id -> (the KeyRecord it was made from, its LimitSpec): keys come from the
        # auth cache as the same objects, so the spec is built once per cached record.
        self._specs: dict[str, tuple[KeyRecord, LimitSpec]] = {}

    def _spec(self, key: KeyRecord) -> LimitSpec:
        cached = self._specs.get(key.id)
        if cached is not None and cached[0] is key:
            return cached[1]
        if len(self._specs) >= 10_000:
            self._specs.clear()
        spec = spec_of(key)
        self._specs[key.id] = (key, spec)
        return spec

    async def admit(
        self, key: KeyRecord | None, request_id: str, tokens: int, cost_usd: float
    ) -> tuple[Reservation | None, list[tuple[str, str]]]:
        """The reservation to settle and the `x-ratelimit-*` headers for the response."""
        if key is None:
            return None, []
        spec = self._spec(key)
        if spec.empty:
            return None, []
        try:
            decision = await self._limiter.admit(key.id, spec, request_id, tokens, cost_usd)
        except LimiterUnavailable:
            if self._fail_open:
                log.warning("limits backend unavailable; admitting %s (fail_open)", key.name)
                return None, []
            raise ServiceUnavailable(
                "Rate limiting is temporarily unavailable; please retry.",
                code="rate_limiter_unavailable",
                retry_after_s=2,
            ) from None
        if decision.admitted:
            return decision.reservation, ratelimit_headers(decision)
        headers = dict(ratelimit_headers(decision))
        wait = max(1, int(decision.retry_after_s))
        if decision.reason == "budget":
            headers["x-should-retry"] = "false"
            raise QuotaExceeded(
                "This key's budget is spent. Ask the gateway operator to raise it.", headers=headers
            )
        what = _WHAT.get(decision.reason or "", "requests")
        raise RateLimited(
            f"Rate limit reached for this key ({what}). Please try again in {wait}s.",
            retry_after_s=min(wait, 60),
            headers=headers,
        )

    def settle(self, reservation: Reservation | None, tokens: int, cost_usd: float) -> None:
        """Called from `finally` (also while cancelled): inline when the backend can,
        else in a task of its own."""
        if reservation is None or self._limiter.settle_now(reservation, tokens, cost_usd):
            return
        task = asyncio.get_running_loop().create_task(self._settle(reservation, tokens, cost_usd))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, reservation: Reservation, tokens: int, cost_usd: float) -> None:
        try:
            await self._limiter.settle(reservation, tokens, cost_usd)
        except LimiterUnavailable:
            # The reservation expires by its TTL; the usage store still has the record.
            log.warning("could not settle a reservation; it will expire")

    async def drain(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
