"""Virtual-key authentication end to end (issue 3, RELIABILITY §1.1 and §4B, CLIENTS §B).

Every auth style on every surface, malformed and SQL-shaped keys, expiry, revocation
(another process's store and this process's admin API), allowlists, the negative cache,
fail-closed behaviour when the store is down, and an audit of every registered route.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from _gateway import MASTER_KEY
from proxy.gateway import PUBLIC_PATHS
from proxy.config import AuthConfig, ServerConfig, StorageConfig
from proxy.keys import digest_key, generate_key, well_formed
from proxy.middleware import auth_failures
from proxy.middleware.auth import Authenticator, KeyCache
from proxy.store import open_store
from proxy.store.base import KeyRecord, StoreError

OPENAI_BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY = {"model": "mock-claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}

# name → (method, path, json body, dialect)
SURFACES: dict[str, tuple[str, str, Any, str]] = {
    "openai-chat": ("POST", "/v1/chat/completions", OPENAI_BODY, "openai"),
    "openai-models": ("GET", "/v1/models", None, "openai"),
    "anthropic-messages": ("POST", "/v1/messages", ANTHROPIC_BODY, "anthropic"),
    "gemini-generate": ("POST", "/v1beta/models/mock-gemini:generateContent", GEMINI_BODY, "gemini"),
}
STYLES = {
    "bearer": lambda k: {"Authorization": f"Bearer {k}"},
    "api-key": lambda k: {"api-key": k},
    "x-api-key": lambda k: {"x-api-key": k},
    "x-goog-api-key": lambda k: {"x-goog-api-key": k},
}
SQL_SHAPED = [
    "x' OR (SELECT pg_sleep(8)) IS NOT NULL --",
    "x' OR 1=randomblob(1000000000) --",
    "sk-' OR '1'='1' UNION SELECT * FROM keys --",
    "'; DROP TABLE keys; --",
]


async def call(
    gw: Any, surface: str, headers: dict[str, str] | None = None, query: str = ""
) -> tuple[int, Any, bytes]:
    method, path, body, _ = SURFACES[surface]
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path + query, json=body, headers=headers or {}) as r:
            return r.status, r.headers.copy(), await r.read()


def without_request_id(body: bytes) -> Any:
    doc = orjson.loads(body)
    doc.pop("request_id", None)
    return doc


def assert_401(dialect: str, status: int, body: bytes) -> None:
    assert status == 401, body
    doc = orjson.loads(body)
    if dialect == "openai":
        assert doc["error"]["code"] == "invalid_api_key" and doc["error"]["type"] == "authentication_error"
    elif dialect == "anthropic":
        assert doc["type"] == "error" and doc["error"]["type"] == "authentication_error" and doc["request_id"]
    else:
        assert doc["error"]["code"] == 401 and doc["error"]["status"] == "UNAUTHENTICATED"


def count_lookups(gw: Any, monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.0) -> list[str]:
    calls: list[str] = []
    real = gw.state.store.key_by_digest

    async def counted(digest: str) -> KeyRecord | None:
        calls.append(digest)
        await asyncio.sleep(delay_s)  # a store under load: lookups overlap
        return await real(digest)

    monkeypatch.setattr(gw.state.store, "key_by_digest", counted)
    return calls


# ---------------------------------------------------------------------- every style, every surface


@pytest.mark.parametrize("surface", SURFACES)
async def test_every_auth_style_on_every_surface(gateway, surface):
    gw = await gateway()
    dialect = SURFACES[surface][3]
    for style, make in STYLES.items():
        status, headers, body = await call(gw, surface, make(gw.key))
        assert status == 200, (style, body)
        assert headers["x-request-id"]
        # The same header with a wrong key is refused: the style is really what was read.
        wrong = generate_key()
        status, _, body = await call(gw, surface, make(wrong))
        # /v1/models answers in Anthropic's shape to an Anthropic-style caller, in Gemini's
        # to google-genai on API v1 (x-goog-api-key).
        expected = {"x-api-key": "anthropic", "x-goog-api-key": "gemini"}.get(style, dialect) if surface == "openai-models" else dialect
        assert_401(expected, status, body)
    # No key at all.
    status, _, body = await call(gw, surface)
    assert_401(dialect, status, body)


async def test_query_key_only_on_gemini_routes(gateway):
    gw = await gateway()
    q = "?key=" + gw.key
    status, _, body = await call(gw, "gemini-generate", query=q)
    assert status == 200, body
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/v1beta/models" + q) as r:
            assert r.status == 200
            names = [m["name"] for m in (await r.json())["models"]]
            assert "models/mock-gemini" in names
        url = gw.url + "/v1beta/models/mock-gemini:streamGenerateContent?alt=sse&key=" + gw.key
        async with s.post(url, json=GEMINI_BODY) as r:
            assert r.status == 200
            assert b"data: " in await r.read()
        async with s.post(gw.url + "/v1/models/mock-gemini:generateContent" + q, json=GEMINI_BODY) as r:
            assert r.status == 200  # the Gemini method under /v1/models is a Gemini route too
        async with s.get(gw.url + "/v1/models" + q) as r:   # google-genai on API v1
            assert r.status == 200 and "models/mock-gemini" in [m["name"] for m in (await r.json())["models"]]
    for surface in ("openai-chat", "anthropic-messages"):
        status, _, body = await call(gw, surface, query=q)
        assert_401(SURFACES[surface][3], status, body)
        assert gw.key.encode() not in body
    # The client's key is never passed on: the gemini upstream got no `key=` from us.
    assert all(gw.key not in r.query and gw.key.encode() not in r.body for r in gw.upstream.received)


# ---------------------------------------------------------------------- malformed and wrong keys


def malformed_variants(real: str) -> dict[str, dict[str, str]]:
    return {
        "missing": {},
        "unknown": {"Authorization": f"Bearer {generate_key()}"},
        "bearer-alone": {"Authorization": "Bearer"},
        "bearer-two-spaces": {"Authorization": "Bearer  " + real},
        "basic": {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
        "scheme-only-real-key": {"Authorization": real},
        "8kb": {"x-api-key": "sk-" + "A" * 8000},
        "real-key-plus-char": {"Authorization": f"Bearer {real}x"},
        "real-key-truncated": {"x-api-key": real[:-1]},
        "real-key-other-case": {"x-api-key": real.upper()},
        "empty-x-api-key": {"x-api-key": ""},
        "sql-bearer": {"Authorization": "Bearer " + SQL_SHAPED[0]},
        "sql-x-api-key": {"x-api-key": SQL_SHAPED[1]},
    }


@pytest.mark.parametrize("surface", ["openai-chat", "anthropic-messages", "gemini-generate"])
async def test_wrong_missing_malformed_keys_get_identical_401(gateway, surface, monkeypatch):
    gw = await gateway()
    dialect = SURFACES[surface][3]
    lookups = count_lookups(gw, monkeypatch)
    variants = malformed_variants(gw.key)
    bodies = {}
    for name, headers in variants.items():
        status, resp_headers, body = await call(gw, surface, headers)
        assert_401(dialect, status, body)
        assert resp_headers["Content-Type"].startswith("application/json")
        for value in headers.values():
            secret = value.removeprefix("Bearer").strip()
            if len(secret) >= 4:
                assert secret.encode() not in body, name
        assert gw.key[:12].encode() not in body and gw.key[-8:].encode() not in body
        assert digest_key(gw.key).encode() not in body and b"keys" not in body.lower()
        bodies[name] = without_request_id(body)
    first = next(iter(bodies.values()))
    assert all(b == first for b in bodies.values()), bodies
    # Only the two well-formed keys ("unknown", and no other) cost a store lookup.
    assert len(lookups) == 1
    assert gw.upstream.received == []


async def test_nul_and_oversized_header_rejected_without_echo(gateway, caplog):
    """A NUL or an over-long header never reaches the app: aiohttp's parser refuses it.

    Its answer and its log line must not quote the header (which holds the key).
    """
    caplog.set_level("DEBUG")
    gw = await gateway()
    host, port = gw.url.removeprefix("http://").split(":")
    secret = gw.key
    for header in (
        b"Authorization: Bearer " + secret.encode() + b"\x00",
        b"x-api-key: " + secret.encode() + b"\x00tail",
        b"Authorization: Bearer " + secret.encode() + b"Z" * 9000,
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        status = int(raw.split(b" ", 2)[1])
        assert status in (400, 401, 431), raw[:200]
        assert secret[4:].encode() not in raw and b"ZZZZ" not in raw and b"\\x00" not in raw, raw
    # The query form of a NUL reaches auth and is just a malformed key.
    status, _, body = await call(gw, "gemini-generate", query="?key=" + quote(secret + "\x00"))
    assert_401("gemini", status, body)
    assert secret[4:] not in caplog.text and "ZZZZ" not in caplog.text


@pytest.mark.parametrize("payload", SQL_SHAPED)
async def test_sql_shaped_keys_are_refused_fast_without_a_query(gateway, payload, monkeypatch):
    gw = await gateway()
    lookups = count_lookups(gw, monkeypatch)
    async with aiohttp.ClientSession() as s:
        for headers, path, body, query in (
            ({"Authorization": "Bearer " + payload}, "/v1/chat/completions", OPENAI_BODY, ""),
            ({"x-api-key": payload}, "/v1/messages", ANTHROPIC_BODY, ""),
            ({"x-goog-api-key": payload}, "/v1beta/models/mock-gemini:generateContent", GEMINI_BODY, ""),
            ({}, "/v1beta/models/mock-gemini:generateContent", GEMINI_BODY, "?key=" + quote(payload)),
        ):
            t0 = time.perf_counter()
            async with s.post(gw.url + path + query, json=body, headers=headers) as r:
                got = await r.read()
                elapsed = time.perf_counter() - t0
                assert r.status == 401, got
                assert elapsed < 0.2, elapsed
                assert payload.encode() not in got and b"SELECT" not in got and b"sqlite" not in got.lower()
    assert lookups == []
    # The keys table survived and still answers.
    assert await gw.state.store.get_key("test-key") is not None


# ---------------------------------------------------------------------- expiry and revocation


async def test_expired_key_is_refused_also_when_cached(gateway):
    gw = await gateway()
    past = await gw.create_key("expired", expires_at=time.time() - 1)
    status, _, body = await call(gw, "openai-chat", STYLES["bearer"](past))
    assert_401("openai", status, body)
    soon = await gw.create_key("expires-soon", expires_at=time.time() + 0.4)
    status, _, _ = await call(gw, "openai-chat", STYLES["bearer"](soon))
    assert status == 200  # now cached for the full TTL (5 s) ...
    await asyncio.sleep(0.5)
    status, _, body = await call(gw, "openai-chat", STYLES["bearer"](soon))
    assert_401("openai", status, body)  # ... but expiry is checked on every request


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {}
    url = request.getfixturevalue("pg_store_url")
    return {"storage": StorageConfig(url=url, spool_path=str(tmp_path / "pg-spool.jsonl"), flush_interval_s=0.05)}


async def test_revocation_by_another_process_takes_effect_within_the_cache_ttl(backend, gateway):
    # `backend` first: its database must outlive the gateway (torn down in reverse order).
    ttl = 0.5
    gw = await gateway(
        auth=AuthConfig(master_key=MASTER_KEY, cache_ttl_s=ttl, negative_cache_ttl_s=ttl, max_failures_per_min=0), **backend
    )
    status, _, _ = await call(gw, "openai-chat", gw.headers())
    assert status == 200
    # Another process (the CLI) revokes it: a second connection to the same database.
    other = open_store(gw.state.config.storage.url)
    await other.open()
    try:
        assert (await other.revoke_key("test-key")).revoked_at is not None
    finally:
        await other.close()
    t0 = time.monotonic()
    while True:
        status, _, body = await call(gw, "openai-models", gw.headers())
        if status == 401:
            break
        assert status == 200
        assert time.monotonic() - t0 < ttl + 1.5, "revocation not effective within the cache TTL"
        await asyncio.sleep(0.05)
    assert_401("openai", status, body)
    for surface in ("anthropic-messages", "gemini-generate"):
        status, _, body = await call(gw, surface, {"x-api-key": gw.key})
        assert_401(SURFACES[surface][3], status, body)
    # The documented bound (issue 3: within 5 s) is what the default config promises.
    assert AuthConfig().cache_ttl_s <= 5


async def test_admin_revoke_and_update_are_effective_at_once_in_this_process(gateway):
    gw = await gateway()  # default 5 s cache
    other = await gw.create_key("other")
    admin = {"Authorization": f"Bearer {MASTER_KEY}"}
    async with aiohttp.ClientSession() as s:
        for k in (gw.key, other):
            async with s.post(gw.url + "/v1/chat/completions", json=OPENAI_BODY, headers=STYLES["bearer"](k)) as r:
                assert r.status == 200  # both now cached
        async with s.post(gw.url + "/admin/keys/test-key/revoke", headers=admin) as r:
            assert r.status == 200
        async with s.delete(gw.url + "/admin/keys/other", headers=admin) as r:
            assert r.status == 200
        for k in (gw.key, other):
            async with s.post(gw.url + "/v1/chat/completions", json=OPENAI_BODY, headers=STYLES["bearer"](k)) as r:
                assert r.status == 401
        # A limit change (allowlist) applies at once too.
        third = await gw.create_key("third")
        async with s.get(gw.url + "/v1/models", headers=STYLES["bearer"](third)) as r:
            assert r.status == 200
        async with s.patch(gw.url + "/admin/keys/third", json={"models": ["mock-claude"]}, headers=admin) as r:
            assert r.status == 200
        async with s.post(gw.url + "/v1/chat/completions", json=OPENAI_BODY, headers=STYLES["bearer"](third)) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "model_not_allowed"


# ---------------------------------------------------------------------- allowlist


async def test_allowlist_is_enforced_and_listed_in_every_dialect(gateway):
    gw = await gateway()
    key = await gw.create_key("only-gpt", models=("mock-gpt",))
    status, _, _ = await call(gw, "openai-chat", STYLES["bearer"](key))
    assert status == 200
    status, _, body = await call(gw, "anthropic-messages", STYLES["x-api-key"](key))
    doc = orjson.loads(body)
    assert status == 403 and doc["error"]["type"] == "permission_error", body
    status, _, body = await call(gw, "gemini-generate", STYLES["x-goog-api-key"](key))
    doc = orjson.loads(body)
    assert status == 403 and doc["error"]["status"] == "PERMISSION_DENIED"
    assert doc["error"]["details"][0]["reason"] == "MODEL_NOT_ALLOWED"
    async with aiohttp.ClientSession() as s:
        async with s.post(
            gw.url + "/v1/chat/completions", json={**OPENAI_BODY, "model": "up-gpt"}, headers=STYLES["bearer"](key)
        ) as r:
            doc = await r.json()
            assert r.status == 403 and doc["error"]["code"] == "model_not_allowed" and doc["error"]["param"] == "model"
        async with s.get(gw.url + "/v1/models", headers=STYLES["bearer"](key)) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["mock-gpt"]
        async with s.get(gw.url + "/v1/models", headers={**STYLES["x-api-key"](key), "anthropic-version": "2023-06-01"}) as r:
            doc = await r.json()
            assert [m["id"] for m in doc["data"]] == ["mock-gpt"] and doc["data"][0]["type"] == "model"
        async with s.get(gw.url + "/v1beta/models", headers=STYLES["x-goog-api-key"](key)) as r:
            assert [m["name"] for m in (await r.json())["models"]] == ["models/mock-gpt"]
        async with s.get(gw.url + "/v1/models/mock-claude", headers=STYLES["bearer"](key)) as r:
            assert r.status == 404
    assert gw.upstream.received == []


# ---------------------------------------------------------------------- caches


async def test_negative_cache_spares_the_store(gateway, monkeypatch):
    gw = await gateway()
    lookups = count_lookups(gw, monkeypatch, delay_s=0.05)
    unknown = generate_key()
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.get(gw.url + "/v1/models", headers=STYLES["bearer"](unknown)) as r:
                assert r.status == 401
        assert len(lookups) <= 2
        # A burst of concurrent requests with another unknown key shares one lookup.
        burst = generate_key()

        async def one() -> int:
            async with s.get(gw.url + "/v1/models", headers=STYLES["x-api-key"](burst)) as r:
                return r.status

        assert set(await asyncio.gather(*(one() for _ in range(100)))) == {401}
    assert len(lookups) <= 4, len(lookups)
    assert set(lookups) == {digest_key(unknown), digest_key(burst)}


async def test_cache_is_keyed_by_the_full_key(gateway):
    gw = await gateway()
    status, _, _ = await call(gw, "openai-models", gw.headers())
    assert status == 200  # the real key is cached now
    for n in (40, 45):  # same 40 / 45 leading characters, different tail
        twin = gw.key[:n] + ("A" if gw.key[n] != "A" else "B") + gw.key[n + 1 :]
        assert well_formed(twin) and twin != gw.key
        status, _, body = await call(gw, "openai-models", STYLES["bearer"](twin))
        assert_401("openai", status, body)


# ---------------------------------------------------------------------- fail closed


async def test_store_failure_fails_closed_in_every_dialect(gateway, monkeypatch):
    gw = await gateway(auth=AuthConfig(master_key=MASTER_KEY, cache_ttl_s=0.2, negative_cache_ttl_s=0.2, max_failures_per_min=0))
    status, _, _ = await call(gw, "openai-models", gw.headers())
    assert status == 200  # cached, and stays known while the store is down
    other = await gw.create_key("never-used")

    async def broken(digest: str) -> KeyRecord | None:
        raise StoreError("sqlite store: key lookup failed (SQLITE_IOERR)")

    monkeypatch.setattr(gw.state.store, "key_by_digest", broken)
    await asyncio.sleep(0.3)  # the cached answer is past its TTL: only stale now
    for surface, (_, _, _, dialect) in SURFACES.items():
        status, headers, body = await call(gw, surface, STYLES["api-key"](other))
        assert status == 503, (surface, body)
        assert headers.get("Retry-After")
        doc = orjson.loads(body)
        if dialect == "openai":
            assert doc["error"]["code"] == "auth_unavailable"
        elif dialect == "anthropic":
            assert doc["type"] == "error" and doc["error"]["type"] in ("overloaded_error", "api_error")
        else:
            assert doc["error"]["status"] == "UNAVAILABLE"
            assert doc["error"]["details"][0]["reason"] == "AUTH_UNAVAILABLE"
        assert b"SQLITE" not in body and other.encode() not in body
        # A key known from before the outage keeps working from its stale entry.
        status, _, body = await call(gw, surface, STYLES["bearer"](gw.key))
        assert status == 200, (surface, body)
    # Unknown well-formed keys and any exception type: 503, never 200.
    for exc in (RuntimeError("boom"), ValueError("decode"), TimeoutError()):

        async def raising(digest: str, exc: Exception = exc) -> KeyRecord | None:
            raise exc

        monkeypatch.setattr(gw.state.store, "key_by_digest", raising)
        status, _, body = await call(gw, "openai-chat", STYLES["bearer"](generate_key()))
        assert status == 503, body
    # Malformed keys never reach the store: still 401 while it is down.
    status, _, body = await call(gw, "openai-chat", {"Authorization": "Bearer junk"})
    assert_401("openai", status, body)


class _FakeStore:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.calls = 0
        self.mode = "ok"

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        self.calls += 1
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "raise":
            raise StoreError("down")
        record = self.records.get(digest)  # read first: the answer is as of the query
        await asyncio.sleep(0.01)
        return record


def _record(key: str, **kw: Any) -> KeyRecord:
    base = KeyRecord("key_0123456789abcdef", "k", key[:11], digest_key(key), (), None, None, None, None, None, None, None, 0.0)
    return dataclasses.replace(base, **kw)


@pytest.mark.fast
async def test_authenticator_unit_timeout_single_flight_stale_bound():
    from proxy.errors import InvalidApiKey, ServiceUnavailable

    store = _FakeStore()
    key = generate_key()
    store.records[digest_key(key)] = _record(key)
    now = [1000.0]
    auth = Authenticator(store, KeyCache(5, 5, max_stale_s=60), clock=lambda: now[0], lookup_timeout_s=0.2)  # type: ignore[arg-type]
    got = await asyncio.gather(*(auth.authenticate(key) for _ in range(50)))
    assert all(r.name == "k" for r in got) and store.calls == 1
    # A hung store: 503 after the lookup timeout, for a key never seen.
    store.mode = "hang"
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        await auth.authenticate(generate_key())
    assert time.monotonic() - t0 < 1.0
    # The known key: fresh cache, then stale within the bound, then refused past it.
    assert (await auth.authenticate(key)).name == "k"
    now[0] += 30
    assert (await auth.authenticate(key)).name == "k"  # stale (TTL 5 s, stale bound 60 s)
    now[0] += 60
    with pytest.raises(ServiceUnavailable):
        await auth.authenticate(key)
    # forget() while a lookup is in flight: the old answer is not cached afterwards.
    store.mode = "ok"
    lookup = asyncio.ensure_future(auth.authenticate(key))
    await asyncio.sleep(0.002)  # the store has read the (still active) record
    store.records[digest_key(key)] = _record(key, revoked_at=now[0])
    auth.forget(digest_key(key))
    await lookup  # was active when read
    with pytest.raises(InvalidApiKey):
        await auth.authenticate(key)
    # Misses never push hits out of a full cache.
    cache = KeyCache(5, 5, max_entries=3)
    cache.put("a", _record(key), 0)
    for i in range(10):
        cache.put(f"miss{i}", None, 0)
    assert cache.get("a", 1) == (True, _record(key))


# ---------------------------------------------------------------------- route audit


def _concrete(canonical: str) -> str:
    path = re.sub(r"\{tail[^}]*\}", "mock-gemini:generateContent", canonical)
    path = re.sub(r"\{model[^}]*\}", "mock-gpt", path)
    return re.sub(r"\{key[^}]*\}", "test-key", path)


# The dashboard's own public routes (reviewed): static pages, "who am I" (answers
# signed_in: false without a session) and sign-in. Every other /ui/ route needs a session.
DASHBOARD_PUBLIC = {
    ("GET", "/ui"), ("HEAD", "/ui"), ("GET", "/ui/"), ("HEAD", "/ui/"),
    ("GET", "/ui/{path}"), ("HEAD", "/ui/{path}"),
    ("GET", "/ui/api/session"), ("HEAD", "/ui/api/session"), ("POST", "/ui/api/session"),
}


async def test_route_audit_every_route_needs_a_key(gateway):
    gw = await gateway()
    assert PUBLIC_PATHS == frozenset({"/", "/healthz", "/readyz", "/metrics"}), "widening the public list needs review"
    # The data plane's client routes, then the control plane's (aiohttp) routes.
    routes = gw.state.routes.table()
    routes += [(r.method, r.resource.canonical) for r in gw.app.router.routes() if r.resource is not None]
    assert len(routes) > 20
    seen_admin = seen_key = 0
    async with aiohttp.ClientSession() as s:
        for method, canonical in routes:
            if method == "OPTIONS":
                continue
            path = _concrete(canonical)
            # No body, no params: authentication must answer before any validation.
            async with s.request(method, gw.url + path) as r:
                body = await r.read()
                if canonical in PUBLIC_PATHS:
                    assert r.status in (200, 503), (method, path)
                    continue
                if (method, canonical) in DASHBOARD_PUBLIC:
                    # The dashboard's pages, "who am I" and sign-in itself (refused: no Origin).
                    assert r.status in (200, 403, 404), (method, path, r.status)
                    assert b'"csrf":' not in body  # no session, no token
                    continue
                if canonical.startswith("/admin/"):
                    seen_admin += 1
                    assert r.status == 401, (method, path, r.status, body)
                else:
                    seen_key += 1
                    assert r.status == 401, (method, path, r.status, body)
            # A client key is not the master key, nor a dashboard session.
            if canonical.startswith(("/admin/", "/ui/api/")) and (method, canonical) not in DASHBOARD_PUBLIC:
                async with s.request(method, gw.url + path, headers=gw.headers()) as r:
                    assert r.status in (401, 403), (method, path)
                async with s.request(method, gw.url + path, headers={"x-api-key": gw.key}) as r:
                    assert r.status in (401, 403), (method, path)
    assert seen_admin >= 7 and seen_key >= 15
    assert gw.upstream.received == []


async def test_path_tricks_never_skip_auth(gateway):
    gw = await gateway()
    host, port = gw.url.removeprefix("http://").split(":")
    body = orjson.dumps(OPENAI_BODY)
    requests = [
        ("POST", "/admin/../v1/chat/completions", "x"),
        ("POST", "/admin/%2e%2e/v1/chat/completions", "x"),
        ("POST", "/healthz/../v1/chat/completions", "x"),
        ("POST", "/metrics/%2e%2e/v1/chat/completions", "x"),
        ("GET", "/v1/../admin/keys", "x"),
        ("GET", "/v1/%2e%2e/admin/keys", "x"),
        ("GET", "//v1/models", "x"),
        ("GET", "/v1/models;x", "x"),
        ("GET", "/admin%2fkeys", "x"),
        ("GET", "http://x/v1/models", "x"),
        ("GET", "/v1/models", "h/#"),
        ("GET", "/v1/models", "h/?"),
        ("GET", "/v1/models", "h:80@evil"),
        ("GET", "/admin/keys", "h/#"),
    ]
    for method, target, host_header in requests:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        status = int(raw.split(b" ", 2)[1])
        assert status in (400, 401, 404), (target, host_header, raw[:300])
    assert gw.upstream.received == [] and await gw.records() == []


async def test_admin_disabled_without_master_key(gateway):
    gw = await gateway(auth=AuthConfig(master_key=None, max_failures_per_min=0))
    routes = [(r.method, r.resource.canonical) for r in gw.app.router.routes() if r.resource is not None]
    admin = [(m, c) for m, c in routes if c.startswith("/admin/") and m != "OPTIONS"]
    assert admin
    async with aiohttp.ClientSession() as s:
        for method, canonical in admin:
            for headers in ({}, gw.headers(), {"Authorization": f"Bearer {MASTER_KEY}"}, {"Authorization": "Bearer "}):
                async with s.request(method, gw.url + _concrete(canonical), headers=headers, json={"name": "x"}) as r:
                    assert r.status == 403, (method, canonical)
                    if method != "HEAD":
                        assert (await r.json())["error"]["code"] == "admin_disabled"
    assert await gw.state.store.get_key("x") is None
    # The empty string counts as "not configured" too.
    assert not AuthConfig(master_key="").master_key


async def test_keys_in_the_database_are_hashed(gateway):
    gw = await gateway()
    keys = [gw.key] + [await gw.create_key(f"k{i}", models=("mock-gpt",)) for i in range(3)]
    await gw.state.sink.flush()
    raw = b""
    path = gw.state.store.path
    for suffix in ("", "-wal", "-shm"):
        try:
            with open(path + suffix, "rb") as f:
                raw += f.read()
        except FileNotFoundError:
            pass
    assert raw
    for k in keys:
        assert k.encode() not in raw and k[3:].encode() not in raw and k[11:30].encode() not in raw
        assert digest_key(k).encode() in raw  # what is stored instead (the lookup index)
    record = await gw.state.store.get_key("k0")
    assert record is not None and record.prefix == keys[1][:11] and len(record.prefix) < 16


# ---------------------------------------------------------------------- B6: brute force


async def test_b6_an_address_that_keeps_failing_auth_gets_429_and_others_do_not(gateway, monkeypatch):
    monkeypatch.setattr(auth_failures, "TARPIT_S", 0.01)
    gw = await gateway(auth=AuthConfig(master_key=MASTER_KEY, max_failures_per_min=5))
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
    wrong = {"Authorization": "Bearer sk-" + "x" * 43}
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.post(gw.url + "/v1/chat/completions", json=body, headers=wrong) as r:
                assert r.status == 401
        # Now every failure from this address is 429, in the caller's dialect, with the time to wait ...
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=wrong) as r:
            assert r.status == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
            assert (await r.json())["error"]["code"] == "too_many_auth_failures"
        async with s.post(gw.url + "/v1/messages", json={**body, "max_tokens": 5}, headers=wrong) as r:
            assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limit_error"
        async with s.get(gw.url + "/admin/keys", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 429  # the master key cannot be guessed from there either
    # Another address is unaffected (Linux routes all of 127/8 to loopback).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as s:
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=wrong) as r:
            assert r.status == 401


async def test_b6_the_brake_never_blocks_a_valid_key_from_a_braked_address(gateway, monkeypatch):
    """Issue 25 item 13: one stale key in an office must not lock out the office's valid keys."""
    monkeypatch.setattr(auth_failures, "TARPIT_S", 0.01)
    gw = await gateway(auth=AuthConfig(master_key=MASTER_KEY, max_failures_per_min=5))
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
    wrong = {"Authorization": "Bearer sk-" + "x" * 43}
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.post(gw.url + "/v1/chat/completions", json=body, headers=wrong) as r:
                assert r.status in (401, 429)
        assert r.status == 429
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            assert r.status == 200
        async with s.get(gw.url + "/v1/models", headers=gw.headers()) as r:
            assert r.status == 200
        async with s.get(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {MASTER_KEY}"}) as r:
            assert r.status == 200


async def test_b6_braked_failures_are_answered_after_a_pause(gateway, monkeypatch):
    """What slows a scanner now: each braked failure waits TARPIT_S before its 429."""
    waits = []

    async def fake_tarpit() -> None:
        waits.append(auth_failures.TARPIT_S)

    monkeypatch.setattr("proxy.front.tarpit", fake_tarpit)
    gw = await gateway(auth=AuthConfig(master_key=MASTER_KEY, max_failures_per_min=2))
    wrong = {"Authorization": "Bearer sk-" + "x" * 43}
    async with aiohttp.ClientSession() as s:
        for expect in (401, 401, 429, 429):
            async with s.get(gw.url + "/v1/models", headers=wrong) as r:
                assert r.status == expect
    assert waits == [auth_failures.TARPIT_S] * 2 and auth_failures.TARPIT_S >= 1


async def test_b6_wrong_master_keys_count_too(gateway):
    gw = await gateway(auth=AuthConfig(master_key=MASTER_KEY, max_failures_per_min=2))
    async with aiohttp.ClientSession() as s:
        for expect in (401, 401, 429):
            async with s.get(gw.url + "/admin/keys", headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == expect


async def test_b6_zero_turns_the_brake_off(gateway):
    gw = await gateway(auth=AuthConfig(master_key=MASTER_KEY, max_failures_per_min=0))
    async with aiohttp.ClientSession() as s:
        for _ in range(30):
            async with s.get(gw.url + "/v1/models", headers={"Authorization": "Bearer sk-nope"}) as r:
                assert r.status == 401


async def test_b6_behind_a_trusted_proxy_the_brake_keys_on_x_forwarded_for(gateway):
    gw = await gateway(
        auth=AuthConfig(master_key=MASTER_KEY, max_failures_per_min=3),
        server=ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=2, trusted_proxies=("127.0.0.1",)),
    )
    wrong = {"Authorization": "Bearer sk-" + "x" * 43}
    async with aiohttp.ClientSession() as s:
        for _ in range(3):  # one client behind the proxy fails ...
            async with s.get(gw.url + "/v1/models", headers={**wrong, "X-Forwarded-For": "198.51.100.7"}) as r:
                assert r.status == 401
        async with s.get(gw.url + "/v1/models", headers={**wrong, "X-Forwarded-For": "198.51.100.7"}) as r:
            assert r.status == 429
        # ... the proxy's other clients are not affected, and a forged left-most entry does not help:
        async with s.get(gw.url + "/v1/models", headers={**wrong, "X-Forwarded-For": "203.0.113.9"}) as r:
            assert r.status == 401
        forged = {**wrong, "X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
        async with s.get(gw.url + "/v1/models", headers=forged) as r:
            assert r.status == 429
