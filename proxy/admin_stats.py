"""The admin API's usage views: the ledger newest first, time series, the overview and
the upstream routes' health (master key only; `proxy.admin` wraps every handler).

Aggregates come from the store's hourly roll-up (exact for any range, see
`proxy/store/ledger.py`); percentiles are computed over a bounded sample, the newest
`SAMPLE` records of the range, so they describe recent traffic when a range holds more.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.config import PROTOCOLS
from proxy.errors import InvalidRequest, NotFound
from proxy.store.base import ANY_ERROR, Cursor, Store, UsageFilter
from proxy.views import csv_text, iso, parse_since, parse_until, percentile, usage_json

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OUTCOMES = ("ok", "client_abort", "upstream_error", "timeout", "shutdown", ANY_ERROR)
GROUPINGS = ("key", "model", "day", "key_model", "upstream", "served")
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
CSV_PAGE = 5_000
SAMPLE = 10_000
TOP = 10
RANGES = {"24h": (86_400, "hour"), "7d": (7 * 86_400, "day"), "30d": (30 * 86_400, "day")}
_BUCKET_S = {"hour": 3600, "day": 86_400}
SERIES_FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd")
USAGE_CSV_COLUMNS = (
    "id", "ts", "key_id", "key_name", "endpoint", "model", "upstream", "upstream_model", "stream", "status",
    "prompt_tokens", "completion_tokens", "cached_tokens", "cache_creation_tokens", "reasoning_tokens",
    "cost_usd", "estimated", "ttft_ms", "duration_ms", "error", "outcome",
    "client_dialect", "upstream_protocol", "attempt",
)


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


# -- cursors -------------------------------------------------------------------------------


def encode_cursor(ts: float, record_id: str) -> str:
    """Opaque to clients: the (ts, id) of the last record shown, URL-safe."""
    return base64.urlsafe_b64encode(f"{ts!r}\n{record_id}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        ts, record_id = raw.split("\n", 1)
        value = float(ts)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("'cursor' is not a cursor this API returned.", param="cursor") from None
    if not math.isfinite(value) or not record_id:
        raise InvalidRequest("'cursor' is not a cursor this API returned.", param="cursor")
    return value, record_id


# -- query parameters ----------------------------------------------------------------------


async def usage_filter(request: web.Request, store: Store, default_since: str = "24h") -> UsageFilter:
    q = request.query
    try:
        since = parse_since(q.get("since") or default_since)
    except ValueError:
        raise InvalidRequest("'since' must look like 24h, 7d or an ISO date.", param="since") from None
    until = None
    if q.get("until"):
        try:
            until = parse_until(q["until"])
        except ValueError:
            raise InvalidRequest("'until' must be an ISO date, unix seconds or look like 1h.", param="until") from None
    key_id = None
    if q.get("key"):
        record = await store.get_key(q["key"])
        if record is None:
            raise NotFound("No such key.", code="key_not_found")
        key_id = record.id
    outcome = q.get("outcome") or None
    if outcome is not None and outcome not in OUTCOMES:
        raise InvalidRequest("'outcome' must be one of: " + ", ".join(OUTCOMES) + ".", param="outcome")
    # How calls were served: a dialect name each (clients speak the same three).
    served = {}
    for name in ("client_dialect", "upstream_protocol"):
        value = q.get(name) or None
        if value is not None and value not in PROTOCOLS:
            raise InvalidRequest(f"'{name}' must be one of: " + ", ".join(PROTOCOLS) + ".", param=name)
        served[name] = value
    return UsageFilter(
        since=since, until=until, key_id=key_id, model=q.get("model") or None, outcome=outcome, **served,
    )


def _limit(request: web.Request, default: int | None) -> int | None:
    text = request.query.get("limit")
    if not text:
        return default
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    return int(text)


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest("'format' must be json or csv.", param="format")
    return fmt


def _csv_response(text: str, name: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=text,
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"', **(headers or {})},
    )


# -- handlers ------------------------------------------------------------------------------


def make_handlers(store_of: Callable[[web.Request], Store]) -> dict[str, Handler]:
    async def usage(request: web.Request) -> web.StreamResponse:
        store = store_of(request)
        f = await usage_filter(request, store)
        fmt = _format(request)
        by = request.query.get("by")
        if by:
            if by not in GROUPINGS:
                raise InvalidRequest("'by' must be " + ", ".join(GROUPINGS[:-1]) + " or " + GROUPINGS[-1] + ".", param="by")
            rows = await store.usage_groups(f, by)  # type: ignore[arg-type]
            for r in rows:
                r["last_ts"] = iso(r["last_ts"])
                if "last_error_ts" in r:
                    r["last_error_ts"] = iso(r["last_error_ts"])
            if fmt == "csv":
                return _csv_response(csv_text(rows, list(rows[0]) if rows else ["group"]), f"usage-by-{by}")
            return _json({"data": rows})
        after = decode_cursor(request.query["cursor"]) if request.query.get("cursor") else None
        limit = _limit(request, None if fmt == "csv" else DEFAULT_LIMIT)
        if limit is None:  # a CSV export without a limit: every matching record, streamed
            return await _stream_csv(request, store, f, after)
        records = await store.page_usage(f, limit + 1, after)
        page, more = records[:limit], len(records) > limit
        next_cursor = encode_cursor(page[-1].ts, page[-1].id) if more else None
        if fmt == "csv":
            headers = {"X-Truncated": "true" if more else "false"}
            if next_cursor:
                headers["X-Next-Cursor"] = next_cursor
            return _csv_response(csv_text([usage_json(r) for r in page], USAGE_CSV_COLUMNS), "usage", headers)
        return _json({"data": [usage_json(r) for r in page], "next_cursor": next_cursor, "truncated": more})

    async def series(request: web.Request) -> web.Response:
        store = store_of(request)
        f = await usage_filter(request, store)
        bucket = request.query.get("bucket") or ("hour" if (f.until or time.time()) - f.since <= 2 * 86_400 else "day")
        if bucket not in _BUCKET_S:
            raise InvalidRequest("'bucket' must be hour or day.", param="bucket")
        rows = await store.usage_series(f, bucket)  # type: ignore[arg-type]
        return _json({"bucket": bucket, "since": iso(f.since), "until": iso(f.until), "data": [_point(r) for r in rows]})

    async def overview(request: web.Request) -> web.Response:
        name = request.query.get("range", "24h")
        if name not in RANGES:
            raise InvalidRequest("'range' must be 24h, 7d or 30d.", param="range")
        return _json(await overview_doc(store_of(request), name, time.time()))

    async def upstreams(request: web.Request) -> web.Response:
        text = request.query.get("range", "24h")
        try:
            since = parse_since(text)
        except ValueError:
            raise InvalidRequest("'range' must look like 24h, 7d or 30d.", param="range") from None
        return _json({"range": text, **await upstreams_doc(store_of(request), since)})

    return {"usage": usage, "series": series, "overview": overview, "upstreams": upstreams}


async def overview_doc(store: Store, name: str, now: float) -> dict[str, Any]:
    """The overview page: a series, totals, top keys and models over `RANGES[name]`."""
    span, bucket = RANGES[name]
    step = _BUCKET_S[bucket]
    # From the start of the first bucket: every bucket of the chart is whole.
    f = UsageFilter(since=(now - span) // step * step)
    points = await store.usage_series(f, bucket)  # type: ignore[arg-type]
    keys = await store.usage_groups(f, "key")
    models = await store.usage_groups(f, "model")
    ttfts = sorted(t for _, _, t, _ in await store.usage_sample(f, SAMPLE) if t is not None)
    totals: dict[str, Any] = {k: sum(p[k] for p in points) for k in SERIES_FIELDS}
    totals["cost_usd"] = float(totals["cost_usd"])
    totals["error_rate"] = totals["errors"] / totals["requests"] if totals["requests"] else 0.0
    totals["ttft_p50_ms"] = percentile(ttfts, 0.50)
    totals["ttft_p95_ms"] = percentile(ttfts, 0.95)
    return {
        "range": name,
        "bucket": bucket,
        "since": iso(f.since),
        "series": [_point(p) for p in points],
        "totals": totals,
        "top_keys": [{"key_id": g["key_id"], "key_name": g["group"], **_top(g)} for g in _ranked(keys)],
        "top_models": [{"model": g["group"], **_top(g)} for g in _ranked(models)],
    }


async def upstreams_doc(store: Store, since: float) -> dict[str, Any]:
    """Each upstream route seen in the ledger since `since`: counts, error rate, p50s."""
    f = UsageFilter(since=since)
    routes = await store.usage_groups(f, "upstream")
    samples: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for upstream, upstream_model, ttft, duration in await store.usage_sample(f, SAMPLE):
        ttfts, durations = samples.setdefault((upstream, upstream_model), ([], []))
        durations.append(duration)
        if ttft is not None:
            ttfts.append(ttft)
    data = []
    for g in routes:
        ttfts, durations = samples.get((g["upstream"], g["upstream_model"]), ([], []))
        data.append(
            {
                "upstream": g["upstream"],
                "upstream_model": g["upstream_model"],
                "requests": g["requests"],
                "errors": g["errors"],
                "error_rate": g["errors"] / g["requests"] if g["requests"] else 0.0,
                "latency_p50_ms": percentile(sorted(durations), 0.50),
                "ttft_p50_ms": percentile(sorted(ttfts), 0.50),
                "latency_avg_ms": g["duration_avg_ms"],
                "last_error": g["last_error"],
                "last_error_at": iso(g["last_error_ts"]),
                "last_at": iso(g["last_ts"]),
            }
        )
    return {"since": iso(since), "data": data}


def _point(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "t": iso(r["t"]),
        **{k: r[k] for k in SERIES_FIELDS},
        "cached_tokens": r["cached_tokens"],
        "reasoning_tokens": r["reasoning_tokens"],
    }


def _ranked(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(groups, key=lambda g: (-g["cost_usd"], -g["requests"], g["group"] or ""))[:TOP]


def _top(g: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": g["requests"],
        "tokens": g["prompt_tokens"] + g["completion_tokens"],
        "cost_usd": g["cost_usd"],
    }


async def _stream_csv(request: web.Request, store: Store, f: UsageFilter, after: Cursor | None) -> web.StreamResponse:
    """Every matching record, newest first, a page at a time: memory stays bounded."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/csv; charset=utf-8", "Content-Disposition": 'attachment; filename="usage.csv"'}
    )
    await response.prepare(request)
    header = True
    while True:
        page = await store.page_usage(f, CSV_PAGE, after)
        await response.write(csv_text([usage_json(r) for r in page], USAGE_CSV_COLUMNS, header=header).encode())
        header = False
        if len(page) < CSV_PAGE:
            break
        after = (page[-1].ts, page[-1].id)
    await response.write_eof()
    return response
