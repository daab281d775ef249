"""Admission: turn a key's limits into one atomic limiter call, and its answer into
429s and `x-ratelimit-*` headers. Settlement runs off the request path.

Budget admission is a choice (`limits.budget_admission`):
- `spend` (the default): a request is admitted while the key's spend is under its
  budget; the limiter reserves a token amount (one nano-dollar) per request, so the
  budget can be overspent by what the requests in flight at the moment it runs out cost.
  What a team with a $5/day key and an agent sending max_tokens 32000 expects: the
  whole $5 is usable, whatever max_tokens says.
- `reserve`: each request reserves its worst case (prompt estimate + max_tokens at the
  model's prices) and is refused when that does not fit in what is left, so the budget
  is never overspent by more than one request's error in the estimate; but a large
  max_tokens makes the last part of the budget unusable (32000 output tokens at $15/M
  reserve $0.48 each).

Refusals say what is true and what helps (issue 25 item 12): a request that can never
fit (its reservation is larger than the key's whole tpm, or its worst case larger than
the whole budget) is told why and to lower max_tokens, with no Retry-After; "spent" is
said only when the spend reached the budget.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import Literal, NamedTuple

from proxy.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from proxy.limits.base import Decision, Limiter, LimiterUnavailable, LimitSpec, Reservation
from proxy.logs import Outage
from proxy.pipeline import Call
from proxy.pricing import max_cost_usd
from proxy.store.base import KeyRecord

log = logging.getLogger("llm_proxy.limits")

_WHAT = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}
BudgetAdmission = Literal["spend", "reserve"]
# What a request reserves of the budget in "spend" mode: admitted while spend < budget.
_SPEND_MODE_COST_USD = 1e-9
_PERIOD = {None: "", "day": " per day", "month": " per month"}


def spec_of(key: KeyRecord) -> LimitSpec:
    return LimitSpec(key.rpm, key.tpm, key.max_parallel, key.budget_usd, key.budget_period)


def ratelimit_lines(d: Decision, limits: KeyAdmission) -> bytes:
    """The `x-ratelimit-*` header lines for decision `d` on the key `limits` was built
    from, encoded: a response head takes them as they are (three lines per limit, from
    one bytes format; a Decision's limit_* are its spec's limits, see make_decision)."""
    # A limit's lines are there only when the limit is set, and then make_decision gave
    # its remaining count (never below 0) and reset time.
    lines = b""
    if limits.requests_lines is not None:
        lines = limits.requests_lines % (d.remaining_requests, math.ceil(d.reset_requests_s))  # type: ignore[arg-type]  # not None while the limit is set
    if limits.tokens_lines is not None:
        lines += limits.tokens_lines % (d.remaining_tokens, math.ceil(d.reset_tokens_s))  # type: ignore[arg-type]  # not None while the limit is set
    return lines


def header_pairs(lines: bytes) -> list[tuple[str, str]]:
    """Encoded header lines as (name, value) pairs (for refusals, which are rare)."""
    pairs = []
    for line in lines.decode("latin-1").split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            pairs.append((name, value))
    return pairs


def _limit_lines(kind: str, limit: int | None) -> bytes | None:
    """The three header lines of one limit, its constant value filled in, the rest a format."""
    if limit is None:
        return None
    return (
        f"x-ratelimit-limit-{kind}: {limit}\r\n"
        f"x-ratelimit-remaining-{kind}: %d\r\n"
        f"x-ratelimit-reset-{kind}: %ds\r\n"
    ).encode("ascii")


class KeyAdmission(NamedTuple):
    """What admission needs of a key, built once per cached KeyRecord."""

    record: KeyRecord
    spec: LimitSpec
    requests_lines: bytes | None     # the x-ratelimit-*-requests lines, a bytes format
    tokens_lines: bytes | None

    @classmethod
    def of(cls, key: KeyRecord) -> KeyAdmission:
        spec = spec_of(key)
        return cls(key, spec, _limit_lines("requests", spec.rpm), _limit_lines("tokens", spec.tpm))


_NO_LIMITS: tuple[Reservation | None, bytes] = (None, b"")


class _Asked(NamedTuple):
    """What the refused request asked for, for a refusal that tells the truth."""

    tokens: int
    cost_usd: float
    mode: str  # a BudgetAdmission
    default_max_tokens: int


def _answer(decision: Decision, limits: KeyAdmission, asked: _Asked) -> tuple[Reservation | None, bytes]:
    """An admitted decision's reservation and header lines; a refusal raised as its error."""
    if decision.admitted:
        return decision.reservation, ratelimit_lines(decision, limits)
    headers = dict(header_pairs(ratelimit_lines(decision, limits)))
    wait = max(1, int(decision.retry_after_s))
    spec = limits.spec
    if decision.reason == "budget":
        _refuse_budget(spec, decision, asked, headers)
    if decision.reason == "tpm" and spec.tpm is not None and asked.tokens > spec.tpm:
        # Waiting cannot help: the reservation alone is over the whole per-minute limit.
        headers["x-should-retry"] = "false"
        raise RateLimited(
            f"This request reserves {asked.tokens} tokens (its prompt estimate plus max_tokens, which is "
            f"{asked.default_max_tokens} when the request does not set it), more than this key's limit of "
            f"{spec.tpm} tokens per minute, so it can never be admitted. Set a lower max_tokens, "
            "or ask the gateway operator to raise the key's tpm.",
            headers=headers,
        )
    what = _WHAT.get(decision.reason or "", "requests")
    raise RateLimited(
        f"Rate limit reached for this key ({what}). Please try again in {wait}s.",
        retry_after_s=min(wait, 60),
        headers=headers,
    )


def _refuse_budget(spec: LimitSpec, decision: Decision, asked: _Asked, headers: dict[str, str]) -> None:
    budget = f"${spec.budget_usd:g}{_PERIOD.get(spec.budget_period, '')}"
    if decision.retry_after_s == 1:
        # Only reservations of requests in flight are in the way: they settle soon.
        raise RateLimited(
            f"This key's budget ({budget}) is held by requests in flight. Please try again in 1s.",
            retry_after_s=1,
            headers=headers,
        )
    headers["x-should-retry"] = "false"
    if asked.mode == "spend":
        # Admitted while spend < budget: a refusal means the spend reached it.
        raise QuotaExceeded(
            f"This key's budget ({budget}) is spent. Ask the gateway operator to raise it.", headers=headers
        )
    assert spec.budget_usd is not None
    worst = f"${asked.cost_usd:.6g}"
    if asked.cost_usd > spec.budget_usd:
        raise QuotaExceeded(
            f"This request could cost up to {worst} (its prompt plus max_tokens at this model's prices), more "
            f"than this key's whole budget ({budget}), so it can never be admitted. Set a lower max_tokens, "
            "or ask the gateway operator to raise the budget.",
            headers=headers,
        )
    raise QuotaExceeded(
        f"What is left of this key's budget ({budget}) is less than this request could cost (up to {worst}, "
        "its prompt plus max_tokens at this model's prices). Set a lower max_tokens, or ask the gateway "
        "operator to raise the budget.",
        headers=headers,
    )


class Admission:
    def __init__(
        self,
        limiter: Limiter,
        fail_open: bool,
        budget_admission: str = "spend",  # a BudgetAdmission (checked by the config loader)
        default_max_tokens: int = 4096,
    ) -> None:
        self._limiter = limiter
        self._fail_open = fail_open
        self._mode = budget_admission
        self._default_max_tokens = default_max_tokens
        self._settling: set[asyncio.Task[None]] = set()
        self._outage = Outage(log, "limits backend")
        # key id -> its KeyAdmission: keys come from the auth cache as the same objects, so
        # this is built once per cached record.
        self._keys: dict[str, KeyAdmission] = {}

    def _limits_of(self, key: KeyRecord | None) -> KeyAdmission | None:
        """What admission needs of `key`; None when there is nothing to admit (no key, or
        a key without limits)."""
        if key is None:
            return None
        limits = self._keys.get(key.id)
        if limits is None or limits.record is not key:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            limits = self._keys[key.id] = KeyAdmission.of(key)
        return None if limits.spec.empty else limits

    def admit_now(
        self, key: KeyRecord | None, request_id: str, tokens: int, cost_usd: float, fresh: bool = False
    ) -> tuple[Reservation | None, bytes] | None:
        """admit() without waiting, when the limiter can answer at once (in-process);
        None: await admit()."""
        limits = self._limits_of(key)
        if limits is None:
            return _NO_LIMITS
        reserve = cost_usd if self._mode == "reserve" else _SPEND_MODE_COST_USD
        decision = self._limiter.admit_now(limits.record.id, limits.spec, request_id, tokens, reserve, fresh)
        return None if decision is None else _answer(decision, limits, self._asked(tokens, cost_usd))

    async def admit(
        self, key: KeyRecord | None, request_id: str, tokens: int, cost_usd: float, fresh: bool = False
    ) -> tuple[Reservation | None, bytes]:
        """The reservation to settle and the `x-ratelimit-*` header lines for the response.
        `fresh`: the id was never admitted before (see Limiter.admit)."""
        limits = self._limits_of(key)
        if limits is None:
            return _NO_LIMITS
        reserve = cost_usd if self._mode == "reserve" else _SPEND_MODE_COST_USD
        try:
            decision = await self._limiter.admit(limits.record.id, limits.spec, request_id, tokens, reserve, fresh)
        except LimiterUnavailable as exc:
            self._outage.failed(
                exc, "admitting limited keys without limits (fail_open)" if self._fail_open
                else "limited keys get 503 rate_limiter_unavailable",
            )
            if self._fail_open:
                return _NO_LIMITS
            raise ServiceUnavailable(
                "Rate limiting is temporarily unavailable; please retry.",
                code="rate_limiter_unavailable",
                retry_after_s=2,
            ) from None
        self._outage.ended()
        return _answer(decision, limits, self._asked(tokens, cost_usd))

    def _asked(self, tokens: int, cost_usd: float) -> _Asked:
        return _Asked(tokens, cost_usd, self._mode, self._default_max_tokens)

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
            # The outage itself is logged by admissions.
            log.debug("could not settle a reservation; it will expire")

    async def drain(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)


class ReserveLimits:
    """The limits step (pipeline.Before): reserve the call's worst case (its prompt
    estimate plus its output cap, and their price on the plan's first route) against the
    key's limits, or refuse it (429). The accounting stage settles the reservation with
    what was used."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def __call__(self, call: Call) -> Awaitable[None] | None:
        tokens = call.prompt_estimate + call.max_output
        usd = max_cost_usd(call.plan[0].model.price, call.prompt_estimate, call.max_output)
        # The record id is always one this process made (record_id_for), never admitted
        # before: a fresh id, which the memory limiter does not need to index.
        admitted = self._admission.admit_now(call.key, call.record_id, tokens, usd, True)
        if admitted is None:   # the limiter must wait (Redis, or a budget's first request)
            return self._admit(call, tokens, usd)
        call.reservation, call.limit_lines = admitted
        return None

    async def _admit(self, call: Call, tokens: int, usd: float) -> None:
        call.reservation, call.limit_lines = await self._admission.admit(call.key, call.record_id, tokens, usd, True)
