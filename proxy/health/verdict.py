"""What an upstream attempt's outcome says about its route (generic HTTP, no dialect).

A route is failed over (before the first byte) and charged a breaker failure for:
a connection error, a timeout, any 5xx (529: Anthropic's "overloaded"), a 429 (the
provider's rate limit on that route), and a 401/403 (a bad or revoked credential on
that route: another route may well serve). Other 4xx are the provider's answer to the
client's request: they pass through and say the route works.

A stream that breaks after its first byte (the upstream cut the connection, stalled, or
ended without its final event, as after an error event) is not failed over (bytes went
out) but is charged to the breaker all the same, as "cut" or "timeout" (proxy/forward.py).
A client that leaves is the client's doing: it charges nothing.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass

# Kinds, from the most telling to the least: when every route failed, the client is told
# about the best one (a 429 keeps its Retry-After; a timeout says more than a refusal).
# "cut" (a stream broken after its first byte) is never compared: the client had the head.
KINDS = ("rate_limited", "overloaded", "server_error", "timeout", "auth", "unreachable", "cut")
_RANK = {kind: i for i, kind in enumerate(KINDS)}


@dataclass(frozen=True)
class Failure:
    kind: str
    status: int = 0                   # the upstream's status; 0 when it never answered
    retry_after: float | None = None  # seconds the upstream asked to wait

    def outranks(self, other: Failure | None) -> bool:
        return other is None or _RANK[self.kind] < _RANK[other.kind]

    @property
    def label(self) -> str:
        """For logs and records: the status, or the error class when there was none."""
        return str(self.status) if self.status else self.kind


def failure_for_status(status: int) -> str | None:
    if status == 429:
        return "rate_limited"
    if status in (529, 503):
        return "overloaded"
    if status >= 500:
        return "server_error"
    if status in (401, 403):
        return "auth"
    return None


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (delta seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
            if 0 <= value < 1e9:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(min(int(raw), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
