"""Canary sweep (RELIABILITY §1.1, §4 B5; CLIENTS §B item 14).

A known client key, master key and upstream key (plus an unknown client key) are used
on every error path we can provoke; afterwards none of them, nor their SHA-256, may
appear in any log record (root logger at DEBUG, access log included), any response
body or header, /metrics, the upstream's view of the request, the usage spool, or the
SQLite database files. The one allowed trace is the client key's digest in the keys
table's `digest` column: it is the lookup index.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from pathlib import Path
from urllib.parse import quote

import aiohttp
import orjson

from _gateway import MASTER_KEY, UPSTREAM_KEY, Reply

JSON = {"Content-Type": "application/json"}
SSE = {"Content-Type": "text/event-stream"}
CHAT = {"model": "up-gpt", "messages": [{"role": "user", "content": "hi"}]}
MOCK_CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
CLAUDE = {"model": "up-claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
GEMINI = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
UNKNOWN_KEY = "sk-CANARYunknownKEY" + "0123456789abcdefghijklmnopq"  # well formed, never issued


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def echo(status: int, secret: str, content_type: dict[str, str] = JSON) -> Reply:
    """An upstream error whose body quotes the credential it was sent (nyro#67, litellm#15799)."""
    body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {secret}.", "key": secret, "code": "invalid_api_key"}})
    return Reply(status=status, headers=content_type, chunks=[body])


async def test_canary_sweep(gateway, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="llm_proxy.access")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    gw = await gateway()
    client = gw.key
    assert len(UNKNOWN_KEY) == 46
    seen: list[bytes] = []  # every response: status line data, headers and body

    async def hit(s: aiohttp.ClientSession, method: str, path: str, **kw: object) -> int:
        async with s.request(method, gw.url + path, **kw) as r:  # type: ignore[arg-type]
            try:
                body = await r.read()
            except aiohttp.ClientPayloadError:
                body = b"<cut>"
            seen.append(str(r.headers).encode() + b"\n" + body)
            return r.status

    bearer = {"Authorization": f"Bearer {client}"}
    async with aiohttp.ClientSession() as s:
        # Wrong / unknown keys in every style, including the query on Gemini and non-Gemini routes.
        for headers in (
            {"Authorization": f"Bearer {UNKNOWN_KEY}"},
            {"x-api-key": UNKNOWN_KEY},
            {"api-key": UNKNOWN_KEY + "x"},
            {"x-goog-api-key": MASTER_KEY},
            {"Authorization": f"Bearer {UPSTREAM_KEY}"},
            {"Authorization": f"Basic {client}"},
        ):
            assert await hit(s, "POST", "/v1/chat/completions", json=MOCK_CHAT, headers=headers) == 401
            assert await hit(s, "POST", "/v1/messages", json=CLAUDE, headers=headers) == 401
        assert await hit(s, "POST", "/v1beta/models/mock-gemini:generateContent?key=" + UNKNOWN_KEY, json=GEMINI) == 401
        assert await hit(s, "POST", "/v1/chat/completions?key=" + client, json=MOCK_CHAT) == 401
        assert await hit(s, "GET", "/v1beta/models?key=" + quote(MASTER_KEY)) == 401
        # The client key where it does not belong: a forbidden body field.
        assert await hit(s, "POST", "/v1/chat/completions", json={**MOCK_CHAT, "api_key": client}, headers=bearer) == 400

        # Upstream failures that quote the gateway's credential.
        gw.upstream.script(
            echo(401, UPSTREAM_KEY),
            echo(403, UPSTREAM_KEY),
            echo(400, UPSTREAM_KEY),
            echo(500, UPSTREAM_KEY),
            echo(429, UPSTREAM_KEY),
        )
        for _ in range(5):
            status = await hit(s, "POST", "/v1/chat/completions", json=CHAT, headers=bearer)
            assert status in (400, 429, 502, 503), status
        gw.upstream.script(echo(401, UPSTREAM_KEY))
        assert await hit(s, "POST", "/v1/messages", json=CLAUDE, headers={"x-api-key": client}) == 502
        gw.upstream.script(echo(401, UPSTREAM_KEY, SSE))
        assert await hit(s, "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer) == 502
        gw.upstream.script(echo(401, UPSTREAM_KEY))
        status = await hit(s, "POST", "/v1beta/models/up-gemini:generateContent?key=" + client, json=GEMINI)
        assert status == 502
        # A Gemini call with ?key= that succeeds: the key must not travel upstream.
        gw.upstream.script(Reply(headers=JSON, chunks=[b'{"candidates":[],"usageMetadata":{"promptTokenCount":1}}']))
        assert await hit(s, "POST", "/v1beta/models/up-gemini:generateContent?key=" + client, json=GEMINI) == 200

        # Mid-stream cut after the first event, with the key in the first chunk of text.
        first = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        gw.upstream.script(Reply(headers=SSE, chunks=[first, b"data: " + UPSTREAM_KEY.encode() + b"\n\n"], cut_after=1))
        assert await hit(s, "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer) == 200

        # Admin calls: wrong masters, then real ones.
        for wrong in (client, UPSTREAM_KEY, MASTER_KEY + "x", MASTER_KEY[:-2]):
            assert await hit(s, "GET", "/admin/keys", headers={"Authorization": f"Bearer {wrong}"}) == 401
        assert await hit(s, "GET", "/admin/keys?key=" + MASTER_KEY) == 401
        admin = {"Authorization": f"Bearer {MASTER_KEY}"}
        assert await hit(s, "POST", "/admin/keys", json={"name": "sweep", "rpm": 1}, headers=admin) == 201
        assert await hit(s, "POST", "/admin/keys", json={"name": "sweep"}, headers=admin) == 409
        for path in ("/admin/keys", "/admin/keys/test-key", "/admin/usage", "/admin/usage?by=key"):
            assert await hit(s, "GET", path, headers=admin) == 200
        assert await hit(s, "PATCH", "/admin/keys/sweep", json={"rpm": "many"}, headers=admin) == 400
        assert await hit(s, "GET", "/v1/usage", headers=bearer) == 200
        assert await hit(s, "GET", "/healthz") == 200
        assert await hit(s, "GET", "/readyz") == 200

    # A header the HTTP parser refuses (NUL), carrying the client key.
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {client}\x00\r\n\r\n".encode())
    await writer.drain()
    seen.append(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    await writer.wait_closed()

    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/metrics") as r:
            metrics = await r.read()
    assert b"llm_proxy_requests" in metrics

    records = await gw.wait_records(len(gw.upstream.received))
    await gw.state.sink.flush()
    await asyncio.sleep(0.1)  # the last access-log lines

    secrets = {"client key": client, "master key": MASTER_KEY, "upstream key": UPSTREAM_KEY, "unknown key": UNKNOWN_KEY}
    needles = {**secrets, **{f"sha256({k})": sha(v) for k, v in secrets.items()}}
    # The distinctive tail of each key too (a prefix is shown by design: "sk-" + 8 chars).
    needles.update({f"tail({k})": v[12:] for k, v in secrets.items()})

    gw.state.access_log.flush()  # lines are written in batches
    log_text = caplog.text + "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records
    )
    out, err = capfd.readouterr()
    assert "llm_proxy.access" in caplog.text and "key=test-key" in caplog.text  # the access log was captured
    assert any(r.name == "llm_proxy.forward" for r in caplog.records)  # so were the error paths

    spool = Path(gw.state.config.storage.spool_path)
    places = {
        "logs": log_text,
        "stdout/stderr": out + err,
        "responses": b"\n".join(seen).decode("utf-8", "replace"),
        "metrics": metrics.decode(),
        "usage records": repr(records),
        "spool": spool.read_text() if spool.exists() else "",
        "upstream requests": repr([(r.path, r.query, r.body) for r in gw.upstream.received])
        + repr([{k: v for k, v in r.headers.items() if k.lower() not in ("authorization", "x-api-key", "x-goog-api-key")} for r in gw.upstream.received]),
    }
    for where, text in places.items():
        for name, needle in needles.items():
            assert needle not in text, f"{name} found in {where}"
    # The upstream got the operator's credential in its own header, and nothing of the client's.
    for r in gw.upstream.received:
        sent = repr(r.headers)
        assert client not in sent and UNKNOWN_KEY not in sent and MASTER_KEY not in sent
        assert UPSTREAM_KEY in sent

    # The database files: raw bytes (main file, WAL, shared memory).
    db_path = Path(gw.state.store.path)
    raw = b"".join(p.read_bytes() for p in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")) if p.exists())
    assert raw
    for name, needle in needles.items():
        if name == "sha256(client key)":
            continue  # checked column by column below
        assert needle.encode() not in raw, f"{name} found in the database file"
    # Column by column: the client key's digest only in keys.digest, and only once.
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        hits = []
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')  # names from sqlite_master, not input
            cols = [c[0] for c in cursor.description]
            for row in cursor:
                for col, value in zip(cols, row):
                    text = str(value)
                    for name, needle in needles.items():
                        if needle in text:
                            hits.append((table, col, name))
    conn.close()
    assert hits == [("keys", "digest", "sha256(client key)")], hits
