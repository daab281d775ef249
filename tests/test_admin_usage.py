"""The admin API's usage views and key rotation (issue 24's dashboard API, issue 26 items 4-5).

Records are written straight into the gateway's store (upstreams other than the scripted
`up*` ones, so the billing audit is unaffected) at fixed times, and every answer is
checked against the same numbers computed here in Python.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from _gateway import MASTER_KEY
from proxy.config import StorageConfig
from proxy.keys import digest_key, well_formed
from proxy.middleware.last_used import LastUsed
from proxy.store import SQLiteStore
from proxy.store.base import KeyLimits, UsageRecord
from test_admin_cli import ADMIN, OPENAI_BODY, req

HOUR = 3600.0


def rec(i: int, ts: float, key: Any = None, **fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "id": f"r{i:05d}",
        "ts": ts,
        "key_id": key.id if key else None,
        "key_name": key.name if key else None,
        "endpoint": "chat.completions",
        "model": "mock-gpt",
        "upstream": "routeA",
        "upstream_model": "gpt-a",
        "stream": False,
        "status": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 0.01,
        "ttft_ms": 100.0,
        "duration_ms": 200.0,
    }
    return UsageRecord(**(base | fields))


async def seeded(gateway: Any) -> tuple[Any, Any, Any, list[UsageRecord]]:
    gw = await gateway()
    store = gw.state.store
    alice, _ = await store.create_key("alice", KeyLimits())
    bob, _ = await store.create_key("bob", KeyLimits())
    now = time.time()
    records = []
    for i in range(60):
        key = alice if i % 3 else bob
        fields: dict[str, Any] = {}
        if i % 10 == 0:
            fields = {"outcome": "upstream_error", "error": "upstream_502", "status": 502, "upstream": "routeB",
                      "upstream_model": "gpt-b", "completion_tokens": 0, "cost_usd": 0.0, "ttft_ms": None}
        if i % 4 == 0:
            fields["model"] = "mock-claude"
        records.append(rec(i, now - i * 1200 - 30, key, **fields))  # one every 20 min, back 20 h
    await store.write_usage(records)
    return gw, alice, bob, records


async def test_usage_newest_first_paginated_and_filtered(gateway):
    gw, alice, bob, records = await seeded(gateway)
    newest = sorted(records, key=lambda r: (r.ts, r.id), reverse=True)
    seen: list[str] = []
    cursor = None
    while True:
        path = "/admin/usage?since=2d&limit=25" + (f"&cursor={cursor}" if cursor else "")
        status, doc, _ = await req(gw, "GET", path)
        assert status == 200, doc
        seen += [r["id"] for r in doc["data"]]
        assert doc["truncated"] == (doc["next_cursor"] is not None)
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    assert seen == [r.id for r in newest]  # every record once, newest first, across 3 pages
    status, doc, _ = await req(gw, "GET", "/admin/usage?since=2d")
    assert len(doc["data"]) == 60 and doc["truncated"] is False and doc["next_cursor"] is None
    status, doc, _ = await req(gw, "GET", "/admin/usage?since=2d&limit=59")
    assert len(doc["data"]) == 59 and doc["truncated"] is True  # says when it is cut

    for query, want in (
        ("key=alice", [r for r in newest if r.key_id == alice.id]),
        (f"key={bob.id}", [r for r in newest if r.key_id == bob.id]),
        ("model=mock-claude", [r for r in newest if r.model == "mock-claude"]),
        ("outcome=upstream_error", [r for r in newest if r.outcome == "upstream_error"]),
        ("outcome=error", [r for r in newest if r.outcome == "upstream_error"]),
        ("outcome=ok&key=bob&model=mock-gpt", [r for r in newest if r.outcome == "ok" and r.key_id == bob.id and r.model == "mock-gpt"]),
        (f"until={int(records[30].ts)}", [r for r in newest if r.ts < int(records[30].ts)]),
    ):
        status, doc, _ = await req(gw, "GET", f"/admin/usage?since=2d&{query}")
        assert status == 200, (query, doc)
        assert [r["id"] for r in doc["data"]] == [r.id for r in want], query
    for query, code in (("limit=0", 400), ("limit=10001", 400), ("limit=x", 400), ("cursor=%%%", 400),
                        ("cursor=bm90IGEgY3Vyc29y", 400), ("outcome=bad", 400), ("until=soon", 400),
                        ("format=xml", 400), ("by=colour", 400), ("key=nobody", 404)):
        status, err, _ = await req(gw, "GET", f"/admin/usage?{query}")
        assert status == code, (query, err)


async def test_usage_csv_and_groupings(gateway):
    gw, alice, bob, records = await seeded(gateway)
    async def get_csv(path: str) -> tuple[int, list[dict[str, str]], Any]:
        status, _, raw = await req(gw, "GET", path)
        return status, list(csv.DictReader(io.StringIO(raw.decode()))), raw

    status, rows, raw = await get_csv("/admin/usage?since=2d&format=csv")
    assert status == 200 and raw.startswith(b"id,ts,key_id,key_name,")
    assert [r["id"] for r in rows] == [r.id for r in sorted(records, key=lambda r: r.ts, reverse=True)]
    assert rows[0]["stream"] == "false" and rows[0]["ttft_ms"] in ("100.0", "")
    status, rows, _ = await get_csv("/admin/usage?since=2d&format=csv&limit=5&key=bob")
    assert status == 200 and len(rows) == 5 and all(r["key_name"] == "bob" for r in rows)

    status, doc, _ = await req(gw, "GET", "/admin/usage?since=2d&by=key_model")
    assert status == 200
    want: dict[tuple[str, str], int] = {}
    for r in records:
        want[(r.key_name, r.model)] = want.get((r.key_name, r.model), 0) + 1
    assert {(g["key_name"], g["model"]): g["requests"] for g in doc["data"]} == want
    assert all(g["group"] == f"{g['key_name']}/{g['model']}" and g["key_id"] in (alice.id, bob.id) for g in doc["data"])
    status, doc, _ = await req(gw, "GET", "/admin/usage?since=2d&by=key")
    assert {g["group"]: (g["requests"], g["errors"]) for g in doc["data"]} == {
        "alice": (40, sum(1 for r in records if r.key_id == alice.id and r.outcome != "ok")),
        "bob": (20, sum(1 for r in records if r.key_id == bob.id and r.outcome != "ok")),
    }
    status, rows, _ = await get_csv("/admin/usage?since=2d&by=model&format=csv")
    assert status == 200 and {r["group"]: int(r["requests"]) for r in rows} == {"mock-claude": 15, "mock-gpt": 45}


async def test_usage_series_and_overview(gateway):
    gw, alice, bob, records = await seeded(gateway)
    status, doc, _ = await req(gw, "GET", "/admin/usage/series?since=2d&bucket=hour")
    assert status == 200 and doc["bucket"] == "hour"
    by_hour: dict[int, list[UsageRecord]] = {}
    for r in records:
        by_hour.setdefault(int(r.ts // HOUR * HOUR), []).append(r)
    assert len(doc["data"]) == len(by_hour)
    for point in doc["data"]:
        assert point["t"].endswith(":00:00Z")
        rs = by_hour[int(datetime.fromisoformat(point["t"]).timestamp())]
        assert point["requests"] == len(rs)
        assert point["errors"] == sum(r.outcome != "ok" for r in rs)
        assert point["prompt_tokens"] == sum(r.prompt_tokens for r in rs)
        assert point["completion_tokens"] == sum(r.completion_tokens for r in rs)
        assert abs(point["cost_usd"] - sum(r.cost_usd for r in rs)) < 1e-9
    status, doc, _ = await req(gw, "GET", "/admin/usage/series?since=2d&bucket=day&key=bob&outcome=error")
    assert status == 200 and sum(p["requests"] for p in doc["data"]) == sum(
        1 for r in records if r.key_id == bob.id and r.outcome != "ok")
    status, err, _ = await req(gw, "GET", "/admin/usage/series?bucket=week")
    assert status == 400

    status, doc, _ = await req(gw, "GET", "/admin/stats/overview?range=24h")
    assert status == 200, doc
    assert doc["range"] == "24h" and doc["bucket"] == "hour"
    totals = doc["totals"]
    assert totals["requests"] == 60 and totals["errors"] == 6 and totals["error_rate"] == 0.1
    assert totals["prompt_tokens"] == 600 and totals["completion_tokens"] == 5 * 54
    assert abs(totals["cost_usd"] - 0.54) < 1e-9
    assert totals["ttft_p50_ms"] == 100.0 and totals["ttft_p95_ms"] == 100.0
    assert sum(p["requests"] for p in doc["series"]) == 60
    assert [k["key_name"] for k in doc["top_keys"]] == ["alice", "bob"]
    assert doc["top_keys"][0] == {"key_id": alice.id, "key_name": "alice", "requests": 40,
                                  "tokens": sum(r.prompt_tokens + r.completion_tokens for r in records if r.key_id == alice.id),
                                  "cost_usd": doc["top_keys"][0]["cost_usd"]}
    assert {m["model"]: m["requests"] for m in doc["top_models"]} == {"mock-gpt": 45, "mock-claude": 15}
    for rng, bucket in (("7d", "day"), ("30d", "day")):
        status, doc, _ = await req(gw, "GET", f"/admin/stats/overview?range={rng}")
        assert status == 200 and doc["bucket"] == bucket and doc["totals"]["requests"] == 60
        assert all(p["t"].endswith("T00:00:00Z") for p in doc["series"])
    status, _, _ = await req(gw, "GET", "/admin/stats/overview?range=1y")
    assert status == 400


async def test_upstream_stats_from_the_ledger(gateway):
    gw, alice, bob, records = await seeded(gateway)
    status, doc, _ = await req(gw, "GET", "/admin/stats/upstreams?range=24h")
    assert status == 200, doc
    routes = {(d["upstream"], d["upstream_model"]): d for d in doc["data"]}
    assert set(routes) == {("routeA", "gpt-a"), ("routeB", "gpt-b")}
    a, b = routes[("routeA", "gpt-a")], routes[("routeB", "gpt-b")]
    assert a["requests"] == 54 and a["errors"] == 0 and a["error_rate"] == 0 and a["last_error"] is None
    assert a["latency_p50_ms"] == 200.0 and a["ttft_p50_ms"] == 100.0 and a["last_at"].endswith("Z")
    assert b["requests"] == 6 and b["errors"] == 6 and b["error_rate"] == 1.0
    assert b["last_error"] == "upstream_502" and b["ttft_p50_ms"] is None


async def test_rotate_keeps_id_name_limits_and_kills_the_old_secret(gateway):
    gw = await gateway()
    status, created, _ = await req(gw, "POST", "/admin/keys", json={"name": "carol", "models": ["mock-gpt"], "rpm": 7})
    assert status == 201
    old = {"Authorization": f"Bearer {created['key']}"}
    assert (await req(gw, "POST", "/v1/chat/completions", old, json=OPENAI_BODY))[0] == 200
    status, rotated, raw = await req(gw, "POST", "/admin/keys/carol/rotate")
    assert status == 200, rotated
    new_key = rotated["key"]
    assert well_formed(new_key) and new_key != created["key"] and rotated["prefix"] == new_key[:11]
    assert {k: rotated[k] for k in ("id", "name", "models", "rpm", "created_at")} == {
        k: created[k] for k in ("id", "name", "models", "rpm", "created_at")}
    assert digest_key(new_key).encode() not in raw and b"digest" not in raw
    # The old secret stops at once (this process dropped its cached answer); the new one works.
    status, err, _ = await req(gw, "POST", "/v1/chat/completions", old, json=OPENAI_BODY)
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert (await req(gw, "POST", "/v1/chat/completions", {"Authorization": f"Bearer {new_key}"}, json=OPENAI_BODY))[0] == 200
    status, listed, raw = await req(gw, "GET", "/admin/keys/carol")
    assert listed["prefix"] == new_key[:11] and new_key.encode() not in raw
    # A revoked key cannot be rotated; an unknown one is 404.
    assert (await req(gw, "POST", "/admin/keys/carol/revoke"))[0] == 200
    status, err, _ = await req(gw, "POST", f"/admin/keys/{created['id']}/rotate")
    assert status == 409 and err["error"]["code"] == "key_revoked"
    status, err, _ = await req(gw, "POST", "/admin/keys/nobody/rotate")
    assert status == 404
    assert (await req(gw, "POST", "/admin/keys/carol/rotate", {"Authorization": "Bearer wrong"}))[0] == 401


async def test_patch_models_expiry_and_unknown_models(gateway):
    gw = await gateway()
    _, created, _ = await req(gw, "POST", "/admin/keys", json={"name": "dave"})
    status, doc, _ = await req(gw, "PATCH", "/admin/keys/dave", json={"models": ["mock-gpt"], "expires_at": 4102444800})
    assert status == 200 and doc["models"] == ["mock-gpt"] and doc["expires_at"] == "2100-01-01T00:00:00Z"
    status, doc, _ = await req(gw, "PATCH", "/admin/keys/dave", json={"expires_at": None, "rpm": 3})
    assert status == 200 and doc["expires_at"] is None and doc["rpm"] == 3 and doc["models"] == ["mock-gpt"]
    status, doc, _ = await req(gw, "PATCH", "/admin/keys/dave", json={"expires_in_days": 1})
    assert status == 200 and doc["expires_at"] is not None
    status, err, _ = await req(gw, "PATCH", "/admin/keys/dave", json={"models": ["mock-gpt", "gpt-9-typo"]})
    assert status == 400 and err["error"]["code"] == "unknown_model" and "gpt-9-typo" in err["error"]["message"]
    status, err, _ = await req(gw, "POST", "/admin/keys", json={"name": "erin", "models": ["gpt-9-typo"]})
    assert status == 400 and err["error"]["code"] == "unknown_model"
    status, doc, _ = await req(gw, "PATCH", "/admin/keys/dave", json={"models": ["gpt-9-typo"], "force": True})
    assert status == 200 and doc["models"] == ["gpt-9-typo"]
    status, err, _ = await req(gw, "PATCH", "/admin/keys/dave", json={"force": "yes"})
    assert status == 400


async def test_revoked_names_are_reusable_and_last_used_is_batched(gateway):
    gw = await gateway()
    _, first, _ = await req(gw, "POST", "/admin/keys", json={"name": "frank"})
    assert first["last_used_at"] is None
    status, dup, _ = await req(gw, "POST", "/admin/keys", json={"name": "frank"})
    assert status == 409
    assert (await req(gw, "DELETE", "/admin/keys/frank"))[0] == 200
    status, second, _ = await req(gw, "POST", "/admin/keys", json={"name": "frank"})
    assert status == 201 and second["id"] != first["id"]
    # The name now means the live key; the revoked one stays listed under its id.
    status, got, _ = await req(gw, "GET", "/admin/keys/frank")
    assert got["id"] == second["id"] and got["revoked_at"] is None
    status, got, _ = await req(gw, "GET", f"/admin/keys/{first['id']}")
    assert got["revoked_at"] is not None
    status, listed, _ = await req(gw, "GET", "/admin/keys")
    assert [k["name"] for k in listed["data"]].count("frank") == 2

    before = time.time()
    headers = {"Authorization": f"Bearer {second['key']}"}
    assert (await req(gw, "GET", "/v1/models", headers))[0] == 200
    await gw.state.last_used.flush()
    got = (await req(gw, "GET", f"/admin/keys/{second['id']}"))[1]
    used = datetime.fromisoformat(got["last_used_at"]).timestamp()
    assert before - 1 <= used <= time.time() + 1
    assert (await req(gw, "GET", "/admin/keys/frank"))[1]["last_used_at"] == got["last_used_at"]
    status, listed, _ = await req(gw, "GET", "/admin/keys")
    assert {k["id"]: k["last_used_at"] for k in listed["data"]}[first["id"]] is None


async def test_new_views_need_the_master_key(gateway):
    gw = await gateway()
    for path in ("/admin/usage", "/admin/usage/series", "/admin/stats/overview", "/admin/stats/upstreams"):
        for headers in ({}, {"Authorization": f"Bearer {gw.key}"}, {"Authorization": "Bearer " + MASTER_KEY + "x"}):
            status, doc, raw = await req(gw, "GET", path, headers)
            assert status == 401, (path, headers)
        status, doc, raw = await req(gw, "GET", path, ADMIN)
        assert status == 200, (path, doc)
        assert MASTER_KEY.encode() not in raw and orjson.loads(raw) is not None


async def test_last_used_is_written_in_batches_and_survives_a_store_outage(tmp_path: Path) -> None:
    class Counting(SQLiteStore):
        writes = 0

        async def touch_keys(self, last_used: Any) -> None:
            self.writes += 1
            await super().touch_keys(last_used)

    store = Counting(str(tmp_path / "k.db"))
    await store.open()
    k, _ = await store.create_key("k", KeyLimits())
    other, _ = await store.create_key("other", KeyLimits())
    tracker = LastUsed(store, interval_s=3600)
    for i in range(1000):
        tracker.touch(k.id, 1000.0 + i)
    assert store.writes == 0 and (await store.get_key("k")).last_used_at is None  # nothing per request
    await tracker.flush()
    assert store.writes == 1 and (await store.get_key("k")).last_used_at == 1999.0
    await tracker.flush()
    assert store.writes == 1  # nothing new, no write
    tracker.touch(k.id, 5.0)  # an older time (another worker's late batch) never goes back
    await tracker.flush()
    assert (await store.get_key("k")).last_used_at == 1999.0
    await store.close()
    tracker.touch(other.id, 3000.0)
    await tracker.flush()  # the store is down: kept, not raised
    await store.open()
    tracker.touch(k.id, 3001.0)
    await tracker.close()  # writes what is left
    assert (await store.get_key("other")).last_used_at == 3000.0
    assert (await store.get_key("k")).last_used_at == 3001.0
    await store.close()


# -- how calls were served ------------------------------------------------------------------

SERVED = [("openai", "openai"), ("anthropic", "openai"), ("openai", "gemini"), ("gemini", "anthropic"), (None, None)]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    url = request.getfixturevalue("pg_store_url")
    return {"storage": StorageConfig(url=url, spool_path=str(tmp_path / "pg-spool.jsonl"), flush_interval_s=0.05)}


async def test_usage_by_how_calls_were_served(backend, gateway):
    """client_dialect and upstream_protocol filter the listing, the CSV, the series and the
    groups, and group as `by=served`, on both stores; over 3 days, so that the roll-ups'
    whole days and hours are in range (the served views read the raw ledger instead).
    `backend` first: its database must outlive the gateway."""
    gw = await gateway(**backend)
    store = gw.state.store
    alice, _ = await store.create_key("alice", KeyLimits())
    now = time.time()
    records = []
    for i in range(72):   # one an hour, back 3 days
        cd, up = SERVED[i % len(SERVED)]
        records.append(rec(i, now - i * HOUR - 30, alice if i % 2 else None, client_dialect=cd, upstream_protocol=up,
                           attempt=i % 3, cost_usd=0.01 * (i % 7)))
    await store.write_usage(records)
    newest = sorted(records, key=lambda r: (r.ts, r.id), reverse=True)

    for query, want in (
        ("client_dialect=anthropic", [r for r in newest if r.client_dialect == "anthropic"]),
        ("upstream_protocol=openai", [r for r in newest if r.upstream_protocol == "openai"]),
        ("client_dialect=openai&upstream_protocol=gemini&key=alice",
         [r for r in newest if (r.client_dialect, r.upstream_protocol) == ("openai", "gemini") and r.key_id == alice.id]),
    ):
        status, doc, _ = await req(gw, "GET", f"/admin/usage?since=4d&limit=1000&{query}")
        assert status == 200, (query, doc)
        assert [r["id"] for r in doc["data"]] == [r.id for r in want], query
        assert all(r["attempt"] == next(x.attempt for x in want if x.id == r["id"]) for r in doc["data"])
        status, _, raw = await req(gw, "GET", f"/admin/usage?since=4d&format=csv&{query}")
        rows = list(csv.DictReader(io.StringIO(raw.decode())))
        assert status == 200 and [r["id"] for r in rows] == [r.id for r in want], query
        assert {r["upstream_protocol"] for r in rows} <= {"openai", "gemini"}
        status, doc, _ = await req(gw, "GET", f"/admin/usage/series?since=4d&bucket=day&{query}")
        assert status == 200 and sum(p["requests"] for p in doc["data"]) == len(want), query
        assert abs(sum(p["cost_usd"] for p in doc["data"]) - sum(r.cost_usd for r in want)) < 1e-9

    status, doc, _ = await req(gw, "GET", "/admin/usage?since=4d&by=served")
    assert status == 200, doc
    got = {(g["client_dialect"], g["upstream_protocol"]): g for g in doc["data"]}
    assert set(got) == set(SERVED)
    for pair, g in got.items():
        rs = [r for r in records if (r.client_dialect, r.upstream_protocol) == pair]
        assert g["requests"] == len(rs) and abs(g["cost_usd"] - sum(r.cost_usd for r in rs)) < 1e-9
        assert g["group"] == (None if pair == (None, None) else f"{pair[0]} → {pair[1]}")
    assert doc["data"][-1]["group"] is None   # records from before the gateway kept it: last
    status, doc, _ = await req(gw, "GET", "/admin/usage?since=4d&by=served&key=alice&upstream_protocol=openai")
    assert {g["group"]: g["requests"] for g in doc["data"]} == {
        f"{cd} → openai": sum(1 for r in records if r.key_id == alice.id and r.client_dialect == cd and r.upstream_protocol == "openai")
        for cd in ("anthropic", "openai")}
    status, _, raw = await req(gw, "GET", "/admin/usage?since=4d&by=served&format=csv")
    rows = list(csv.DictReader(io.StringIO(raw.decode())))
    assert status == 200 and {r["group"] for r in rows} == {"openai → openai", "anthropic → openai", "openai → gemini",
                                                            "gemini → anthropic", ""}
    # The plain groupings still read the roll-ups and agree.
    status, doc, _ = await req(gw, "GET", "/admin/usage?since=4d&by=day")
    assert sum(g["requests"] for g in doc["data"]) == len(records)
    for query in ("client_dialect=cobol", "upstream_protocol=x", "by=dialect"):
        status, err, _ = await req(gw, "GET", f"/admin/usage?{query}")
        assert status == 400 and err["error"]["param"] in ("client_dialect", "upstream_protocol", "by"), (query, err)
