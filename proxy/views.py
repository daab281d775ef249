"""JSON views of keys and usage records for operators (CLI and admin API), and time parsing."""

from __future__ import annotations

import calendar
import csv
import datetime
import io
import math
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from proxy.store.base import KeyLimits, KeyRecord, Store, UsageRecord

_SINCE = re.compile(r"(\d{1,9})([mhdw])", re.ASCII)
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
# Timestamps operators may set (expires_at): up to the end of year 9999, what iso() can show.
MAX_TS = 253_402_300_799.0
# Limits are stored as 64-bit integers; anything near that is a typo, not a limit.
MAX_LIMIT = 10**12
# `expires_in_days` (admin API and CLI): up to a century.
MAX_DAYS = 36_500
# Key names are shown in logs and tables: printable (no control, format or line-separator
# characters), no surrounding blanks, and never shaped like a key id (lookups take either).
_KEY_ID = re.compile(r"key_[0-9a-f]{16}", re.ASCII)


def parse_since(text: str, now: float | None = None) -> float:
    """'24h', '7d', '30m', '2w' or an ISO date/time (UTC when no zone is given)."""
    now = time.time() if now is None else now
    m = _SINCE.fullmatch(text.strip())
    if m:
        return max(0.0, now - int(m.group(1)) * _UNITS[m.group(2)])
    try:
        dt = datetime.datetime.fromisoformat(text.strip())
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.UTC)
        return max(0.0, dt.timestamp())
    except (ValueError, OverflowError):
        raise ValueError("expected 24h, 7d or an ISO date") from None


def parse_until(text: str, now: float | None = None) -> float:
    """The end of a range: unix seconds, an ISO date/time, or '1h'-style (that long ago)."""
    t = text.strip()
    if re.fullmatch(r"\d{1,12}(\.\d+)?", t, re.ASCII):
        return parse_ts(float(t))
    return parse_since(t, now)


def parse_ts(value: object) -> float:
    """A point in time given as unix seconds or an ISO date/time (UTC unless a zone is given)."""
    if isinstance(value, str):
        try:
            dt = datetime.datetime.fromisoformat(value.strip())
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=datetime.UTC)
            ts = dt.timestamp()
        except (ValueError, OverflowError):
            raise ValueError("expected unix seconds or an ISO date") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ts = float(value)
    else:
        raise ValueError("expected unix seconds or an ISO date")
    if not 0 <= ts <= MAX_TS:
        raise ValueError("the time is out of range")
    return ts


def check_name(name: object) -> str:
    """A key name as operators may set it; ValueError says what is wrong (never echoing it)."""
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or not name.isprintable() or name != name.strip():
        raise ValueError("a key name must be 1 to 128 printable characters without surrounding blanks")
    if _KEY_ID.fullmatch(name):
        raise ValueError("a key name must not look like a key id (key_ + 16 hex digits)")
    return name


def check_limits(limits: KeyLimits) -> KeyLimits:
    """Range checks shared by the admin API and the CLI; ValueError names the field."""
    for name in ("rpm", "tpm", "max_parallel"):
        v = getattr(limits, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LIMIT):
            raise ValueError(f"{name} must be an integer from 0 to {MAX_LIMIT}")
    b = limits.budget_usd
    if b is not None and not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 <= b <= 1e12):
        raise ValueError("budget_usd must be a number from 0 to 1e12")
    if limits.budget_period not in (None, "day", "month"):
        raise ValueError("budget_period must be day, month or null")
    e = limits.expires_at
    if e is not None and not (isinstance(e, (int, float)) and math.isfinite(e) and 0 <= e <= MAX_TS):
        raise ValueError("expires_at is out of range")
    if not all(isinstance(m, str) and m and len(m) <= 256 for m in limits.models):
        raise ValueError("models must be model names")
    return limits


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        # A value no operator input can produce any more; show it rather than fail the listing.
        return str(ts)


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
        "last_used_at": iso(k.last_used_at),
    }


def usage_json(r: UsageRecord) -> dict[str, Any]:
    out = r._asdict()
    out["ts"] = iso(r.ts)
    return out


def period_start(period: str | None, now: float) -> float:
    """Start of the current budget period in UTC; 0 for lifetime budgets."""
    if period is None:
        return 0.0
    t = time.gmtime(now)
    day = t.tm_mday if period == "day" else 1
    return float(calendar.timegm((t.tm_year, t.tm_mon, day, 0, 0, 0)))


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence; None when it is empty."""
    if not ordered:
        return None
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


# A cell a spreadsheet would run as a formula (CSV injection): quoted with a leading '.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str], header: bool = True) -> str:
    """Rows as CSV (RFC 4180, CRLF line ends): a header row, then one line per row."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


async def own_usage_doc(store: Store, key: KeyRecord, since: float) -> dict[str, Any]:
    """What GET /v1/usage answers: the key's own usage by model since `since`, its
    spend against its budget, and its limits (also the dashboard's self-service page)."""
    rows = await store.summarize_usage(since, "model", key.id)
    spent = await store.spend_usd(key.id, period_start(key.budget_period, time.time())) if key.budget_usd is not None else None
    return {
        "key": {k: v for k, v in key_json(key).items() if k not in ("revoked_at",)},
        "since": since,
        "usage": rows,
        "limits": {"rpm": key.rpm, "tpm": key.tpm, "max_parallel": key.max_parallel},
        "budget": None
        if key.budget_usd is None
        else {
            "budget_usd": key.budget_usd,
            "period": key.budget_period,
            "spent_usd": spent,
            "remaining_usd": max(0.0, key.budget_usd - (spent or 0.0)),
        },
    }
