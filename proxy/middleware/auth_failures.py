"""Brute-force brake: per client IP, failed authentications per minute (RELIABILITY B6).

After `limit` answers of 401 to one IP within a fixed one-minute window, every further
*failed* authentication from that IP is answered 429 `too_many_auth_failures` with
Retry-After, after a pause (`TARPIT_S`), until the window ends. A valid key is never
braked: one stale key in an office behind one address (a NAT, or a reverse proxy not
listed in `server.trusted_proxies`) must not lock out everyone else there. What slows a
scanner is the pause: with the per-address connection cap it bounds the guesses one
address can make (cap / TARPIT_S per second) and the store lookups they cost; the
negative key cache keeps repeated wrong keys off the store.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math

from proxy.errors import RateLimited

_WINDOW_S = 60.0
TARPIT_S = 1.0


async def tarpit() -> None:
    """The pause before a braked failure is answered."""
    await asyncio.sleep(TARPIT_S)


class TooManyAuthFailures(RateLimited):
    code = "too_many_auth_failures"


class AuthFailures:
    """ip -> [window start, failures in it]. Bounded: the oldest addresses go first."""

    def __init__(self, limit: int, max_addresses: int = 100_000) -> None:
        self._limit = limit
        self._max = max_addresses
        self._table: dict[str, list[float]] = {}

    def check(self, ip: str, now: float) -> None:
        """Raise TooManyAuthFailures when `ip` is over the limit in its current window."""
        entry = self._table.get(ip) if self._table else None
        if entry is None or entry[1] < self._limit:
            return
        left = entry[0] + _WINDOW_S - now
        if left <= 0:
            del self._table[ip]
            return
        wait = max(1, math.ceil(left))
        raise TooManyAuthFailures(
            f"Too many failed authentications from this address. Try again in {wait}s.", retry_after_s=wait
        )

    def failed(self, ip: str, now: float) -> None:
        if self._limit <= 0 or not ip:
            return
        entry = self._table.get(ip)
        if entry is None or now - entry[0] >= _WINDOW_S:
            if entry is None and len(self._table) >= self._max:
                del self._table[next(iter(self._table))]
            self._table[ip] = [now, 1.0]
        else:
            entry[1] += 1


class ClientAddress:
    """The client's IP: the peer, or, when the peer is a trusted reverse proxy, the
    right-most X-Forwarded-For entry that is not one (entries further left are
    client-written and can be forged)."""

    def __init__(self, trusted: tuple[str, ...]) -> None:
        self._nets = tuple(ipaddress.ip_network(t, strict=False) for t in trusted)

    def __call__(self, peer: str, forwarded_for: str | None) -> str:
        if not self._nets or not forwarded_for or not self.trusted(peer):
            return peer
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            if not self.trusted(hop):
                return hop[:64]
        return peer

    def trusted(self, address: str) -> bool:
        """Whether `address` is one of the configured reverse proxies."""
        return bool(self._nets) and self._trusted(address)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._nets)
