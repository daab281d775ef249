"""Operator queries over the usage ledger, shared by the SQL stores.

Listings read the `usage` table newest first with keyset pagination (`(ts, id)` below the
cursor), each filter a fixed SQL fragment chosen in code so the planner can use the index
that fits (`usage_key_ts`, `usage_model_ts`, the partial `usage_errors_ts`). Values are
always bound parameters; no request text is ever part of the SQL.

Aggregates (series, groups, upstream routes) read roll-ups that an insert trigger on
`usage` keeps, one row per bucket x key x model x route x outcome: `usage_daily` for the
whole days inside the range, `usage_hourly` for the whole hours around them, and the raw
`usage` rows only for the partial hours at the two ends. The answer is exact for any
`since`/`until`, while a month of a million records costs a scan of a few thousand
roll-up rows, not of the ledger. Insert is the only way rows enter the ledger (writes are
idempotent inserts; nothing updates or deletes a usage row), so the trigger sees every
row exactly once; a change to that rule must change the roll-ups with it.

The SQL is written once with `:name` parameters; a `Dialect` holds the few fragments the
two databases spell differently, and the PostgreSQL store renumbers the parameters.
`LedgerViews` holds the reads themselves, once for both stores: a store gives only its
flavour and the call that runs a query.
"""

from __future__ import annotations

import datetime
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.store.base import (
    ANY_ERROR,
    ERROR_OUTCOMES,
    Bucket,
    Cursor,
    GroupBy,
    Grouping,
    UsageFilter,
    UsageRecord,
)
from proxy.store.rows import Row, usage_from_row

HOUR = 3600
DAY = 86_400
_BUCKET_SECONDS = {"hour": HOUR, "day": DAY}
# The roll-up tables, coarsest first, with their bucket size in seconds.
LEVELS = (("usage_daily", DAY), ("usage_hourly", HOUR))
_GROUPINGS = ("key", "model", "day", "key_model", "upstream", "served")
_LEGACY_GROUPS = ("key", "model", "day")   # summarize_usage's groupings
# A literal, identical in the partial index and the queries: SQLite uses a partial index
# only when the query's WHERE repeats the index's own terms.
ERRORS_SQL = "outcome IN (" + ", ".join(f"'{o}'" for o in ERROR_OUTCOMES) + ")"

Fetch = Callable[[str, dict[str, Any]], Awaitable[Sequence[Row]]]


@dataclass(frozen=True)
class Dialect:
    """SQL templates; `{}` is the expression they apply to."""

    bucket_of: str         # the start (unix seconds, an integer) of the {size}-second UTC bucket of {ts}
    bool_int: str          # a boolean column as 0/1
    int_sum: str           # SUM of integers: 0 when no rows, an integer
    float_sum: str         # SUM of floats: 0.0 when no rows, a float
    greatest: str          # the larger of two values (both non-NULL)


SQLITE = Dialect(
    bucket_of="CAST({ts} / {size} AS INTEGER) * {size}",
    bool_int="{}",
    int_sum="COALESCE(SUM({}), 0)",
    float_sum="TOTAL({})",
    greatest="MAX",
)
POSTGRES = Dialect(
    bucket_of="(floor({ts} / {size}) * {size})::bigint",
    bool_int="{}::int",
    int_sum="COALESCE(SUM({}), 0)::bigint",
    float_sum="COALESCE(SUM({}), 0)::float8",
    greatest="GREATEST",
)

# The roll-up's measures, in the order of the table's columns (the triggers and the
# back-fill in both stores' migrations insert them in this order).
ROLLUP_KEYS = ("t", "key_id", "model", "upstream", "upstream_model", "outcome")
ROLLUP_MEASURES = (
    "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost_usd",
    "estimated", "ttft_sum", "ttft_count", "duration_sum", "last_ts", "last_error", "last_error_ts",
)


def rollup_values(d: Dialect, row: str, size: int = HOUR) -> str:
    """The roll-up row (bucket of `size` seconds) of one raw usage row, as a SELECT list
    with the roll-up's column names (`row` is `NEW` in a trigger, `usage` in a back-fill or
    a query). NULL key ids become '': a NULL in a primary key never conflicts, so the
    upsert would add a row per record."""
    r = row
    values = (
        d.bucket_of.format(ts=f"{r}.ts", size=size),
        f"COALESCE({r}.key_id, '')",
        f"{r}.key_name",
        f"{r}.model",
        f"{r}.upstream",
        f"{r}.upstream_model",
        f"{r}.outcome",
        "1",
        f"{r}.prompt_tokens",
        f"{r}.completion_tokens",
        f"{r}.cached_tokens",
        f"{r}.reasoning_tokens",
        f"{r}.cost_usd",
        d.bool_int.format(f"{r}.estimated"),
        f"COALESCE({r}.ttft_ms, 0)",
        f"CASE WHEN {r}.ttft_ms IS NULL THEN 0 ELSE 1 END",
        f"{r}.duration_ms",
        f"{r}.ts",
        f"{r}.error",
        f"CASE WHEN {r}.error IS NULL THEN NULL ELSE {r}.ts END",
    )
    return ", ".join(f"{v} AS {c}" for v, c in zip(values, ROLLUP_COLUMNS.split(", "), strict=True))


ROLLUP_COLUMNS = "t, key_id, key_name, model, upstream, upstream_model, outcome, " + ", ".join(ROLLUP_MEASURES)

def rollup_upsert(d: Dialect, table: str, size: int, row: str) -> str:
    """Add one raw row (`row` = "NEW", in a trigger) to a roll-up; SQLite also back-fills
    with it (`row` = "usage": its upsert takes the rows one at a time). `WHERE true` keeps
    SQLite from reading ON CONFLICT as a join constraint."""
    source = "" if row == "NEW" else f" FROM {row}"
    return (
        f"INSERT INTO {table} ({ROLLUP_COLUMNS}) SELECT {rollup_values(d, row, size)}{source} WHERE true "
        f"ON CONFLICT ({', '.join(ROLLUP_KEYS)}) DO UPDATE SET {_rollup_merge(d.greatest, table)}"
    )


def rollup_table(table: str, types: Mapping[str, str]) -> str:
    """CREATE TABLE of a roll-up; `types` names the SQL types of int, float and text."""
    i, f, t = types["int"], types["float"], types["text"]
    cols = {
        "t": i, "key_id": t, "key_name": t, "model": t, "upstream": t, "upstream_model": t, "outcome": t,
        "requests": i, "prompt_tokens": i, "completion_tokens": i, "cached_tokens": i, "reasoning_tokens": i,
        "cost_usd": f, "estimated": i, "ttft_sum": f, "ttft_count": i, "duration_sum": f, "last_ts": f,
        "last_error": t, "last_error_ts": f,
    }
    nullable = ("key_name", "last_error", "last_error_ts")
    body = ",\n    ".join(f"{c} {kind}{'' if c in nullable else ' NOT NULL'}" for c, kind in cols.items())
    return f"CREATE TABLE {table} (\n    {body},\n    PRIMARY KEY ({', '.join(ROLLUP_KEYS)})\n)"


def _rollup_merge(greatest: str, table: str) -> str:
    """How a roll-up row absorbs one more (`excluded`)."""
    adds = ", ".join(
        f"{c} = {table}.{c} + excluded.{c}"
        for c in ROLLUP_MEASURES
        if c not in ("last_ts", "last_error", "last_error_ts")
    )
    return (
        f"{adds}, last_ts = {greatest}({table}.last_ts, excluded.last_ts), "
        "last_error = CASE WHEN excluded.last_error_ts IS NOT NULL AND "
        f"({table}.last_error_ts IS NULL OR excluded.last_error_ts >= {table}.last_error_ts) "
        f"THEN excluded.last_error ELSE {table}.last_error END, "
        f"last_error_ts = CASE WHEN {table}.last_error_ts IS NULL THEN excluded.last_error_ts "
        f"WHEN excluded.last_error_ts IS NULL THEN {table}.last_error_ts "
        f"ELSE {greatest}({table}.last_error_ts, excluded.last_error_ts) END"
    )


# -- filters -------------------------------------------------------------------------------


def _filters(f: UsageFilter, params: dict[str, Any]) -> list[str]:
    """The key/model/outcome terms, the same for the ledger and the roll-up."""
    terms = []
    if f.key_id is not None:
        terms.append("key_id = :key_id")
        params["key_id"] = f.key_id
    if f.model is not None:
        terms.append("model = :model")
        params["model"] = f.model
    # Only in the raw ledger (see _source): how the call was served.
    if f.client_dialect is not None:
        terms.append("client_dialect = :client_dialect")
        params["client_dialect"] = f.client_dialect
    if f.upstream_protocol is not None:
        terms.append("upstream_protocol = :upstream_protocol")
        params["upstream_protocol"] = f.upstream_protocol
    if f.outcome == ANY_ERROR:
        terms.append(ERRORS_SQL)
    elif f.outcome is not None:
        terms.append("outcome = :outcome")
        params["outcome"] = f.outcome
        if f.outcome in ERROR_OUTCOMES:
            terms.append(ERRORS_SQL)  # lets the partial error index serve the query
    return terms


def _raw_where(f: UsageFilter, params: dict[str, Any], lo: str, hi: str | None) -> str:
    terms = [f"ts >= :{lo}"] + ([f"ts < :{hi}"] if hi else []) + _filters(f, params)
    return " AND ".join(terms)


# -- listings ------------------------------------------------------------------------------


def list_query(since: float, key_id: str | None, limit: int) -> tuple[str, dict[str, Any]]:
    """Oldest first from `since` (Store.list_usage), for one key or all."""
    params: dict[str, Any] = {"since": since, "limit": limit}
    where = "ts >= :since"
    if key_id is not None:
        where += " AND key_id = :key_id"
        params["key_id"] = key_id
    return f"SELECT * FROM usage WHERE {where} ORDER BY ts, id LIMIT :limit", params


def page_query(f: UsageFilter, limit: int, after: Cursor | None) -> tuple[str, dict[str, Any]]:
    """Newest first; `after` is the (ts, id) of the last record of the previous page."""
    params: dict[str, Any] = {"since": f.since, "limit": limit}
    if f.until is not None:
        params["until"] = f.until
    where = _raw_where(f, params, "since", "until" if f.until is not None else None)
    if after is not None:
        where += " AND (ts < :cursor_ts OR (ts = :cursor_ts AND id < :cursor_id))"
        params["cursor_ts"], params["cursor_id"] = after
    return f"SELECT * FROM usage WHERE {where} ORDER BY ts DESC, id DESC LIMIT :limit", params


def sample_query(f: UsageFilter, n: int) -> tuple[str, dict[str, Any]]:
    """The newest `n` records' route and timings, for percentiles over a bounded sample."""
    params: dict[str, Any] = {"since": f.since, "limit": n}
    if f.until is not None:
        params["until"] = f.until
    where = _raw_where(f, params, "since", "until" if f.until is not None else None)
    return (
        f"SELECT upstream, upstream_model, ttft_ms, duration_ms FROM usage WHERE {where} "
        "ORDER BY ts DESC LIMIT :limit",
        params,
    )


# -- aggregates ----------------------------------------------------------------------------


def cover(
    lo: float, hi: float | None, levels: tuple[tuple[str, int], ...] = LEVELS
) -> list[tuple[str | None, float, float | None]]:
    """[lo, hi) split into (table, start, end) pieces, each read from one roll-up table of
    `levels` (coarsest first), or from the raw ledger (table None). A level takes the whole
    buckets inside its range and leaves the partial ones at either end to the next, finer
    one. An open end (hi None) stays open: the roll-ups hold every record up to now."""
    if hi is not None and hi <= lo:
        return []
    if not levels:
        return [(None, lo, hi)]
    (table, size), finer = levels[0], levels[1:]
    a = math.ceil(lo / size) * size
    b = None if hi is None else math.floor(hi / size) * size
    if b is not None and b <= a:
        return cover(lo, hi, finer)
    rest = cover(lo, a, finer) + ([] if b is None or hi is None else cover(b, hi, finer))
    return [(table, a, b), *rest]


def _source(d: Dialect, f: UsageFilter, params: dict[str, Any], finest: int, served: bool = False) -> str:
    """Roll-up rows for the whole days and hours in range, raw rows (rolled up on the fly)
    for the partial hours at either end: a UNION ALL with the roll-up's columns. Only
    roll-ups with buckets of at most `finest` seconds take part (an hourly series cannot
    read the daily one).

    The roll-ups do not keep how a call was served (client dialect, upstream protocol):
    grouping (`served`) or filtering by it reads raw rows only, with those two columns
    added. Exact as ever, but a scan of the range's rows (on the ts index): a diagnostic
    view, not the dashboard's default one."""
    parts: list[str] = []
    filters = _filters(f, params)
    served = served or f.by_served
    levels = () if served else tuple(level for level in LEVELS if level[1] <= finest)
    columns = rollup_values(d, "usage") + (", client_dialect, upstream_protocol" if served else "")
    for n, (table, lo, hi) in enumerate(cover(f.since, f.until, levels)):
        params[f"lo{n}"] = lo
        if hi is not None:
            params[f"hi{n}"] = hi
        if table is None:
            where = [f"ts >= :lo{n}"] + ([f"ts < :hi{n}"] if hi is not None else []) + filters
            parts.append(f"SELECT {columns} FROM usage WHERE {' AND '.join(where)}")
        else:
            where = [f"t >= :lo{n}"] + ([f"t < :hi{n}"] if hi is not None else []) + filters
            parts.append(f"SELECT {ROLLUP_COLUMNS} FROM {table} WHERE {' AND '.join(where)}")
    return " UNION ALL ".join(parts)


def _measures(d: Dialect) -> str:
    i, x = d.int_sum, d.float_sum
    return ", ".join(
        (
            f"{i.format('requests')} AS requests",
            f"{i.format(f'CASE WHEN {ERRORS_SQL} THEN requests ELSE 0 END')} AS errors",
            *(f"{i.format(c)} AS {c}" for c in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "estimated", "ttft_count")),
            *(f"{x.format(c)} AS {c}" for c in ("cost_usd", "ttft_sum", "duration_sum")),
            "MAX(last_ts) AS last_ts",
        )
    )


_DIMENSIONS: Mapping[str, tuple[str, ...]] = {
    "hour": ("t",),
    "day": ("(t / 86400) * 86400 AS t",),
    "key": ("key_id",),
    "model": ("model",),
    "key_model": ("key_id", "model"),
    "upstream": ("upstream", "upstream_model", "last_error"),
    "served": ("client_dialect", "upstream_protocol"),
}


def aggregate_query(d: Dialect, f: UsageFilter, by: str) -> tuple[str, dict[str, Any]]:
    """`by`: a Bucket (rows carry `t`, unix seconds) or a Grouping."""
    dims = _DIMENSIONS["day" if by == "day" else by]
    params: dict[str, Any] = {}
    source = _source(d, f, params, HOUR if by == "hour" else DAY, served=by == "served")
    names = [c.rsplit(" AS ", 1)[-1] for c in dims]
    extra = ""
    if "key_id" in names:
        extra = ", MAX(key_name) AS key_name"
    if by == "upstream":
        extra = ", MAX(last_error_ts) AS last_error_ts"
    sql = f"SELECT {', '.join(dims)}, {_measures(d)}{extra} FROM ({source}) AS u GROUP BY {', '.join(names)}"
    return sql, params


def cost_query(d: Dialect, f: UsageFilter) -> tuple[str, dict[str, Any]]:
    """The total cost of the records in `f` (a key's spend in its budget period)."""
    params: dict[str, Any] = {}
    source = _source(d, f, params, DAY)
    return f"SELECT {d.float_sum.format('cost_usd')} AS cost_usd FROM ({source}) AS u", params


def check_bucket(bucket: str) -> Bucket:
    if bucket not in _BUCKET_SECONDS:
        raise ValueError("bucket must be hour or day")
    return bucket  # type: ignore[return-value]


def check_grouping(by: str) -> Grouping:
    if by not in _GROUPINGS:
        raise ValueError("by must be one of: " + ", ".join(_GROUPINGS))
    return by  # type: ignore[return-value]


def _totals(row: Row) -> dict[str, Any]:
    return {
        "requests": int(row["requests"]),
        "errors": int(row["errors"]),
        "prompt_tokens": int(row["prompt_tokens"]),
        "completion_tokens": int(row["completion_tokens"]),
        "cached_tokens": int(row["cached_tokens"]),
        "reasoning_tokens": int(row["reasoning_tokens"]),
        "cost_usd": float(row["cost_usd"]),
        "estimated": int(row["estimated"]),
        "ttft_avg_ms": float(row["ttft_sum"]) / int(row["ttft_count"]) if row["ttft_count"] else None,
        "duration_avg_ms": float(row["duration_sum"]) / int(row["requests"]) if row["requests"] else None,
        "last_ts": row["last_ts"],
    }


async def series(fetch: Fetch, d: Dialect, f: UsageFilter, bucket: str) -> list[dict[str, Any]]:
    sql, params = aggregate_query(d, f, check_bucket(bucket))
    rows = [{"t": int(r["t"]), **_totals(r)} for r in await fetch(sql, params)]
    return sorted(rows, key=lambda r: r["t"])


async def groups(fetch: Fetch, d: Dialect, f: UsageFilter, by: str) -> list[dict[str, Any]]:
    """One row per group, ordered by group (None last), with a `group` label:
    key → the key's name (and `key_id`), model, day → YYYY-MM-DD (UTC),
    key_model → "name/model" (and `key_id`, `key_name`, `model`),
    upstream → "upstream/upstream_model" (and both, `last_error`, `last_error_ts`),
    served → "client_dialect → upstream_protocol" (and both; None for records written
    before the gateway kept them)."""
    by = check_grouping(by)
    sql, params = aggregate_query(d, f, "day" if by == "day" else by)
    rows = await fetch(sql, params)
    if by == "upstream":
        return _merge_routes(rows)
    out = []
    for r in rows:
        g = _totals(r)
        if by == "day":
            g = {"group": _day(int(r["t"])), **g}
        elif by == "model":
            g = {"group": r["model"], **g}
        elif by == "served":
            cd, up = r["client_dialect"], r["upstream_protocol"]
            label = None if cd is None and up is None else f"{cd or '?'} → {up or '?'}"
            g = {"group": label, "client_dialect": cd, "upstream_protocol": up, **g}
        else:
            key_id = r["key_id"] or None
            if by == "key":
                g = {"group": r["key_name"], "key_id": key_id, **g}
            else:
                label = f"{r['key_name']}/{r['model']}"
                g = {"group": label, "key_id": key_id, "key_name": r["key_name"], "model": r["model"], **g}
        out.append(g)
    return sorted(out, key=lambda g: (g["group"] is None, g["group"] or "", g.get("key_id") or ""))


def _merge_routes(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows come per (route, last error of a roll-up cell): add them up per route and keep
    the error with the latest time."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        route = (r["upstream"], r["upstream_model"])
        g = merged.get(route)
        t = _totals(r)
        if g is None:
            g = merged[route] = {"group": f"{route[0]}/{route[1]}", "upstream": route[0], "upstream_model": route[1],
                                 **t, "ttft_sum": 0.0, "ttft_count": 0, "duration_sum": 0.0,
                                 "last_error": None, "last_error_ts": None}
        else:
            for c in ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "estimated", "cost_usd"):
                g[c] += t[c]
            g["last_ts"] = max(g["last_ts"], t["last_ts"])
        g["ttft_sum"] += float(r["ttft_sum"])
        g["ttft_count"] += int(r["ttft_count"])
        g["duration_sum"] += float(r["duration_sum"])
        if r["last_error_ts"] is not None and (g["last_error_ts"] is None or r["last_error_ts"] >= g["last_error_ts"]):
            g["last_error"], g["last_error_ts"] = r["last_error"], r["last_error_ts"]
    out = []
    for g in merged.values():
        count, requests = g.pop("ttft_count"), g["requests"]
        g["ttft_avg_ms"] = g.pop("ttft_sum") / count if count else None
        g["duration_avg_ms"] = g.pop("duration_sum") / requests if requests else None
        out.append(g)
    return sorted(out, key=lambda g: (g["upstream"], g["upstream_model"]))


def _day(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d")


def legacy_summary(rows: list[dict[str, Any]]) -> list[dict[str, object]]:
    """`summarize_usage`'s original row shape (key, model, day), kept for its callers."""
    fields = ("group", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "estimated")
    return [{k: r[k] for k in fields} for r in rows]


_PARAM = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")


def numbered(sql: str, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """`:name` parameters as PostgreSQL's `$1, $2, ...` (casts `::type` are left alone)."""
    order: dict[str, int] = {}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in order:
            order[name] = len(order) + 1
        return f"${order[name]}"

    out = _PARAM.sub(sub, sql)
    return out, [params[name] for name in order]


class LedgerViews(ABC):
    """The reads of the usage ledger, written once for both SQL stores: a store names its
    SQL flavour (`_flavour`) and runs one query written with `:name` parameters
    (`_query`); everything between a view's arguments and its answer is here."""

    _flavour: ClassVar[Dialect]

    @abstractmethod
    async def _query(self, what: str, sql: str, params: dict[str, Any]) -> Sequence[Row]:
        """Run one statement (on its own, committed if it writes) and return its rows; a
        failure is a StoreError naming `what`, never the SQL."""

    async def list_usage(self, since: float, key_id: str | None = None, limit: int = 10_000) -> list[UsageRecord]:
        if limit <= 0:
            return []
        return [usage_from_row(row) for row in await self._query("list usage", *list_query(since, key_id, limit))]

    async def summarize_usage(self, since: float, by: GroupBy, key_id: str | None = None) -> list[dict[str, object]]:
        if by not in _LEGACY_GROUPS:
            raise ValueError("by must be one of: key, model, day")
        return legacy_summary(await self.usage_groups(UsageFilter(since=since, key_id=key_id), by))

    async def page_usage(self, f: UsageFilter, limit: int, after: Cursor | None = None) -> list[UsageRecord]:
        if limit <= 0:
            return []
        return [usage_from_row(row) for row in await self._query("list usage", *page_query(f, limit, after))]

    async def usage_series(self, f: UsageFilter, bucket: Bucket) -> list[dict[str, Any]]:
        return await series(lambda sql, p: self._query("usage series", sql, p), self._flavour, f, bucket)

    async def usage_groups(self, f: UsageFilter, by: Grouping) -> list[dict[str, Any]]:
        return await groups(lambda sql, p: self._query("usage groups", sql, p), self._flavour, f, by)

    async def usage_sample(self, f: UsageFilter, n: int) -> list[tuple[str, str, float | None, float]]:
        rows = await self._query("usage sample", *sample_query(f, n))
        return [(r["upstream"], r["upstream_model"], r["ttft_ms"], r["duration_ms"]) for r in rows]

    async def spend_usd(self, key_id: str, since: float) -> float:
        # From the roll-ups: a budget period of a busy key is thousands of rows, not 100,000s.
        rows = await self._query("spend", *cost_query(self._flavour, UsageFilter(since=since, key_id=key_id)))
        return float(rows[0]["cost_usd"])
