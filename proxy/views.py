"""JSON views of keys and usage records for operators (CLI and admin API), and time parsing."""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import re
import time
from typing import Any

from proxy.store.base import KeyRecord, UsageRecord

_SINCE = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """'24h', '7d', '30m', '2w' or an ISO date/time (UTC when no zone is given)."""
    now = time.time() if now is None else now
    m = _SINCE.match(text.strip())
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        dt = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"expected 24h, 7d or an ISO date, got {text[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def key_json(k: KeyRecord) -> dict[str, Any]:
    """A key as shown to operators: never the digest, never the key."""
    return {
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "models": list(k.models),
        "rpm": k.rpm,
        "tpm": k.tpm,
        "max_parallel": k.max_parallel,
        "budget_usd": k.budget_usd,
        "budget_period": k.budget_period,
        "expires_at": iso(k.expires_at),
        "revoked_at": iso(k.revoked_at),
        "created_at": iso(k.created_at),
    }


def usage_json(r: UsageRecord) -> dict[str, Any]:
    out = dataclasses.asdict(r)
    out["ts"] = iso(r.ts)
    return out


def period_start(period: str | None, now: float) -> float:
    """Start of the current budget period in UTC; 0 for lifetime budgets."""
    if period is None:
        return 0.0
    t = time.gmtime(now)
    day = t.tm_mday if period == "day" else 1
    return float(calendar.timegm((t.tm_year, t.tm_mon, day, 0, 0, 0)))
