"""The store contract: one suite, run against SQLite and a real PostgreSQL.

Backend-specific tests (outage, bad credentials, WAL, event-loop blocking) follow the
shared suite. Every StoreError checked here must not carry the DSN password.
"""

from __future__ import annotations

import asyncio
import math
import socket
import sqlite3
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from _postgres import PostgresServer
from proxy.keys import digest_key, display_prefix, well_formed
from proxy.store import PostgresStore, SQLiteStore, open_store
from proxy.store import postgres as pg_backend
from proxy.store import sqlite as sqlite_backend
from proxy.sessions import Sessions
from proxy.store.base import DuplicateName, KeyLimits, KeyRecord, SessionRecord, Store, StoreError, UsageRecord

DAY = 86_400.0
MASTER = "master-key-for-session-tests-0123"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z

# Inputs shaped like injections (CVE-2026-42208 and friends): stored and matched literally.
SQL_SHAPED = [
    "x'); DROP TABLE keys;--",
    "' OR '1'='1",
    '" OR 1=1 --',
    "x' OR (SELECT pg_sleep(8)) IS NOT NULL --",
    "x' || randomblob(1000000000) || '",
    "$1 $$; ROLLBACK; --",
    "%_\\",
    "ключ 🔑",
]


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/dir/llm-proxy.db"  # parent dirs do not exist yet
    url: str = request.getfixturevalue("pg_store_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def migrations_count(url: str) -> int:
    return len(sqlite_backend.MIGRATIONS if is_sqlite(url) else pg_backend.MIGRATIONS)


def rec(id: str, ts: float, key: KeyRecord | None = None, **fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "id": id,
        "ts": ts,
        "key_id": key.id if key else None,
        "key_name": key.name if key else None,
        "endpoint": "chat.completions",
        "model": "gpt-4o",
        "upstream": "openai",
        "upstream_model": "gpt-4o-2024-08-06",
        "stream": True,
        "status": 200,
    }
    return UsageRecord(**(base | fields))


async def dump(url: str) -> str:
    """Everything the backend persisted, as text."""
    if is_sqlite(url):
        path = sqlite_path(url)
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        return "".join(f.read_bytes().decode("latin-1") for f in files if f.exists())
    conn = await asyncpg.connect(url)
    try:
        tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables == {"keys", "usage", "usage_hourly", "usage_daily", "schema_version", "ui_sessions"}, (
            "a new table must be added to this dump")
        rows = [
            *await conn.fetch("SELECT t::text FROM keys t"),
            *await conn.fetch("SELECT t::text FROM ui_sessions t"),
            *await conn.fetch("SELECT t::text FROM usage t"),
            *await conn.fetch("SELECT t::text FROM usage_hourly t"),
            *await conn.fetch("SELECT t::text FROM usage_daily t"),
            *await conn.fetch("SELECT t::text FROM schema_version t"),
        ]
        return "\n".join(r[0] for r in rows)
    finally:
        await conn.close()


async def schema_versions(url: str) -> list[int]:
    if is_sqlite(url):
        with sqlite3.connect(sqlite_path(url)) as conn:
            return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
    finally:
        await conn.close()


async def add_schema_version(url: str, version: int) -> None:
    if is_sqlite(url):
        conn = sqlite3.connect(sqlite_path(url))
        with conn:
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 0)", (version,))
        conn.close()
        return
    pconn = await asyncpg.connect(url)
    try:
        await pconn.execute("INSERT INTO schema_version (version, applied_at) VALUES ($1, 0)", version)
    finally:
        await pconn.close()


def assert_no_secret(exc: BaseException, url: str) -> None:
    """Neither the message, the repr nor a logged traceback may show the password or DSN."""
    text = repr(exc) + "".join(traceback.format_exception(exc))
    password = urlsplit(url).password
    if password:
        assert password not in text
    assert url not in text


def expected_summary(records: list[UsageRecord], by: str, since: float, key_id: str | None = None) -> list[dict[str, object]]:
    groups: dict[str | None, dict[str, Any]] = {}
    for r in records:
        if r.ts < since or (key_id is not None and r.key_id != key_id):
            continue
        day = datetime.fromtimestamp(math.floor(r.ts), UTC).strftime("%Y-%m-%d")
        group = {"key": r.key_name, "model": r.model, "day": day}[by]
        g = groups.setdefault(group, {"group": group, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                      "cached_tokens": 0, "cost_usd": 0.0, "estimated": 0})
        g["requests"] += 1
        g["prompt_tokens"] += r.prompt_tokens
        g["completion_tokens"] += r.completion_tokens
        g["cached_tokens"] += r.cached_tokens
        g["cost_usd"] += r.cost_usd
        g["estimated"] += int(r.estimated)
    return [groups[k] for k in sorted(groups, key=lambda k: (k is None, k or ""))]


def assert_summary(actual: list[dict[str, object]], expected: list[dict[str, object]]) -> None:
    assert [row["group"] for row in actual] == [row["group"] for row in expected]
    for got, want in zip(actual, expected):
        assert set(got) == set(want)
        assert got["cost_usd"] == pytest.approx(want["cost_usd"])
        assert type(got["cost_usd"]) is float
        for field in ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "estimated"):
            assert got[field] == want[field] and type(got[field]) is int, field


# -- keys --------------------------------------------------------------------------------


async def test_create_key_returns_plaintext_once_and_stores_only_the_digest(store: Store, store_url: str) -> None:
    limits = KeyLimits(models=("gpt-4o", "claude-sonnet"), rpm=60, tpm=100_000, max_parallel=4,
                       budget_usd=12.5, budget_period="month", expires_at=T0 + 365 * DAY)
    before = time.time()
    record, plaintext = await store.create_key("team-a", limits)

    assert well_formed(plaintext)
    assert record.digest == digest_key(plaintext)
    assert record.prefix == display_prefix(plaintext)
    assert record.id.startswith("key_") and len(record.id) == 20
    assert (record.name, record.models, record.rpm, record.tpm, record.max_parallel) == (
        "team-a", ("gpt-4o", "claude-sonnet"), 60, 100_000, 4)
    assert (record.budget_usd, record.budget_period, record.expires_at) == (12.5, "month", T0 + 365 * DAY)
    assert record.revoked_at is None and before <= record.created_at <= time.time()
    assert await store.get_key(record.id) == record
    assert plaintext not in repr(await store.list_keys())

    stored = await dump(store_url)
    assert record.digest in stored  # the dump does hold the key row...
    secret_part = plaintext[len(record.prefix):]
    assert plaintext not in stored and secret_part not in stored  # ...but never the key


async def test_duplicate_name_is_refused(store: Store) -> None:
    first, _ = await store.create_key("dup", KeyLimits())
    with pytest.raises(DuplicateName) as info:
        await store.create_key("dup", KeyLimits(rpm=1))
    assert isinstance(info.value, StoreError)
    assert await store.list_keys() == [first]
    # names are exact: other case or trailing space is another name
    await store.create_key("Dup", KeyLimits())
    await store.create_key("dup ", KeyLimits())
    assert sorted(k.name for k in await store.list_keys()) == ["Dup", "dup", "dup "]


async def test_key_by_digest(store: Store) -> None:
    a, key_a = await store.create_key("a", KeyLimits())
    b, key_b = await store.create_key("b", KeyLimits())
    assert await store.key_by_digest(digest_key(key_a)) == a
    assert await store.key_by_digest(digest_key(key_b)) == b
    assert await store.key_by_digest(digest_key(key_a + "x")) is None
    assert await store.key_by_digest(a.digest.upper()) is None  # exact match, no case folding
    assert await store.key_by_digest("") is None


async def test_get_key_by_id_or_name(store: Store) -> None:
    a, _ = await store.create_key("alpha", KeyLimits())
    assert await store.get_key(a.id) == a
    assert await store.get_key("alpha") == a
    assert await store.get_key("ALPHA") is None
    assert await store.get_key("key_0000000000000000") is None
    # a key *named* like another key's id never shadows that key
    b, _ = await store.create_key(a.id, KeyLimits())
    assert await store.get_key(a.id) == a
    assert await store.get_key(b.id) == b


async def test_list_keys(store: Store) -> None:
    assert await store.list_keys() == []
    created = [(await store.create_key(name, KeyLimits(rpm=i)))[0] for i, name in enumerate(["c", "a", "b"])]
    assert await store.list_keys() == sorted(created, key=lambda r: (r.created_at, r.id))


async def test_update_key_replaces_limits(store: Store) -> None:
    original, _ = await store.create_key("u", KeyLimits(models=("a",), rpm=1))
    limits = KeyLimits(models=("x", "y"), rpm=10, tpm=20, max_parallel=3, budget_usd=99.5,
                       budget_period="day", expires_at=T0 + DAY)
    updated = await store.update_key("u", limits)
    assert updated == replace(original, models=("x", "y"), rpm=10, tpm=20, max_parallel=3, budget_usd=99.5,
                              budget_period="day", expires_at=T0 + DAY)
    assert await store.get_key(original.id) == updated

    cleared = await store.update_key(original.id, KeyLimits())
    assert cleared == replace(original, models=(), rpm=None)
    assert await store.update_key("missing", limits) is None
    assert await store.list_keys() == [cleared]


async def test_revoke_is_idempotent(store: Store) -> None:
    key, _ = await store.create_key("r", KeyLimits())
    other, _ = await store.create_key("o", KeyLimits())
    before = time.time()
    revoked = await store.revoke_key("r")
    assert revoked is not None and revoked.revoked_at is not None
    assert before <= revoked.revoked_at <= time.time()
    assert revoked == replace(key, revoked_at=revoked.revoked_at)
    assert not revoked.is_active(time.time())

    assert await store.revoke_key(key.id) == revoked  # the first revocation time stays
    assert await store.key_by_digest(key.digest) == revoked  # still found, so auth can tell "revoked"
    assert await store.get_key("o") == other
    assert await store.revoke_key("nope") is None


async def test_expiry_via_is_active(store: Store) -> None:
    now = time.time()
    past, _ = await store.create_key("past", KeyLimits(expires_at=now - 1))
    future, _ = await store.create_key("future", KeyLimits(expires_at=now + 3600.25))
    never, _ = await store.create_key("never", KeyLimits())
    past_r, future_r, never_r = [await store.key_by_digest(k.digest) for k in (past, future, never)]
    assert past_r is not None and future_r is not None and never_r is not None
    assert future_r.expires_at == now + 3600.25  # floats round-trip exactly
    assert not past_r.is_active(now)
    assert future_r.is_active(now) and not future_r.is_active(now + 3600.25)
    assert never_r.is_active(now + 100 * 365 * DAY)


# -- usage -------------------------------------------------------------------------------


async def test_write_usage_is_idempotent(store: Store) -> None:
    r1 = rec("req-1", T0, prompt_tokens=10, cost_usd=0.5)
    await store.write_usage([r1])
    await store.write_usage([r1])
    assert await store.list_usage(0) == [r1]

    # a replay carrying other numbers does not rewrite what was billed: first write wins
    await store.write_usage([r1._replace(prompt_tokens=999, cost_usd=99.0)])
    assert await store.list_usage(0) == [r1]

    r2, r3 = rec("req-2", T0 + 1, cost_usd=0.25), rec("req-3", T0 + 2, cost_usd=0.125)
    await store.write_usage([r2, r2, r3, r1, r3])  # duplicates inside the batch and against the table
    assert await store.list_usage(0) == [r1, r2, r3]
    await store.write_usage([])
    assert len(await store.list_usage(0)) == 3


async def test_batches_of_any_size_are_written_whole(store: Store) -> None:
    """A batch is split into INSERTs of fixed row counts (SQLite); every size from one row
    to several hundred lands completely, once, with each row's own values."""
    written: list[UsageRecord] = []
    for size in (1, 2, 3, 63, 64, 65, 127, 130, 501):
        batch = [rec(f"b{size}-{i:04d}", T0 + len(written) + i, prompt_tokens=i, cost_usd=i / 8) for i in range(size)]
        await store.write_usage(batch)
        written += batch
    got = await store.list_usage(0, limit=len(written) + 10)
    assert got == written


async def test_usage_round_trips_every_field(store: Store) -> None:
    key, _ = await store.create_key("k", KeyLimits())
    full = rec("full", T0 + 0.123456, key, endpoint="messages", model="claude-sonnet", upstream="anthropic",
               upstream_model="claude-sonnet-4-5", stream=False, status=499, prompt_tokens=1_000_000_000_000,
               completion_tokens=2, cached_tokens=3, cache_creation_tokens=4, reasoning_tokens=5,
               cost_usd=0.000123, estimated=True, ttft_ms=123.25, duration_ms=4567.5,
               error="upstream_timeout", outcome="client_abort", client_dialect="openai", upstream_protocol="anthropic",
               attempt=3)
    bare = rec("bare", T0 + 1)  # no key, no ttft, no error, no dialects nor attempt (records from before they were kept)
    await store.write_usage([bare, full])
    assert await store.list_usage(0) == [full, bare]


async def test_list_usage_filters(store: Store) -> None:
    k1, _ = await store.create_key("k1", KeyLimits())
    k2, _ = await store.create_key("k2", KeyLimits())
    records = [rec(f"r{i}", T0 + 60 * i, (k1, k2, None)[i % 3]) for i in range(9)]
    records.append(rec("r9-same-ts", T0 + 60 * 4))  # ties on ts are ordered by id
    await store.write_usage(records[::-1])
    by_time = sorted(records, key=lambda r: (r.ts, r.id))

    assert await store.list_usage(0) == by_time
    assert await store.list_usage(T0 + 240) == [r for r in by_time if r.ts >= T0 + 240]  # since is inclusive
    assert await store.list_usage(0, key_id=k1.id) == [r for r in by_time if r.key_id == k1.id]
    assert await store.list_usage(T0 + 1, key_id=k2.id) == [r for r in by_time if r.key_id == k2.id and r.ts >= T0 + 1]
    assert await store.list_usage(0, limit=2) == by_time[:2]
    assert await store.list_usage(0, limit=0) == []
    assert await store.list_usage(T0 + DAY) == []
    assert await store.list_usage(0, key_id="key_missing") == []


async def test_summarize_usage(store: Store) -> None:
    a, _ = await store.create_key("a", KeyLimits())
    b, _ = await store.create_key("b", KeyLimits())
    records = [
        rec("old", T0 - 1, a, prompt_tokens=1000, cost_usd=9.0),  # before `since`
        rec("u1", T0 + 10, a, model="m1", prompt_tokens=10, completion_tokens=5, cached_tokens=2, cost_usd=0.1),
        rec("u2", math.nextafter(T0 + DAY, 0), a, model="m2", prompt_tokens=20, completion_tokens=6, cost_usd=0.2),
        rec("u3", T0 + DAY, b, model="m1", prompt_tokens=30, completion_tokens=7, cached_tokens=1, cost_usd=0.3),
        rec("u4", T0 + DAY + 5, None, model="m2", prompt_tokens=40, completion_tokens=8, cost_usd=0.4),
        rec("u5", T0 + 2 * DAY + 1, b, model="m1", prompt_tokens=50, completion_tokens=9, cost_usd=0.5,
            estimated=True),
    ]
    await store.write_usage(records)

    by_day = await store.summarize_usage(T0, "day")
    # UTC calendar days; the last instant before midnight still counts for its own day
    assert [row["group"] for row in by_day] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert [row["requests"] for row in by_day] == [2, 2, 1]
    for by in ("key", "model", "day"):
        assert_summary(await store.summarize_usage(T0, by), expected_summary(records, by, T0))  # type: ignore[arg-type]
        assert_summary(await store.summarize_usage(T0, by, key_id=b.id),  # type: ignore[arg-type]
                       expected_summary(records, by, T0, b.id))
    assert (await store.summarize_usage(0, "key"))[0] == {
        "group": "a", "requests": 3, "prompt_tokens": 1030, "completion_tokens": 11, "cached_tokens": 2,
        "cost_usd": pytest.approx(9.3), "estimated": 0}
    assert (await store.summarize_usage(0, "key"))[-1]["group"] is None  # unkeyed rows last
    assert await store.summarize_usage(T0 + 10 * DAY, "model") == []
    with pytest.raises(ValueError):
        await store.summarize_usage(0, "week")  # type: ignore[arg-type]


async def test_spend_usd(store: Store) -> None:
    k1, _ = await store.create_key("k1", KeyLimits())
    k2, _ = await store.create_key("k2", KeyLimits())
    await store.write_usage([
        rec("a", T0 - 10, k1, cost_usd=1.0),
        rec("b", T0, k1, cost_usd=0.1),
        rec("c", T0 + 100, k1, cost_usd=0.2),
        rec("d", T0 + 50, k2, cost_usd=5.0),
        rec("e", T0 + 50, None, cost_usd=7.0),
    ])
    assert await store.spend_usd(k1.id, T0) == pytest.approx(0.3)
    assert await store.spend_usd(k1.id, 0) == pytest.approx(1.3)
    assert await store.spend_usd(k2.id, T0) == 5.0
    spent = await store.spend_usd("key_nobody", 0)
    assert spent == 0.0 and type(spent) is float


# -- hostile input, migrations, concurrency, health ---------------------------------------


async def test_dashboard_sessions(store: Store, store_url: str) -> None:
    """Sessions by digest: found until deleted; making one drops the expired ones; the
    session id itself is never stored."""
    now = time.time()
    live = SessionRecord("a" * 64, "master", None, "b" * 64, now, now + 3600)
    keyed = SessionRecord("c" * 64, "key", "key_0123456789abcdef", "", now, now + 60)
    await store.create_session(live)
    await store.create_session(keyed)
    assert await store.get_session(live.digest) == live
    assert await store.get_session(keyed.digest) == keyed
    assert await store.get_session("d" * 64) is None
    with pytest.raises(StoreError):
        await store.create_session(live)  # the digest is the primary key
    await store.delete_session(live.digest)
    await store.delete_session(live.digest)  # idempotent
    assert await store.get_session(live.digest) is None
    await store.create_session(SessionRecord("e" * 64, "master", None, "f" * 64, now + 120, now + 3600))
    assert await store.get_session(keyed.digest) is None  # expired by then: swept
    sid, _ = await Sessions(store, 60).sign_in(MASTER, MASTER)  # type: ignore[misc]
    assert sid not in await dump(store_url)


async def test_sql_shaped_inputs_are_stored_literally_and_harmless(store: Store) -> None:
    keys = {name: (await store.create_key(name, KeyLimits(models=(name,))))[0] for name in SQL_SHAPED}
    for name, key in keys.items():
        assert await store.get_key(name) == key and key.models == (name,)
    assert sorted(k.name for k in await store.list_keys()) == sorted(SQL_SHAPED)

    started = time.monotonic()
    for probe in SQL_SHAPED:
        assert await store.key_by_digest(probe) is None
    assert time.monotonic() - started < 2  # no pg_sleep ran
    probe = "x' OR 'a'='a"
    assert await store.get_key(probe) is None
    assert await store.update_key(probe, KeyLimits(rpm=1)) is None
    assert await store.revoke_key(probe) is None
    assert all(k.rpm is None and k.revoked_at is None for k in await store.list_keys())

    records = [rec(name, T0 + i, keys[name], model=name, error=name) for i, name in enumerate(SQL_SHAPED)]
    await store.write_usage(records)
    assert await store.list_usage(0) == records
    assert [r["group"] for r in await store.summarize_usage(0, "model")] == sorted(SQL_SHAPED)
    assert await store.spend_usd(SQL_SHAPED[0], 0) == 0.0  # a name is not an id
    assert len(await store.list_keys()) == len(SQL_SHAPED)  # the keys table is still there


async def test_migration_is_idempotent(store_url: str) -> None:
    first = open_store(store_url)
    await first.open()
    key, _ = await first.create_key("k", KeyLimits())
    usage = rec("r", T0, key)
    await first.write_usage([usage])
    await first.close()
    versions = list(range(1, migrations_count(store_url) + 1))
    assert await schema_versions(store_url) == versions

    again = open_store(store_url)
    await again.open()
    await again.open()  # a second open on an open store is a no-op
    try:
        assert await again.get_key("k") == key
        assert await again.list_usage(0) == [usage]
    finally:
        await again.close()
    assert await schema_versions(store_url) == versions


async def test_processes_starting_together_migrate_once(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(5)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await asyncio.gather(*(s.ping() for s in stores))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert await schema_versions(store_url) == list(range(1, migrations_count(store_url) + 1))


async def test_newer_schema_is_refused(store_url: str) -> None:
    s = open_store(store_url)
    await s.open()
    await s.close()
    await add_schema_version(store_url, migrations_count(store_url) + 1)
    with pytest.raises(StoreError) as info:
        await open_store(store_url).open()
    assert_no_secret(info.value, store_url)


async def test_concurrent_writes_from_many_tasks(store: Store) -> None:
    key, _ = await store.create_key("busy", KeyLimits())

    async def writer(i: int) -> None:
        batch = [rec(f"r{i:02}-{j:02}", T0 + j, key, prompt_tokens=1) for j in range(20)]
        batch.append(rec(f"r{(i + 1) % 50:02}-00", T0, key, prompt_tokens=1))  # overlaps a neighbour
        await store.write_usage(batch)

    await asyncio.gather(*(writer(i) for i in range(50)))
    rows = await store.list_usage(0, limit=100_000)
    assert len(rows) == 1000 and len({r.id for r in rows}) == 1000
    [summary] = await store.summarize_usage(0, "key")
    assert summary["requests"] == 1000 and summary["prompt_tokens"] == 1000

    results = await asyncio.gather(*(store.create_key("race", KeyLimits()) for _ in range(10)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, DuplicateName) for r in results if isinstance(r, BaseException))
    await asyncio.gather(*(store.create_key(f"n{i}", KeyLimits()) for i in range(20)))
    assert len(await store.list_keys()) == 22


async def test_ping_and_closed_store(store: Store, store_url: str) -> None:
    await store.ping()
    with pytest.raises(StoreError) as info:
        await open_store(store_url).ping()  # never opened
    assert_no_secret(info.value, store_url)
    await store.close()
    await store.close()  # closing twice is fine
    for call in (store.ping, store.list_keys, lambda: store.write_usage([rec("x", T0)])):
        with pytest.raises(StoreError) as info:
            await call()
        assert_no_secret(info.value, store_url)


# -- PostgreSQL only ---------------------------------------------------------------------


async def test_postgres_outage_and_recovery(pg_server: PostgresServer) -> None:
    url = pg_server.url()
    store = PostgresStore(url)
    await store.open()
    try:
        key, _ = await store.create_key("k", KeyLimits())
        await store.ping()
        await asyncio.to_thread(pg_server.stop, "immediate")  # the server is gone

        usage = rec("during-outage", T0, key)
        calls = [store.ping, lambda: store.write_usage([usage]), lambda: store.key_by_digest(key.digest),
                 lambda: store.create_key("other", KeyLimits())]
        for call in calls:
            with pytest.raises(StoreError) as info:
                await call()
            assert_no_secret(info.value, url)

        # the pool replaces dead connections: the same store works again once the server is back
        await asyncio.to_thread(pg_server.start)
        await store.ping()
        await store.write_usage([usage])  # e.g. the spool replaying what the outage held back
        assert await store.list_usage(0) == [usage]
    finally:
        await store.close()


async def test_postgres_unreachable_or_refused_credentials(pg_url: str) -> None:
    parts = urlsplit(pg_url)
    with socket_port() as dead_port:
        unreachable = f"postgresql://u:hunter2-secret@127.0.0.1:{dead_port}/db"
        bad_password = pg_url.replace(f":{parts.password}@", ":wrong-hunter2@")
        malformed = f"postgresql://u:hunter2-secret@127.0.0.1:{parts.port}x/db"
        for url in (unreachable, bad_password, malformed):
            with pytest.raises(StoreError) as info:
                await PostgresStore(url).open()
            assert_no_secret(info.value, url)
            assert "hunter2" not in repr(info.value) + "".join(traceback.format_exception(info.value))


@contextmanager
def socket_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, not listening) for the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# -- SQLite only -------------------------------------------------------------------------


async def test_sqlite_creates_parent_dir_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "proxy.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        await store.create_key("k", KeyLimits())
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()


async def test_sqlite_never_blocks_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "proxy.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        write = asyncio.create_task(store.write_usage([rec("r", T0)]))
        started = time.monotonic()
        await asyncio.sleep(0.2)
        # On the loop thread the write would have stalled the loop for the whole busy timeout.
        assert time.monotonic() - started < 1.0
        assert not write.done()  # it waits for the lock (busy_timeout) instead of failing
        blocker.rollback()
        await write
        assert await store.list_usage(0) == [rec("r", T0)]
    finally:
        blocker.close()
        await store.close()


async def test_sqlite_in_memory() -> None:
    store = open_store("sqlite:///:memory:")
    await store.open()
    try:
        key, plaintext = await store.create_key("k", KeyLimits())
        assert await store.key_by_digest(digest_key(plaintext)) == key
    finally:
        await store.close()


def test_open_store_picks_the_backend_from_the_url() -> None:
    relative = open_store("sqlite:///data/llm-proxy.db")
    assert isinstance(relative, SQLiteStore) and relative.path == "data/llm-proxy.db"
    absolute = open_store("sqlite:////var/lib/llm-proxy/proxy.db")
    assert isinstance(absolute, SQLiteStore) and absolute.path == "/var/lib/llm-proxy/proxy.db"
    assert isinstance(open_store("postgresql://u:p@db:5432/proxy"), PostgresStore)
    assert isinstance(open_store("postgres://u:p@db/proxy"), PostgresStore)
    for bad in ("mysql://u:hunter2@db/x", "hunter2", "sqlite://hunter2.db", "sqlite:///"):
        with pytest.raises(ValueError) as info:
            open_store(bad)
        assert "hunter2" not in str(info.value)


# -- operator views: pages, roll-up aggregates, rotation, name reuse, last use -------------


def brute_groups(records: list[UsageRecord], since: float, until: float | None, dims: Any) -> dict[Any, tuple[int, int, int, float]]:
    out: dict[Any, tuple[int, int, int, float]] = {}
    for r in records:
        if r.ts < since or (until is not None and r.ts >= until):
            continue
        g = dims(r)
        n, errors, tokens, cost = out.get(g, (0, 0, 0, 0.0))
        out[g] = (n + 1, errors + (r.outcome in ("upstream_error", "timeout")), tokens + r.prompt_tokens, cost + r.cost_usd)
    return out


async def test_aggregates_are_exact_for_any_range(store: Store) -> None:
    """Whole hours come from the roll-up, the partial ones at each end from the ledger:
    every range, aligned or not, must add up to what the raw records say."""
    from proxy.store.base import UsageFilter

    a, _ = await store.create_key("a", KeyLimits())
    b, _ = await store.create_key("b", KeyLimits())
    records = []
    for i in range(400):
        outcome = ("ok", "ok", "ok", "upstream_error", "timeout", "client_abort")[i % 6]
        records.append(rec(f"u{i:04d}", T0 + i * 613.7, (a, b, None)[i % 3], model="m2" if i % 4 in (1, 2) else "m1",
                           upstream=("x", "y")[i % 7 % 2], upstream_model="um", prompt_tokens=i, cost_usd=i / 1000,
                           outcome=outcome, error=None if outcome == "ok" else outcome, ttft_ms=float(i) if i % 4 else None))
    await store.write_usage(records[:200])
    await store.write_usage(records[100:])  # replays add nothing
    ranges = [(0.0, None), (T0, None), (T0 + 1800, None), (T0 + 3599.5, T0 + 7200.25), (T0 + 5000, T0 + 5100),
              (T0 + 3600, T0 + 36000), (T0 + 10.5, T0 + 200_000.5), (T0 + 100_000, None)]
    for since, until in ranges:
        f = UsageFilter(since=since, until=until)
        got_series = await store.usage_series(f, "hour")
        want = brute_groups(records, since, until, lambda r: int(r.ts // 3600 * 3600))
        assert {p["t"]: (p["requests"], p["errors"], p["prompt_tokens"]) for p in got_series} == {
            t: v[:3] for t, v in want.items()}, (since, until)
        for p in got_series:
            assert p["cost_usd"] == pytest.approx(want[p["t"]][3])
        days = await store.usage_series(f, "day")
        assert sum(p["requests"] for p in days) == sum(v[0] for v in want.values())
        assert all(p["t"] % 86400 == 0 for p in days)
        km = await store.usage_groups(f, "key_model")
        want_km = brute_groups(records, since, until, lambda r: (r.key_id, r.model))
        assert {(g["key_id"], g["model"]): (g["requests"], g["errors"], g["prompt_tokens"]) for g in km} == {
            k: v[:3] for k, v in want_km.items()}
        routes = await store.usage_groups(f, "upstream")
        want_routes = brute_groups(records, since, until, lambda r: r.upstream)
        assert {g["upstream"]: g["requests"] for g in routes} == {k: v[0] for k, v in want_routes.items()}
        for g in routes:
            errs = [r for r in records if r.upstream == g["upstream"] and r.error and since <= r.ts and (until is None or r.ts < until)]
            last = max(errs, key=lambda r: r.ts) if errs else None
            assert g["last_error"] == (last.error if last else None)
            assert g["last_error_ts"] == (last.ts if last else None)
    by_key = await store.usage_groups(UsageFilter(since=T0 + 1800, key_id=b.id, outcome="error"), "key")
    assert [(g["group"], g["key_id"]) for g in by_key] == [("b", b.id)]
    assert by_key[0]["requests"] == sum(1 for r in records if r.key_id == b.id and r.ts >= T0 + 1800 and r.outcome in ("upstream_error", "timeout"))
    models = await store.usage_groups(UsageFilter(since=T0, model="m2", outcome="timeout"), "model")
    assert [(g["group"], g["requests"]) for g in models] == [("m2", sum(1 for r in records if r.model == "m2" and r.outcome == "timeout"))]
    sample = await store.usage_sample(UsageFilter(since=T0, until=T0 + 3 * 613.7), 2)
    assert sample == [(r.upstream, r.upstream_model, r.ttft_ms, r.duration_ms) for r in (records[2], records[1])]


async def test_page_usage_newest_first_with_cursor(store: Store) -> None:
    from proxy.store.base import UsageFilter

    k, _ = await store.create_key("k", KeyLimits())
    # Ties on ts are ordered by id, so a page boundary inside a tie loses and repeats nothing.
    records = [rec(f"p{i:03d}", T0 + i // 3, k if i % 2 else None, model=f"m{i % 3}",
                   outcome="timeout" if i % 5 == 0 else "ok") for i in range(50)]
    await store.write_usage(records)
    newest = sorted(records, key=lambda r: (r.ts, r.id), reverse=True)
    for f, want in (
        (UsageFilter(), newest),
        (UsageFilter(key_id=k.id), [r for r in newest if r.key_id == k.id]),
        (UsageFilter(model="m1", since=T0 + 3), [r for r in newest if r.model == "m1" and r.ts >= T0 + 3]),
        (UsageFilter(outcome="timeout", until=T0 + 10), [r for r in newest if r.outcome == "timeout" and r.ts < T0 + 10]),
        (UsageFilter(outcome="error"), [r for r in newest if r.outcome == "timeout"]),
        (UsageFilter(outcome="ok", model="m2"), [r for r in newest if r.outcome == "ok" and r.model == "m2"]),
    ):
        got: list[UsageRecord] = []
        after = None
        while True:
            page = await store.page_usage(f, 7, after)
            got += page
            if len(page) < 7:
                break
            after = (page[-1].ts, page[-1].id)
        assert got == want, f
    assert await store.page_usage(UsageFilter(), 0) == []


async def test_rotate_key(store: Store) -> None:
    k, old = await store.create_key("k", KeyLimits(models=("m",), rpm=5, budget_usd=2.0))
    rotated = await store.rotate_key("k")
    assert rotated is not None
    r, new = rotated
    assert well_formed(new) and new != old and r.prefix == display_prefix(new) and r.digest == digest_key(new)
    assert replace(r, prefix=k.prefix, digest=k.digest) == k  # same id, name, limits, times
    assert await store.key_by_digest(digest_key(old)) is None
    assert await store.key_by_digest(digest_key(new)) == r
    assert await store.rotate_key("nobody") is None
    await store.revoke_key(k.id)
    from proxy.store.base import KeyRevoked

    with pytest.raises(KeyRevoked):
        await store.rotate_key(k.id)
    assert (await store.get_key(k.id)).digest == r.digest  # type: ignore[union-attr]


async def test_revoked_names_can_be_reused(store: Store) -> None:
    first, _ = await store.create_key("team", KeyLimits(rpm=1))
    with pytest.raises(DuplicateName):
        await store.create_key("team", KeyLimits())
    await store.revoke_key("team")
    second, _ = await store.create_key("team", KeyLimits(rpm=2))
    with pytest.raises(DuplicateName):
        await store.create_key("team", KeyLimits())
    assert (await store.get_key("team")) == second  # the live key wins the name
    assert (await store.get_key(first.id)).revoked_at is not None  # type: ignore[union-attr]
    updated = await store.update_key("team", KeyLimits(rpm=3))
    assert updated is not None and updated.id == second.id
    await store.revoke_key("team")
    third, _ = await store.create_key("team", KeyLimits())
    assert [k.id for k in await store.list_keys()] == [first.id, second.id, third.id]
    await store.revoke_key("team")
    assert (await store.get_key("team")).id == third.id  # type: ignore[union-attr]  # all revoked: the newest


async def test_touch_keys_keeps_the_latest_time(store: Store) -> None:
    a, _ = await store.create_key("a", KeyLimits())
    b, _ = await store.create_key("b", KeyLimits())
    assert a.last_used_at is None
    await store.touch_keys({a.id: T0, b.id: T0 + 5, "key_missing": T0})
    await store.touch_keys({a.id: T0 - 100})
    got = {k.name: k.last_used_at for k in await store.list_keys()}
    assert got == {"a": T0, "b": T0 + 5}
    await store.touch_keys({})


async def test_upgrade_from_schema_1_keeps_data_and_back_fills_the_roll_up(store_url: str) -> None:
    """A database made by the first release: its keys and usage survive the upgrade, its
    records show in the aggregates, and a revoked key's name becomes free."""
    from proxy.store.base import UsageFilter

    if is_sqlite(store_url):
        path = sqlite_path(store_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        for statement in sqlite_backend.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute("INSERT INTO keys (id, name, prefix, digest, created_at, revoked_at) VALUES ('key_0000000000000001', 'old', 'sk-x', 'd1', 1, 2)")
        # Schema 1's 21 usage columns (later versions added more).
        conn.executemany(f"INSERT INTO usage VALUES ({', '.join('?' * 21)})",
                         [tuple(rec(f"o{i}", T0 + i * 1000, None, error="upstream_500" if i == 3 else None))[:21]
                          for i in range(10)])
        conn.close()
    else:
        pconn = await asyncpg.connect(store_url)
        try:
            await pconn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
            for statement in pg_backend.MIGRATIONS[0]:
                await pconn.execute(statement)
            await pconn.execute("INSERT INTO schema_version VALUES (1, 0)")
            await pconn.execute("INSERT INTO keys (id, name, prefix, digest, created_at, revoked_at) VALUES ('key_0000000000000001', 'old', 'sk-x', 'd1', 1, 2)")
            await pconn.executemany(f"INSERT INTO usage VALUES ({', '.join(f'${i + 1}' for i in range(21))})",
                                    [tuple(rec(f"o{i}", T0 + i * 1000, None, error="upstream_500" if i == 3 else None))[:21]
                                     for i in range(10)])
        finally:
            await pconn.close()
    s = open_store(store_url)
    await s.open()
    try:
        assert await schema_versions(store_url) == list(range(1, migrations_count(store_url) + 1))
        assert (await s.get_key("old")).last_used_at is None  # type: ignore[union-attr]
        new, _ = await s.create_key("old", KeyLimits())  # the revoked key's name is free
        assert new.name == "old"
        series = await s.usage_series(UsageFilter(since=T0), "hour")
        assert sum(p["requests"] for p in series) == 10
        [route] = await s.usage_groups(UsageFilter(since=T0 + 1), "upstream")
        assert route["requests"] == 9 and route["last_error"] == "upstream_500"
        await s.write_usage([rec("after", T0 + 50, new)])
        assert sum(p["requests"] for p in await s.usage_series(UsageFilter(since=T0), "day")) == 11
    finally:
        await s.close()


async def test_upgrade_from_schema_4_adds_attempt_and_keeps_the_records(store_url: str) -> None:
    """A database made by the schema before `attempt` (version 4): its records read back
    with attempt None (their ids still say), new ones keep theirs, the roll-ups go on."""
    from proxy.store.base import UsageFilter

    old = [rec(f"o{i}", T0 + i, None, client_dialect="openai", upstream_protocol="anthropic") for i in range(3)]
    if is_sqlite(store_url):
        path = sqlite_path(store_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        for version, steps in enumerate(sqlite_backend.MIGRATIONS[:4], 1):
            for statement in steps:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
        conn.executemany(f"INSERT INTO usage VALUES ({', '.join('?' * 23)})", [tuple(r)[:23] for r in old])
        conn.close()
    else:
        pconn = await asyncpg.connect(store_url)
        try:
            await pconn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
            for version, steps in enumerate(pg_backend.MIGRATIONS[:4], 1):
                for statement in steps:
                    await pconn.execute(statement)
                await pconn.execute("INSERT INTO schema_version VALUES ($1, 0)", version)
            await pconn.executemany(f"INSERT INTO usage VALUES ({', '.join(f'${i + 1}' for i in range(23))})",
                                    [tuple(r)[:23] for r in old])
        finally:
            await pconn.close()
    s = open_store(store_url)
    await s.open()
    try:
        assert await schema_versions(store_url) == list(range(1, migrations_count(store_url) + 1))
        assert await s.list_usage(0) == old and all(r.attempt is None for r in old)
        new = [rec("n", T0 + 10, attempt=0), rec("n.1", T0 + 11, attempt=1)]
        await s.write_usage(new)
        assert await s.list_usage(0) == old + new
        assert [r.attempt for r in await s.page_usage(UsageFilter(since=T0), 10)] == [1, 0, None, None, None]
        assert sum(p["requests"] for p in await s.usage_series(UsageFilter(since=T0), "hour")) == 5
    finally:
        await s.close()
