"""How fast the operator views answer on a big usage ledger (issue 24: "well under a
second with a million records").

Fills a store with N usage records (default 1,000,000) spread over the last 30 days in
time order, through the store's own `write_usage` (so the roll-up trigger does its real
work), then times what the dashboard asks for: the overview for 24 h / 7 d / 30 d, the
upstream table, and the usage explorer (first page and a deep page, each filter, series
and key x model groups, a range with unaligned ends, a CSV-sized page).

    python -m bench.ledger                          # SQLite, 1,000,000 records (~2-4 min to fill)
    python -m bench.ledger --records 100000         # quicker
    python -m bench.ledger --pg postgresql://u@127.0.0.1:5432/db   # PostgreSQL (an empty database)
    python -m bench.ledger --keep /tmp/ledger.db    # keep (and reuse) the SQLite file

The shape: 50 keys and 12 models with skewed popularity (a few heavy users and models,
a long tail), 3% upstream errors, 1% client aborts, 0.2% timeouts. Every timing is the
median of `--repeat` runs, in milliseconds, measured in this process through the async
store API (what the admin handlers call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.admin_stats import overview_doc, upstreams_doc
from proxy.store import open_store
from proxy.store.base import KeyLimits, Store, UsageFilter, UsageRecord

DAY = 86_400.0
BATCH = 5_000


def make_records(total: int, first: int, count: int, now: float, key_ids: list[tuple[str, str]]) -> list[UsageRecord]:
    """Records `first` .. `first + count - 1` of `total`, evenly spread over 30 days."""
    rnd = random.Random(first)
    models = [f"model-{i:02d}" for i in range(12)]
    model_w = [1 / (i + 1) for i in range(len(models))]
    key_w = [1 / (i + 1) ** 0.8 for i in range(len(key_ids))]
    start = now - 30 * DAY
    step = 30 * DAY / total
    keys = rnd.choices(key_ids, key_w, k=count)
    picked = rnd.choices(models, model_w, k=count)
    out = []
    for j in range(count):
        i = first + j
        key_id, key_name = keys[j]
        model = picked[j]
        roll = rnd.random()
        outcome, error, status = "ok", None, 200
        if roll < 0.03:
            outcome, error, status = "upstream_error", "upstream_502", 502
        elif roll < 0.04:
            outcome, error = "client_abort", "client_abort"
        elif roll < 0.042:
            outcome, error, status = "timeout", "upstream_timeout", 504
        prompt = rnd.randint(50, 8000)
        completion = 0 if status != 200 else rnd.randint(1, 1500)
        out.append(
            UsageRecord(
                id=f"req_{i:09d}",
                ts=start + i * step + rnd.random() * step,
                key_id=key_id,
                key_name=key_name,
                endpoint="chat.completions",
                model=model,
                upstream=f"provider-{int(model[-2:]) % 3}",
                upstream_model=model + "-2026",
                stream=True,
                status=status,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=prompt // 4,
                cost_usd=(prompt * 0.15 + completion * 0.6) / 1e6,
                ttft_ms=None if status != 200 else rnd.uniform(150, 2500),
                duration_ms=rnd.uniform(200, 30_000),
                error=error,
                outcome=outcome,  # type: ignore[arg-type]
            )
        )
    return out


async def fill(store: Store, n: int, now: float) -> float:
    """Writes N records unless the store already holds them; seconds spent writing."""
    existing = await store.page_usage(UsageFilter(), 1)
    if existing:
        print("store already filled: reusing it", file=sys.stderr)
        return 0.0
    key_ids = []
    for i in range(50):
        record, _ = await store.create_key(f"dev-{i:02d}", KeyLimits())
        key_ids.append((record.id, record.name))
    t0 = time.perf_counter()
    for chunk_start in range(0, n, 100_000):  # built a chunk at a time: bounded memory
        records = make_records(n, chunk_start, min(100_000, n - chunk_start), now, key_ids)
        for b in range(0, len(records), BATCH):
            await store.write_usage(records[b : b + BATCH])
        print(f"  {chunk_start + len(records):,} records written", file=sys.stderr)
    return time.perf_counter() - t0


async def timed(repeat: int, fn: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def run(url: str, n: int, repeat: int) -> list[tuple[str, float]]:
    store = open_store(url)
    await store.open()
    try:
        now = time.time()
        seconds = await fill(store, n, now)
        if seconds:
            print(f"fill: {n:,} records in {seconds:.0f} s ({n / seconds:,.0f} records/s)", file=sys.stderr)
        key = (await store.list_keys())[0].id
        deep: list[Any] = []

        async def deep_page() -> None:
            after = None
            for _ in range(10):  # ten pages of 100: the 1,000th record
                page = await store.page_usage(UsageFilter(since=now - 7 * DAY), 100, after)
                after = (page[-1].ts, page[-1].id)
            deep.append(after)

        month = UsageFilter(since=now - 30 * DAY)
        cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("overview 24h", lambda: overview_doc(store, "24h", now)),
            ("overview 7d", lambda: overview_doc(store, "7d", now)),
            ("overview 30d", lambda: overview_doc(store, "30d", now)),
            ("upstreams 24h", lambda: upstreams_doc(store, now - DAY)),
            ("upstreams 30d", lambda: upstreams_doc(store, now - 30 * DAY)),
            ("explorer: first page, 30d", lambda: store.page_usage(month, 101)),
            ("explorer: 10th page, 7d", deep_page),
            ("explorer: page, key filter", lambda: store.page_usage(UsageFilter(since=now - 30 * DAY, key_id=key), 101)),
            ("explorer: page, rare model", lambda: store.page_usage(UsageFilter(since=now - 30 * DAY, model="model-11"), 101)),
            ("explorer: page, errors only", lambda: store.page_usage(UsageFilter(since=now - 30 * DAY, outcome="error"), 101)),
            ("explorer: page, timeouts of a key", lambda: store.page_usage(
                UsageFilter(since=now - 30 * DAY, key_id=key, outcome="timeout"), 101)),
            ("explorer: series 30d by day, key", lambda: store.usage_series(UsageFilter(since=now - 30 * DAY, key_id=key), "day")),
            ("explorer: series 7d by hour, model", lambda: store.usage_series(
                UsageFilter(since=now - 7 * DAY, model="model-03"), "hour")),
            ("explorer: key x model, 30d", lambda: store.usage_groups(month, "key_model")),
            ("explorer: by day, unaligned 30d", lambda: store.usage_groups(
                UsageFilter(since=now - 30 * DAY + 1234.5, until=now - 1800.25), "day")),
            ("explorer: CSV page of 10,000", lambda: store.page_usage(month, 10_000)),
            ("budget: the busiest key's spend over 30 d", lambda: store.spend_usd(key, now - 30 * DAY)),
        ]
        results = []
        for name, fn in cases:
            ms = await timed(repeat, fn)
            results.append((name, ms))
            print(f"{name:40s} {ms:9.1f} ms", file=sys.stderr)
        return results
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--pg", help="a PostgreSQL URL (an empty database) instead of SQLite")
    p.add_argument("--keep", help="SQLite file to fill (reused when already filled); default a temp file")
    args = p.parse_args()
    if args.pg:
        url = args.pg
    else:
        path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ledger-bench-")) / "ledger.db"
        url = f"sqlite:///{path}"
    results = asyncio.run(run(url, args.records, args.repeat))
    print(f"\n| query ({args.records:,} records, {'PostgreSQL' if args.pg else 'SQLite'}) | median ms |")
    print("|---|---:|")
    for name, ms in results:
        print(f"| {name} | {ms:.1f} |")
    if not args.pg and not args.keep:
        db = Path(url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            if Path(str(db) + suffix).exists():
                os.remove(str(db) + suffix)


if __name__ == "__main__":
    main()
