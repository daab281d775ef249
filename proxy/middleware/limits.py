"""Admission: turn a key's limits into one atomic limiter call, and its answer into
429s and `x-ratelimit-*` headers. Settlement runs off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import NamedTuple

from proxy.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from proxy.limits.base import US_PER_S, WINDOW_US, Decision, Limiter, LimiterUnavailable, LimitSpec, Reservation
from proxy.store.base import KeyRecord

log = logging.getLogger("llm_proxy.limits")

_WHAT = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}


def spec_of(key: KeyRecord) -> LimitSpec:
    return LimitSpec(key.rpm, key.tpm, key.max_parallel, key.budget_usd, key.budget_period)


# `x-ratelimit-reset-*` of an admitted request: its own entry is the newest, so the
# window is back to empty exactly one window later (the common case; formatted once).
_WINDOW_S = WINDOW_US / US_PER_S
_RESET_WINDOW = f"{math.ceil(_WINDOW_S)}s"


def ratelimit_headers(d: Decision, limits: KeyAdmission) -> list[tuple[str, str]]:
    """The headers for decision `d` on the key `limits` was built from."""
    h: list[tuple[str, str]] = []
    if d.limit_requests is not None:
        remaining, reset = d.remaining_requests, d.reset_requests_s or 0
        h += (
            # A Decision's limit_* are its spec's limits (make_decision): formatted once.
            limits.limit_requests or ("x-ratelimit-limit-requests", str(d.limit_requests)),
            ("x-ratelimit-remaining-requests", str(remaining) if remaining is not None and remaining > 0 else "0"),
            ("x-ratelimit-reset-requests", _RESET_WINDOW if reset == _WINDOW_S else f"{math.ceil(reset)}s"),
        )
    if d.limit_tokens is not None:
        remaining, reset = d.remaining_tokens, d.reset_tokens_s or 0
        h += (
            limits.limit_tokens or ("x-ratelimit-limit-tokens", str(d.limit_tokens)),
            ("x-ratelimit-remaining-tokens", str(remaining) if remaining is not None and remaining > 0 else "0"),
            ("x-ratelimit-reset-tokens", _RESET_WINDOW if reset == _WINDOW_S else f"{math.ceil(reset)}s"),
        )
    return h


class KeyAdmission(NamedTuple):
    """What admission needs of a key, built once per cached KeyRecord."""

    record: KeyRecord
    spec: LimitSpec
    limit_requests: tuple[str, str] | None     # the x-ratelimit-limit-* headers: constant per key
    limit_tokens: tuple[str, str] | None

    @classmethod
    def of(cls, key: KeyRecord) -> KeyAdmission:
        spec = spec_of(key)
        return cls(
            key,
            spec,
            None if spec.rpm is None else ("x-ratelimit-limit-requests", str(spec.rpm)),
            None if spec.tpm is None else ("x-ratelimit-limit-tokens", str(spec.tpm)),
        )


class Admission:
    def __init__(self, limiter: Limiter, fail_open: bool) -> None:
        self._limiter = limiter
        self._fail_open = fail_open
        self._settling: set[asyncio.Task[None]] = set()
        # key id -> its KeyAdmission: keys come from the auth cache as the same objects, so
        # this is built once per cached record.
        self._keys: dict[str, KeyAdmission] = {}

    def _new_limits(self, key: KeyRecord) -> KeyAdmission:
        if len(self._keys) >= 10_000:
            self._keys.clear()
        limits = self._keys[key.id] = KeyAdmission.of(key)
        return limits

    async def admit(
        self, key: KeyRecord | None, request_id: str, tokens: int, cost_usd: float
    ) -> tuple[Reservation | None, list[tuple[str, str]]]:
        """The reservation to settle and the `x-ratelimit-*` headers for the response."""
        if key is None:
            return None, []
        limits = self._keys.get(key.id)
        if limits is None or limits.record is not key:
            limits = self._new_limits(key)
        spec = limits.spec
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
            return decision.reservation, ratelimit_headers(decision, limits)
        headers = dict(ratelimit_headers(decision, limits))
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
