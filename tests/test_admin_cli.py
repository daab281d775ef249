"""The admin API (/admin/, master key only) and the `llm-proxy` command line (DESIGN §2).

CLI tests run the real entry point (`python -m proxy`) in subprocesses against a temp
config and SQLite file, including while a `serve` process uses the same file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from _gateway import MASTER_KEY, free_port
from proxy.keys import digest_key, well_formed
from proxy.store import open_store
from proxy.store.base import KeyLimits, UsageRecord

REPO = Path(__file__).resolve().parents[1]
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
OPENAI_BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}


async def req(gw: Any, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path, headers=ADMIN if headers is None else headers, **kw) as r:
            raw = await r.read()
            try:
                doc = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                doc = None
            return r.status, doc, raw


# ---------------------------------------------------------------------- admin API


async def test_admin_create_shows_the_key_once(gateway):
    gw = await gateway()
    status, doc, _ = await req(gw, "POST", "/admin/keys", json={"name": "alice", "models": ["mock-gpt"], "rpm": 10})
    assert status == 201, doc
    key = doc["key"]
    assert well_formed(key) and doc["prefix"] == key[:11] and doc["name"] == "alice"
    assert doc["models"] == ["mock-gpt"] and doc["rpm"] == 10 and doc["tpm"] is None
    assert doc["revoked_at"] is None and doc["created_at"].endswith("Z")
    assert "digest" not in doc and digest_key(key) not in orjson.dumps(doc).decode()
    # Never again: list, get by id, get by name.
    for path in ("/admin/keys", f"/admin/keys/{doc['id']}", "/admin/keys/alice"):
        status, got, raw = await req(gw, "GET", path)
        assert status == 200
        assert key.encode() not in raw and key[11:].encode() not in raw and digest_key(key).encode() not in raw
        assert b"digest" not in raw
    status, got, _ = await req(gw, "GET", "/admin/keys/alice")
    assert got == {k: v for k, v in doc.items() if k != "key"}
    status, listed, _ = await req(gw, "GET", "/admin/keys")
    assert [k["name"] for k in listed["data"]] == ["test-key", "alice"]
    # The key works, within its allowlist.
    status, _, _ = await req(gw, "POST", "/v1/chat/completions", {"Authorization": f"Bearer {key}"}, json=OPENAI_BODY)
    assert status == 200
    # A second create with the same name is a conflict and mints nothing.
    status, doc2, raw = await req(gw, "POST", "/admin/keys", json={"name": "alice"})
    assert status == 409 and doc2["error"]["code"] == "duplicate_name" and b'"key"' not in raw
    assert len((await req(gw, "GET", "/admin/keys"))[1]["data"]) == 2


BAD_CREATE_BODIES = [
    {},
    {"name": ""},
    {"name": " padded"},
    {"name": "line\nbreak"},
    {"name": "nul\x00"},
    {"name": "rtl\u202eoverride"},
    {"name": "line\u2028sep"},
    {"name": "x" * 129},
    {"name": 123},
    {"name": "key_0123456789abcdef"},
    {"name": "ok", "colour": "red"},
    {"name": "ok", "rpm": -1},
    {"name": "ok", "rpm": 10**30},
    {"name": "ok", "tpm": 2**63},
    {"name": "ok", "rpm": 1.5},
    {"name": "ok", "rpm": True},
    {"name": "ok", "budget_usd": -1},
    {"name": "ok", "budget_usd": 1e300},
    {"name": "ok", "budget_period": "year"},
    {"name": "ok", "models": "mock-gpt"},
    {"name": "ok", "models": [""]},
    {"name": "ok", "expires_in_days": 1e12},
    {"name": "ok", "expires_in_days": -1},
    {"name": "ok", "expires_at": 1e20},
    {"name": "ok", "expires_at": "not a date"},
    {"name": "ok", "expires_at": 1, "expires_in_days": 1},
]


async def test_admin_create_rejects_bad_input_with_400(gateway):
    gw = await gateway()
    for body in BAD_CREATE_BODIES:
        status, doc, _ = await req(gw, "POST", "/admin/keys", json=body)
        assert status == 400, (body, doc)
        assert doc["error"]["type"] == "invalid_request_error"
    status, listed, _ = await req(gw, "GET", "/admin/keys")
    assert status == 200 and [k["name"] for k in listed["data"]] == ["test-key"]
    status, doc, _ = await req(gw, "POST", "/admin/keys", json={"name": "équipe données 🔑", "expires_in_days": 30})
    assert status == 201 and doc["name"] == "équipe données 🔑" and doc["expires_at"]


async def test_admin_rejects_non_object_bodies(gateway):
    gw = await gateway()
    for data in (b"not json", b"[]", b'"name"', b"null"):
        status, doc, _ = await req(gw, "POST", "/admin/keys", data=data)
        assert status == 400 and doc["error"]["code"] == "invalid_json", data


async def test_admin_patch_is_partial_and_validated(gateway):
    gw = await gateway()
    _, created, _ = await req(
        gw, "POST", "/admin/keys", json={"name": "bob", "models": ["mock-gpt"], "rpm": 5, "tpm": 1000, "budget_usd": 2.5, "budget_period": "month"}
    )
    status, doc, _ = await req(gw, "PATCH", "/admin/keys/bob", json={"rpm": 20})
    assert status == 200, doc
    assert doc["rpm"] == 20 and doc["tpm"] == 1000 and doc["models"] == ["mock-gpt"]
    assert doc["budget_usd"] == 2.5 and doc["budget_period"] == "month" and doc["expires_at"] is None
    status, doc, _ = await req(gw, "PATCH", f"/admin/keys/{created['id']}", json={"tpm": None, "expires_at": "2030-01-01T00:00:00Z"})
    assert status == 200 and doc["tpm"] is None and doc["rpm"] == 20 and doc["expires_at"] == "2030-01-01T00:00:00Z"
    status, doc, _ = await req(gw, "PATCH", "/admin/keys/bob", json={"models": None})
    assert status == 200 and doc["models"] == [] and doc["rpm"] == 20
    for bad in ({"name": "carol"}, {"rpm": 10**30}, {"max_parallel": 2**63}, {"expires_in_days": 1e12}, {"expires_at": 1e20}, {"budget_period": "x"}, {"id": "x"}):
        status, err, _ = await req(gw, "PATCH", "/admin/keys/bob", json=bad)
        assert status == 400, (bad, err)
    status, err, _ = await req(gw, "PATCH", "/admin/keys/nobody", json={"rpm": 1})
    assert status == 404 and err["error"]["code"] == "key_not_found"
    # Nothing above left an unlistable row behind.
    status, listed, _ = await req(gw, "GET", "/admin/keys")
    assert status == 200 and {k["name"] for k in listed["data"]} == {"test-key", "bob"}
    assert (await req(gw, "GET", "/admin/keys/bob"))[1]["rpm"] == 20


async def test_admin_revoke_by_post_and_delete(gateway):
    gw = await gateway()
    _, a, _ = await req(gw, "POST", "/admin/keys", json={"name": "a"})
    _, b, _ = await req(gw, "POST", "/admin/keys", json={"name": "b", "expires_in_days": 0})
    status, doc, _ = await req(gw, "POST", "/admin/keys/a/revoke")
    assert status == 200 and doc["revoked_at"] and "key" not in doc
    status, doc2, _ = await req(gw, "DELETE", f"/admin/keys/{a['id']}")
    assert status == 200 and doc2["revoked_at"] == doc["revoked_at"]  # idempotent: first time kept
    for key in (a["key"], b["key"]):  # revoked, and expired at creation
        status, err, _ = await req(gw, "GET", "/v1/models", {"Authorization": f"Bearer {key}"})
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    for method, path in (("POST", "/admin/keys/nobody/revoke"), ("DELETE", "/admin/keys/nobody"), ("GET", "/admin/keys/nobody")):
        status, err, _ = await req(gw, method, path)
        assert status == 404 and err["error"]["code"] == "key_not_found"
    status, doc, _ = await req(gw, "GET", "/v1/models")  # the master key is not a client key
    assert status == 401


async def test_admin_wrong_master_key_is_refused(gateway):
    gw = await gateway()
    wrong = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {MASTER_KEY[:-1]}"},
        {"Authorization": f"Bearer {MASTER_KEY}x"},
        {"Authorization": f"Bearer {MASTER_KEY.upper()}"},
        {"Authorization": f"Basic {MASTER_KEY}"},
        {"Authorization": f"Bearer {gw.key}"},
    ]
    bodies = set()
    for headers in wrong:
        status, doc, raw = await req(gw, "GET", "/admin/keys", headers)
        assert status == 401 and doc["error"]["code"] == "invalid_api_key", headers
        assert MASTER_KEY[4:].encode() not in raw
        bodies.add(raw)
    assert len(bodies) == 1
    status, _, _ = await req(gw, "GET", "/admin/keys?key=" + MASTER_KEY, {})
    assert status == 401  # never from the query string
    status, _, _ = await req(gw, "GET", "/admin/keys", {"x-api-key": MASTER_KEY})
    assert status == 200


async def test_admin_usage_with_filters_and_own_usage(gateway):
    gw = await gateway()
    _, a, _ = await req(gw, "POST", "/admin/keys", json={"name": "alice"})
    _, b, _ = await req(gw, "POST", "/admin/keys", json={"name": "bob", "budget_usd": 5})
    for key, path, body in (
        (a["key"], "/v1/chat/completions", OPENAI_BODY),
        (a["key"], "/v1/chat/completions", OPENAI_BODY),
        (b["key"], "/v1/messages", {"model": "mock-claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    ):
        status, _, _ = await req(gw, "POST", path, {"x-api-key": key}, json=body)
        assert status == 200
    assert len(await gw.wait_records(3)) == 3
    status, doc, raw = await req(gw, "GET", "/admin/usage")
    assert status == 200 and len(doc["data"]) == 3
    assert {r["key_name"] for r in doc["data"]} == {"alice", "bob"}
    for secret in (a["key"], b["key"], digest_key(a["key"]), MASTER_KEY):
        assert secret.encode() not in raw
    status, doc, _ = await req(gw, "GET", "/admin/usage?key=alice&since=1h")
    assert status == 200 and len(doc["data"]) == 2 and all(r["model"] == "mock-gpt" for r in doc["data"])
    status, doc, _ = await req(gw, "GET", f"/admin/usage?key={b['id']}")
    assert status == 200 and [r["model"] for r in doc["data"]] == ["mock-claude"]
    status, doc, _ = await req(gw, "GET", "/admin/usage?by=model")
    assert status == 200 and {g["group"]: g["requests"] for g in doc["data"]} == {"mock-gpt": 2, "mock-claude": 1}
    status, doc, _ = await req(gw, "GET", "/admin/usage?by=key&since=2000-01-01")
    assert status == 200 and {g["group"]: g["requests"] for g in doc["data"]} == {"alice": 2, "bob": 1}
    status, doc, _ = await req(gw, "GET", "/admin/usage?since=2999-01-01")
    assert status == 200 and doc["data"] == []
    for query, code in (("?by=colour", 400), ("?since=soon", 400), ("?since=99999999999999999999d", 400), ("?since=" + "9" * 400 + "d", 400), ("?key=nobody", 404)):
        status, err, _ = await req(gw, "GET", "/admin/usage" + query)
        assert status == code, (query, err)
    # A key's own view: its usage and limits, nothing of other keys, no secrets.
    status, doc, raw = await req(gw, "GET", "/v1/usage", {"Authorization": f"Bearer {b['key']}"})
    assert status == 200 and doc["key"]["name"] == "bob"
    assert [u["group"] for u in doc["usage"]] == ["mock-claude"]
    assert doc["budget"]["budget_usd"] == 5 and 0 < doc["budget"]["remaining_usd"] <= 5
    assert b["key"].encode() not in raw and digest_key(b["key"]).encode() not in raw and b"alice" not in raw


# ---------------------------------------------------------------------- CLI


def write_config(tmp: Path, port: int = 8080, storage_url: str | None = None, extra_upstream: str = "") -> Path:
    cfg = tmp / "proxy.yaml"
    cfg.write_text(
        f"""
server: {{host: 127.0.0.1, port: {port}, shutdown_grace_s: 2}}
auth: {{master_key: "${{LLM_PROXY_MASTER_KEY:-}}", cache_ttl_s: 1, negative_cache_ttl_s: 1}}
storage: {{url: "{storage_url or f'sqlite:///{tmp}/cli.db'}", spool_path: "{tmp}/spool.jsonl", flush_interval_s: 0.05}}
limits: {{url: "${{LIMITS_URL:-memory://}}"}}
upstreams:
  - {{name: mock, protocol: openai, base_url: "mock://"}}
  - name: openai
    protocol: openai
    base_url: https://api.openai.com/v1
    api_key: "${{OPENAI_API_KEY:-}}"
{extra_upstream}
models:
  - {{name: demo, routes: [{{upstream: mock, model: mock-gpt}}], price: {{input_per_mtok: 1, output_per_mtok: 2}}}}
  - {{name: gpt-4o-mini, routes: [{{upstream: openai, model: gpt-4o-mini}}]}}
""",
        encoding="utf-8",
    )
    return cfg


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_PROXY_", "OPENAI_", "ANTHROPIC_", "GEMINI_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def cli(tmp: Path, cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args, "--config", str(cfg)],
        cwd=tmp,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def db_bytes(path: Path) -> bytes:
    out = b""
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            out += p.read_bytes()
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def cli_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cli.db"
    url: str = request.getfixturevalue("pg_store_url")
    return url


def test_cli_keys_create_list_revoke(tmp_path, cli_store_url):
    cfg = write_config(tmp_path, storage_url=cli_store_url)
    r = cli(tmp_path, cfg, "keys", "create", "--name", "ci", "--models", "demo,demo", "--rpm", "60", "--budget-usd", "1.5", "--json")
    assert r.returncode == 0, r.stderr
    doc = orjson.loads(r.stdout)  # exactly one JSON document on stdout
    key = doc["key"]
    assert well_formed(key) and doc["name"] == "ci" and doc["models"] == ["demo"] and doc["rpm"] == 60
    assert key not in r.stderr
    r = cli(tmp_path, cfg, "keys", "create", "--name", "plain")
    assert r.returncode == 0 and "sk-" in r.stdout  # shown once, for a human
    plain_key = next(w for w in r.stdout.split() if w.startswith("sk-"))
    r = cli(tmp_path, cfg, "keys", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = orjson.loads(r.stdout)
    assert [k["name"] for k in listed] == ["ci", "plain"]
    for secret in (key, plain_key, digest_key(key), digest_key(plain_key), key[11:], plain_key[11:]):
        assert secret not in r.stdout and secret not in r.stderr
    assert "digest" not in r.stdout
    r = cli(tmp_path, cfg, "keys", "list")
    assert r.returncode == 0 and "ci" in r.stdout and key not in r.stdout and digest_key(key) not in r.stdout
    r = cli(tmp_path, cfg, "keys", "create", "--name", "ci", "--json")
    assert r.returncode == 1 and r.stdout == "" and "already exists" in r.stderr
    r = cli(tmp_path, cfg, "keys", "revoke", "ci")
    assert r.returncode == 0 and "Revoked" in r.stdout
    r = cli(tmp_path, cfg, "keys", "revoke", "nobody")
    assert r.returncode == 1 and "nobody" in r.stderr
    # --config also works before the sub-subcommand (it used to be silently dropped).
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "--config", str(cfg), "list", "--json"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    listed = {k["name"]: k for k in orjson.loads(r.stdout)}
    assert listed["ci"]["revoked_at"] and listed["plain"]["revoked_at"] is None and len(listed) == 2
    if cli_store_url.startswith("sqlite"):
        raw = db_bytes(tmp_path / "cli.db")
        assert raw and key.encode() not in raw and plain_key.encode() not in raw
    assert not (tmp_path / "data").exists()  # nothing fell back to the default store path


@pytest.mark.parametrize(
    "args",
    [
        ("--name", ""),
        ("--name", "a\tb"),
        ("--name", "key_0123456789abcdef"),
        ("--name", "x", "--rpm", "-1"),
        ("--name", "x", "--tpm", str(10**20)),
        ("--name", "x", "--budget-usd", "nan"),
        ("--name", "x", "--budget-usd", "inf"),
        ("--name", "x", "--budget-usd", "-2"),
        ("--name", "x", "--expires-in-days", "1e12"),
        ("--name", "x", "--expires-in-days", "nan"),
    ],
)
def test_cli_keys_create_rejects_bad_values(tmp_path, capsys, args):
    from proxy.cli import main

    cfg = write_config(tmp_path)
    assert main(["keys", "create", *args, "--json", "--config", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "cli.db").exists()  # refused before the store was opened


def test_cli_expires_in_days_zero_means_expired_now(tmp_path, capsys):
    from proxy.cli import main

    cfg = write_config(tmp_path)
    assert main(["keys", "create", "--name", "gone", "--expires-in-days", "0", "--json", "--config", str(cfg)]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["expires_at"] is not None  # it used to mean "never expires"


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start")


async def test_cli_manages_keys_while_the_server_runs(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port=port)
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(cfg)],
            cwd=tmp_path, env=cli_env(LLM_PROXY_LOG_LEVEL="DEBUG"), stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(_wait_http, base + "/healthz", proc)
        r = await asyncio.to_thread(cli, tmp_path, cfg, "keys", "create", "--name", "live", "--json")
        assert r.returncode == 0, r.stderr
        key = orjson.loads(r.stdout)["key"]
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/v1/chat/completions", json={**OPENAI_BODY, "model": "demo"}, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
            async with s.post(base + "/v1/chat/completions?key=" + key, json={**OPENAI_BODY, "model": "demo"}) as resp:
                assert resp.status == 401  # not a Gemini route
            r = await asyncio.to_thread(cli, tmp_path, cfg, "keys", "revoke", "live")
            assert r.returncode == 0, r.stderr
            t0 = time.monotonic()
            while True:
                async with s.get(base + "/v1/models", headers=headers) as resp:
                    if resp.status == 401:
                        break
                    assert resp.status == 200
                assert time.monotonic() - t0 < 6, "revocation via the CLI not effective within 6 s"
                await asyncio.sleep(0.1)
        # Usage, as recorded by the server, read by the CLI.
        deadline = time.monotonic() + 5
        while True:
            r = await asyncio.to_thread(cli, tmp_path, cfg, "usage", "--json")
            assert r.returncode == 0, r.stderr
            rows = orjson.loads(r.stdout)
            if rows or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert isinstance(rows, list) and len(rows) == 1
        assert rows[0]["key_name"] == "live" and rows[0]["model"] == "demo" and rows[0]["completion_tokens"] > 0
        r = await asyncio.to_thread(cli, tmp_path, cfg, "usage", "--by", "model", "--since", "1h", "--json")
        assert r.returncode == 0, r.stderr
        groups = orjson.loads(r.stdout)
        assert [(g["group"], g["requests"]) for g in groups] == [("demo", 1)]
        r = await asyncio.to_thread(cli, tmp_path, cfg, "usage", "--by", "key", "--since", "2999-01-01", "--json")
        assert r.returncode == 0 and orjson.loads(r.stdout) == []
        r = await asyncio.to_thread(cli, tmp_path, cfg, "usage", "--since", "9" * 30 + "d")
        assert r.returncode == 2 and "Traceback" not in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    server_log = log_path.read_text()
    assert "listening" in server_log
    for secret in (key, key[11:], digest_key(key)):
        assert secret not in server_log
    raw = db_bytes(tmp_path / "cli.db")
    assert key.encode() not in raw and key[11:].encode() not in raw


def test_check_config_masks_secrets(tmp_path):
    openai_canary = "sk-proj-CANARY-5b1e0c9a7d3f4e2a"
    master_canary = "master-CANARY-e4d3c2b1a0f9"
    pg_password = "pgpw-CANARY-1234abcd"
    cfg = write_config(tmp_path, storage_url=f"postgresql://app:{pg_password}@db.internal:5432/llm")
    env = cli_env(OPENAI_API_KEY=openai_canary, LLM_PROXY_MASTER_KEY=master_canary)
    r = cli(tmp_path, cfg, "check-config", env=env)
    assert r.returncode == 0, r.stderr
    doc = orjson.loads(r.stdout)
    out = r.stdout + r.stderr
    for secret in (openai_canary, master_canary, pg_password):
        assert secret not in out, secret
        assert secret[:-4] not in out
    assert doc["auth"]["master_key"].startswith("****")
    assert doc["upstreams"][1]["api_key"] == "****" + openai_canary[-4:]
    assert "db.internal" in doc["storage"]["url"] and "****" in doc["storage"]["url"]


def test_check_config_masks_upstream_header_values():
    from proxy.config import Config, UpstreamConfig, masked

    secret = "Bearer org-CANARY-77aa88bb99cc"
    cfg = Config(upstreams=(UpstreamConfig("org", "https://example.invalid/v1", headers={"Authorization": secret}),))
    out = orjson.dumps(masked(cfg)).decode()
    assert secret[:-4] not in out and "****" in out


def test_check_config_masks_upstream_headers_from_yaml(tmp_path):
    header_canary = "org-CANARY-77aa88bb99cc"
    extra = f"""  - name: org
    protocol: openai
    base_url: https://example.invalid/v1
    api_key: "${{OPENAI_API_KEY}}"
    headers: {{Authorization: "Bearer {header_canary}", OpenAI-Organization: "${{ORG}}"}}
"""
    cfg = write_config(tmp_path, extra_upstream=extra)
    r = cli(tmp_path, cfg, "check-config", env=cli_env(OPENAI_API_KEY="sk-x" * 8, ORG="org-" + header_canary))
    assert r.returncode == 0, r.stderr
    assert header_canary[:-4] not in r.stdout + r.stderr


def test_check_config_masks_a_redis_password_without_user(tmp_path):
    cfg = write_config(tmp_path)
    secret = "redispw-CANARY-0a1b2c3d"
    r = cli(tmp_path, cfg, "check-config", env=cli_env(LIMITS_URL=f"redis://:{secret}@127.0.0.1:6379/0"))
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout


def in_process(capsys: pytest.CaptureFixture[str]) -> Any:
    """`cli(tmp, cfg, *args)` through `proxy.cli.main` in this process: the same code as
    `python -m proxy`, without a second's interpreter start per call."""
    from proxy.cli import main

    def run(tmp: Path, cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            rc = main([*args, "--config", str(cfg)])
        except SystemExit as exc:  # argparse refusing an option
            rc = int(exc.code or 0)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)

    return run


def test_cli_keys_rotate_update_and_name_reuse(tmp_path, cli_store_url, capsys):
    cfg = write_config(tmp_path, storage_url=cli_store_url)
    cli = in_process(capsys)
    r = cli(tmp_path, cfg, "keys", "create", "--name", "team", "--models", "demo", "--rpm", "5", "--json")
    assert r.returncode == 0, r.stderr
    created = orjson.loads(r.stdout)
    r = cli(tmp_path, cfg, "keys", "rotate", "team", "--json")
    assert r.returncode == 0, r.stderr
    rotated = orjson.loads(r.stdout)
    assert well_formed(rotated["key"]) and rotated["key"] != created["key"]
    assert {k: rotated[k] for k in ("id", "name", "models", "rpm")} == {"id": created["id"], "name": "team", "models": ["demo"], "rpm": 5}
    r = cli(tmp_path, cfg, "keys", "rotate", created["id"])
    assert r.returncode == 0 and "sk-" in r.stdout and "shown only this" in r.stdout
    # update: left-out options keep their value, `none` clears, unknown models need --force
    r = cli(tmp_path, cfg, "keys", "update", "team", "--tpm", "900", "--budget-usd", "2.5", "--expires-in-days", "30", "--json")
    assert r.returncode == 0, r.stderr
    doc = orjson.loads(r.stdout)
    assert doc["tpm"] == 900 and doc["rpm"] == 5 and doc["budget_usd"] == 2.5 and doc["expires_at"] and doc["models"] == ["demo"]
    r = cli(tmp_path, cfg, "keys", "update", "team", "--rpm", "none", "--expires-in-days", "none", "--models", "", "--json")
    doc = orjson.loads(r.stdout)
    assert r.returncode == 0 and doc["rpm"] is None and doc["expires_at"] is None and doc["models"] == [] and doc["tpm"] == 900
    r = cli(tmp_path, cfg, "keys", "update", "team", "--models", "demo,gpt-9-typo", "--json")
    assert r.returncode == 2 and r.stdout == "" and "gpt-9-typo" in r.stderr and "--force" in r.stderr
    r = cli(tmp_path, cfg, "keys", "create", "--name", "typo", "--models", "gpt-9-typo")
    assert r.returncode == 2 and "gpt-9-typo" in r.stderr
    r = cli(tmp_path, cfg, "keys", "update", "team", "--models", "gpt-9-typo", "--force", "--json")
    assert r.returncode == 0 and orjson.loads(r.stdout)["models"] == ["gpt-9-typo"]
    r = cli(tmp_path, cfg, "keys", "update", "team", "--rpm", "-3")
    assert r.returncode == 2 and "rpm" in r.stderr
    r = cli(tmp_path, cfg, "keys", "update", "nobody", "--rpm", "3")
    assert r.returncode == 1 and "nobody" in r.stderr
    # revoke frees the name; a revoked key cannot be rotated
    assert cli(tmp_path, cfg, "keys", "revoke", "team").returncode == 0
    r = cli(tmp_path, cfg, "keys", "rotate", created["id"])
    assert r.returncode == 1 and "revoked" in r.stderr
    r = cli(tmp_path, cfg, "keys", "create", "--name", "team", "--json")
    assert r.returncode == 0, r.stderr
    r = cli(tmp_path, cfg, "keys", "list", "--json")
    listed = orjson.loads(r.stdout)
    assert [k["name"] for k in listed] == ["team", "team"] and all("last_used_at" in k for k in listed)
    r = cli(tmp_path, cfg, "keys", "list")
    assert "LAST_USED_AT" in r.stdout


def test_cli_usage_listing_filters_groupings_and_csv(tmp_path, cli_store_url, capsys):
    cfg = write_config(tmp_path, storage_url=cli_store_url)
    cli = in_process(capsys)

    async def seed() -> list[UsageRecord]:
        store = open_store(cli_store_url)
        await store.open()
        try:
            a, _ = await store.create_key("a", KeyLimits())
            now = time.time()
            records = [
                UsageRecord(f"r{i:03d}", now - 60 * i, a.id if i % 2 else None, "a" if i % 2 else None, "chat.completions",
                            "demo" if i % 3 else "other", "mock", "mock-gpt", False, 200, prompt_tokens=i, completion_tokens=1,
                            cost_usd=0.5, outcome="timeout" if i % 5 == 0 else "ok")
                for i in range(150)
            ]
            await store.write_usage(records)
            return records
        finally:
            await store.close()

    records = asyncio.run(seed())
    newest = sorted(records, key=lambda r: r.ts, reverse=True)
    r = cli(tmp_path, cfg, "usage", "--json")
    rows = orjson.loads(r.stdout)
    assert r.returncode == 0 and [x["id"] for x in rows] == [x.id for x in newest[:100]]  # newest first, default 100
    assert "newest 100" in r.stderr  # says it is cut
    r = cli(tmp_path, cfg, "usage", "--json", "--limit", "500")
    assert len(orjson.loads(r.stdout)) == 150 and r.stderr == ""
    r = cli(tmp_path, cfg, "usage", "--json", "--key", "a", "--model", "demo", "--outcome", "ok", "--limit", "500")
    want = [x.id for x in newest if x.key_name == "a" and x.model == "demo" and x.outcome == "ok"]
    assert [x["id"] for x in orjson.loads(r.stdout)] == want
    r = cli(tmp_path, cfg, "usage", "--json", "--outcome", "error", "--until", "1h")
    assert {x["outcome"] for x in orjson.loads(r.stdout)} == {"timeout"}
    r = cli(tmp_path, cfg, "usage", "--format", "csv")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].startswith("id,ts,key_id,key_name") and len(lines) == 151  # csv: all of them
    r = cli(tmp_path, cfg, "usage", "--by", "key_model", "--json")
    groups = {(g["key_name"], g["model"]): g["requests"] for g in orjson.loads(r.stdout)}
    want_groups: dict[tuple[Any, str], int] = {}
    for x in records:
        want_groups[(x.key_name, x.model)] = want_groups.get((x.key_name, x.model), 0) + 1
    assert groups == want_groups
    r = cli(tmp_path, cfg, "usage", "--by", "model", "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines()[0].startswith("group,") and "demo," in r.stdout
    r = cli(tmp_path, cfg, "usage", "--by", "key_model")
    assert r.returncode == 0 and "KEY_NAME" in r.stdout
    r = cli(tmp_path, cfg, "usage", "--key", "nobody")
    assert r.returncode == 1 and "nobody" in r.stderr
    r = cli(tmp_path, cfg, "usage", "--json", "--format", "csv")
    assert r.returncode == 2
