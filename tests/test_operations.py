"""Day-two operations (issue 26): which files every command uses, config mistakes that
must not pass, logs an operator can use, and what the caller of a dead key is told.

CLI checks run the real entry point (`python -m proxy`) in subprocesses; log checks run
a real gateway (tests/_gateway.py) and read what its loggers wrote.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from _gateway import Reply
from proxy.config import ConfigError, anchor_paths, load_config, parse_config
from proxy.store.base import KeyLimits, StoreError

REPO = Path(__file__).resolve().parents[1]
CHAT = {"model": "up-gpt", "messages": [{"role": "user", "content": "hi"}]}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_PROXY_", "OPENAI_", "ANTHROPIC_", "GEMINI_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------------- state directory


def test_every_command_uses_the_database_next_to_its_config_wherever_it_runs(tmp_path: Path) -> None:
    """`keys create` run from one directory and `keys list` from another, with the same
    config file, meet the same database: the config's relative paths are anchored to it."""
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = etc / "proxy.yaml"
    cfg.write_text('storage: {state_dir: "../state", url: "sqlite:///llm-proxy.db", spool_path: spool.jsonl}\n')
    here, elsewhere = tmp_path / "a", tmp_path / "b"
    here.mkdir()
    elsewhere.mkdir()
    made = _cli(here, "keys", "create", "--name", "alice", "--config", str(cfg))
    assert made.returncode == 0, made.stderr
    # The first command made the database, and says so and where.
    assert f"there was no database at {tmp_path / 'state' / 'llm-proxy.db'}" in made.stderr
    listed = _cli(elsewhere, "keys", "list", "--json", "--config", os.path.relpath(cfg, elsewhere))
    assert listed.returncode == 0, listed.stderr
    assert [k["name"] for k in orjson.loads(listed.stdout)] == ["alice"]
    assert "no database" not in listed.stderr
    assert not list(here.iterdir()) and not list(elsewhere.iterdir()), "a database was made in a working directory"
    # check-config says which file and which database, on stderr (stdout is the JSON).
    checked = _cli(elsewhere, "check-config", "--config", str(cfg))
    assert checked.returncode == 0, checked.stderr
    assert f"config {cfg}; keys and usage in SQLite {tmp_path / 'state' / 'llm-proxy.db'}" in checked.stderr
    doc = orjson.loads(checked.stdout)
    assert doc["storage"]["state_dir"] == str(tmp_path / "state")
    assert doc["storage"]["spool_path"] == str(tmp_path / "state" / "spool.jsonl")


@pytest.mark.fast
def test_state_dir_rules() -> None:
    base = Path("/srv/app/config")

    def storage(text: str, env: dict[str, str] | None = None) -> Any:
        return anchor_paths(parse_config(text, env or {}), base).storage

    # Unset: the config file's directory; the built-in defaults keep their data/ prefix.
    s = storage("")
    assert (s.state_dir, s.url, s.spool_path) == (
        "/srv/app/config", "sqlite:////srv/app/config/data/llm-proxy.db", "/srv/app/config/data/usage-spool.jsonl",
    )
    # Relative to the file, absolute as given, ~ expanded; absolute paths inside stay.
    assert storage("storage: {state_dir: ../data}").state_dir == "/srv/app/data"
    s = storage('storage: {state_dir: /var/lib/x, url: "sqlite:////db/x.db", spool_path: /spool/s}')
    assert (s.state_dir, s.url, s.spool_path) == ("/var/lib/x", "sqlite:////db/x.db", "/spool/s")
    assert storage("storage: {state_dir: ~/st}").state_dir == os.path.expanduser("~/st")
    # Other stores are left alone.
    s = storage('storage: {url: "postgresql://u:p@db/x"}')
    assert s.url == "postgresql://u:p@db/x"
    assert storage('storage: {url: "sqlite:///:memory:"}').url == "sqlite:///:memory:"


def test_shipped_configs_anchor_their_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/ here: the CWD must not matter
    for var in ("LLM_PROXY_STATE_DIR", "LLM_PROXY_STORAGE_URL", "LLM_PROXY_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    repo = load_config(REPO / "config" / "proxy.yaml")
    assert repo.storage.url == f"sqlite:///{REPO / 'data' / 'llm-proxy.db'}"
    assert repo.storage.spool_path == str(REPO / "data" / "usage-spool.jsonl")
    builtin = load_config()  # no file found: the built-in copy, state in the home directory
    assert builtin.storage.state_dir == os.path.expanduser("~/.local/state/llm-proxy")
    monkeypatch.setenv("LLM_PROXY_STATE_DIR", str(tmp_path / "st"))
    assert load_config().storage.url == f"sqlite:///{tmp_path / 'st' / 'llm-proxy.db'}"


# ---------------------------------------------------------------------- validation


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: {port: 99999}", "server.port (line 1): must be from 0 to 65535, got 99999"),
        ("server: {port: -1}", "server.port (line 1): must be from 0 to 65535, got -1"),
        ("server:\n  max_body_mb: -5", "server.max_body_mb (line 2): must be greater than 0, got -5"),
        ("server: {max_headers: 0}", "server.max_headers (line 1): must be at least 1, got 0"),
        ("server: {keepalive_s: .inf}", "server.keepalive_s (line 1): expected a finite number"),
        ("storage: {queue_max: -1}", "storage.queue_max (line 1): must be at least 1"),
        ("auth: {cache_ttl_s: -1}", "auth.cache_ttl_s (line 1): must be at least 0"),
        ("limits: {default_max_tokens: 0}", "limits.default_max_tokens (line 1): must be at least 1"),
        ("upstreams: [{name: a, base_url: 'http://x', max_parallel: 0}]", "upstreams[0].max_parallel (line 1): must be at least 1"),
        ("upstreams: [{name: a, base_url: 'http://x', timeouts: {idle_s: -1}}]", "upstreams[0].timeouts.idle_s (line 1)"),
        ("server: {log_format: xml}", "server.log_format must be one of text, json"),
    ],
)
def test_out_of_range_values_are_errors_naming_key_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, {}, source="proxy.yaml")
    assert str(err.value).startswith("proxy.yaml: ") and message in str(err.value)


@pytest.mark.fast
def test_prices_and_weights_must_not_be_negative() -> None:
    base = "upstreams: [{name: a, base_url: 'http://x'}]\nmodels:\n  - {name: m, routes: [{upstream: a, model: m%s}]%s}\n"
    with pytest.raises(ConfigError, match=r"models\[0\]\.routes\[0\]\.weight \(line 3\): must be greater than 0"):
        parse_config(base % (", weight: -1", ""), {})
    with pytest.raises(ConfigError, match=r"models\[0\]\.price\.output_per_mtok \(line 3\): must be at least 0"):
        parse_config(base % ("", ", price: {output_per_mtok: -2}"), {})


def test_an_unset_variable_without_default_names_itself_the_file_and_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text('server:\n  port: 8080\nstorage:\n  url: "${MY_DB_URL}"\n')
    done = _cli(tmp_path, "check-config", "--config", str(cfg))
    assert done.returncode == 2 and not done.stdout
    assert f"{cfg}: storage.url (line 4): the environment variable MY_DB_URL is not set" in done.stderr
    # Set (even to empty) it is a value; with a default the default applies.
    assert parse_config('storage: {spool_path: "${X}"}', {"X": "/s"}).storage.spool_path == "/s"
    assert parse_config('storage: {spool_path: "${X:-/d}"}', {}).storage.spool_path == "/d"
    assert parse_config('auth: {master_key: "${X}"}', {"X": ""}).auth.master_key is None


def test_cli_port_and_workers_are_range_checked(tmp_path: Path) -> None:
    for args in (["--port", "99999"], ["--workers", "0"], ["--port", "eighty"]):
        done = _cli(tmp_path, "serve", *args)
        assert done.returncode == 2 and ("--port" in done.stderr or "--workers" in done.stderr), done.stderr


@pytest.mark.fast
def test_a_list_of_strings_may_come_from_one_variable() -> None:
    cfg = parse_config('server: {trusted_proxies: "${TP:-}"}', {"TP": "10.0.0.0/8, 127.0.0.1"})
    assert cfg.server.trusted_proxies == ("10.0.0.0/8", "127.0.0.1")
    assert parse_config('server: {trusted_proxies: "${TP:-}"}', {}).server.trusted_proxies == ()


# ---------------------------------------------------------------------- logs and auth messages


async def test_revoked_and_expired_keys_are_told_which_unknown_stays_generic(gateway: Any) -> None:
    gw = await gateway()
    expired = await gw.create_key("expired", expires_at=time.time() - 1)
    revoked = await gw.create_key("revoked")
    await gw.state.store.revoke_key("revoked")
    unknown = "sk-" + "A" * 43
    async with aiohttp.ClientSession() as s:

        async def answer(key: str, path: str = "/v1/chat/completions", **headers: str) -> tuple[int, Any]:
            async with s.post(gw.url + path, json=CHAT, headers={"Authorization": f"Bearer {key}", **headers}) as r:
                return r.status, await r.json()

        status, doc = await answer(expired)
        assert status == 401 and doc["error"]["code"] == "invalid_api_key" and "expired" in doc["error"]["message"]
        status, doc = await answer(revoked)
        assert status == 401 and doc["error"]["code"] == "invalid_api_key" and "revoked" in doc["error"]["message"]
        status, doc = await answer(unknown)
        assert status == 401 and doc["error"]["code"] == "invalid_api_key"
        assert "revoked" not in doc["error"]["message"] and "expired" not in doc["error"]["message"]
        # Same in the other dialects: their own 401 shape, the same words.
        status, doc = await answer(revoked, "/v1/messages", **{"anthropic-version": "2023-06-01"})
        assert status == 401 and doc["type"] == "error" and "revoked" in doc["error"]["message"]


async def test_a_store_outage_logs_one_line_when_it_starts_and_one_when_it_ends(gateway: Any, caplog: Any, monkeypatch: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="llm_proxy")
    gw = await gateway()
    store = gw.state.store
    real_lookup, real_write = store.key_by_digest, store.write_usage

    async def down(*_args: Any) -> Any:
        raise StoreError("sqlite store: key lookup failed (SQLITE_IOERR)")

    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=CHAT, headers=gw.headers()) as r:
            assert r.status == 200  # the key is cached now
        await gw.wait_records(1)
        monkeypatch.setattr(store, "key_by_digest", down)
        monkeypatch.setattr(store, "write_usage", down)
        for i in range(8):  # unknown keys during the outage: each lookup fails
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer sk-{i:043d}"}) as r:
                assert r.status == 503
        for _ in range(3):  # a known key keeps working; its records go to the spool
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT, headers=gw.headers()) as r:
                assert r.status == 200
        for _ in range(3):
            await gw.state.sink.flush()
            gw.state.sink._retry_at = 0.0  # retry at once rather than after the backoff
        monkeypatch.setattr(store, "key_by_digest", real_lookup)
        monkeypatch.setattr(store, "write_usage", real_write)
        async with s.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-" + "B" * 43}) as r:
            assert r.status == 401
    await gw.wait_records(4)
    above_debug = [r for r in caplog.records if r.levelno > logging.DEBUG and r.name in ("llm_proxy.auth", "llm_proxy.usage")]
    messages = [r.getMessage() for r in above_debug]
    for what in ("key store", "usage store"):
        lines = [m for m in messages if m.startswith(what)]
        assert len(lines) == 2, lines
        assert lines[0].startswith(f"{what} unavailable (StoreError): ")
        assert lines[1].startswith(f"{what} available again after ") and "failed attempts" in lines[1]
    assert not [r for r in caplog.records if r.exc_info], "an outage logged a traceback"
    assert "SQLITE_IOERR" not in caplog.text


async def test_an_aborted_stream_has_its_key_name_on_its_access_line(gateway: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    gw = await gateway()
    events = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hello"}}]}\n\n'] * 50
    gw.upstream.script(Reply(chunks=events, delay_s=0.05))
    async with aiohttp.ClientSession() as s:
        r = await s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=gw.headers())
        await r.content.readany()
        r.close()
    await asyncio.wait_for(gw.upstream.closed_early.wait(), 1.5)
    recs = await gw.wait_records(1)
    assert recs[0].outcome == "client_abort"
    for _ in range(100):  # the handler finishes after the upstream closed: poll for its line
        gw.running.access_log.flush()
        if "/v1/chat/completions" in caplog.text:
            break
        await asyncio.sleep(0.02)
    lines = [line for line in caplog.text.splitlines() if "/v1/chat/completions" in line]
    assert len(lines) == 1 and "key=test-key " in lines[0], lines


# ---------------------------------------------------------------------- /metrics with workers


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _total(text: str, name: str, **labels: str) -> float:
    return sum(v for k, v in _samples(text, name).items() if set(labels.items()) <= set(k))


async def test_one_scrape_sums_every_worker(gateway: Any, tmp_path: Path) -> None:
    """Two gateways as two workers of one service: whichever gets the scrape reports
    both workers' calls; flags merge by minimum, the shared spool's size by maximum."""
    from proxy.worker_metrics import WorkerMetrics

    sockets = tmp_path / "m"
    sockets.mkdir(mode=0o700)
    from proxy.config import StorageConfig

    second = StorageConfig(url=f"sqlite:///{tmp_path}/b.db", spool_path=str(tmp_path / "b-spool.jsonl"), flush_interval_s=0.05)
    a, b = await gateway(), await gateway(storage=second)
    for i, gw in enumerate((a, b)):
        peer = WorkerMetrics(sockets, i, 2)
        await peer.start(lambda gw=gw: gw.state.metrics.render(gw.state)[0])
        gw.state.worker_metrics = peer
    try:
        async with aiohttp.ClientSession() as s:
            for gw, n in ((a, 3), (b, 2)):
                for _ in range(n):
                    async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "mock-gpt"}, headers=gw.headers()) as r:
                        assert r.status == 200
            await a.wait_records(3)
            await b.wait_records(2)
            b.state.sink._store_ok = False  # one worker's store writes failing: not all is well
            for gw in (a, b):
                async with s.get(gw.url + "/metrics") as r:
                    text = await r.text()
                assert _total(text, "llm_proxy_requests_total", model="mock-gpt") == 5
                assert _total(text, "llm_proxy_request_duration_seconds_count") == 5
                assert _total(text, "llm_proxy_workers") == 2 and _total(text, "llm_proxy_workers_scraped") == 2
                assert _total(text, "llm_proxy_usage_store_ok") == 0 and _total(text, "llm_proxy_usage_accepting") == 1
            b.state.sink._store_ok = True
            # A sibling that is gone is left out, and the scrape says so.
            b.state.worker_metrics.close()
            async with s.get(a.url + "/metrics") as r:
                text = await r.text()
            assert _total(text, "llm_proxy_requests_total") == 3 and _total(text, "llm_proxy_workers_scraped") == 1
    finally:
        for gw in (a, b):
            gw.state.worker_metrics.close()


async def test_serve_with_two_workers_reports_the_whole_service(tmp_path: Path) -> None:
    from _gateway import free_port

    port = free_port()
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        f"""server: {{host: 127.0.0.1, port: {port}, workers: 2, shutdown_grace_s: 2}}
storage: {{url: "sqlite:///gw.db", spool_path: spool.jsonl, flush_interval_s: 0.05}}
upstreams: [{{name: mock, protocol: openai, base_url: "mock://"}}]
models: [{{name: demo, routes: [{{upstream: mock, model: mock-gpt}}]}}]
"""
    )
    made = _cli(tmp_path, "keys", "create", "--name", "w", "--json", "--config", str(cfg))
    assert made.returncode == 0, made.stderr
    key = orjson.loads(made.stdout)["key"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(cfg)], cwd=REPO, env=_env(),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while b"2 workers serving" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        n = 10
        # A fresh connection per request: the kernel spreads them over the two workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(n):
                async with s.post(url + "/v1/chat/completions", json={**CHAT, "model": "demo"}, headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200
            for _ in range(6):  # whichever worker answers the scrape
                while True:
                    async with s.get(url + "/metrics") as r:
                        text = await r.text()
                    if _total(text, "llm_proxy_requests_total") >= n or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)  # a record is counted as its handler ends, after the response
                assert _total(text, "llm_proxy_requests_total", model="demo") == n, text
                assert _total(text, "llm_proxy_workers") == 2 and _total(text, "llm_proxy_workers_scraped") == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output = log.read_text()
    assert f"config {cfg}; keys and usage in SQLite {tmp_path / 'gw.db'}; usage spool {tmp_path / 'spool.jsonl'}" in output
    assert proc.returncode == 0, output


# ---------------------------------------------------------------------- out of the box for agents

# What the agents ask for when left at their defaults (and their documented shorthands).
CLAUDE_CODE = ("sonnet", "opus", "haiku", "claude-sonnet-4-6", "claude-opus-4-7", "claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929")
CODEX = ("gpt-5.5", "gpt-5.4", "gpt-5.3-codex", "gpt-5.2-codex")
GEMINI_CLI = ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-3-pro-preview", "gemini-3-flash-preview")


async def test_the_default_config_serves_what_claude_code_codex_and_gemini_cli_ask_for(tmp_path: Path) -> None:
    """config/proxy.yaml with the three provider keys set (the providers played by the
    built-in mock): each agent's default model names answer 200 on the agent's own API."""
    import dataclasses

    from aiohttp import web

    from proxy.mock_upstream import build_mock_app
    from proxy.server import Running

    keys = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a", "GEMINI_API_KEY": "g-k"}
    cfg = load_config(REPO / "config" / "proxy.yaml", env={**keys, "LLM_PROXY_STATE_DIR": str(tmp_path)})
    for shipped in (REPO / "config" / "production.yaml", REPO / "proxy" / "default_config.yaml"):
        other = load_config(shipped, env={**keys, "LLM_PROXY_STORAGE_URL": "sqlite:///x.db", "LLM_PROXY_LIMITS_URL": "memory://"})
        assert {m.name for m in cfg.models} - {m.name for m in other.models} <= {"demo", "demo-embedding", "demo-claude", "demo-gemini"}
    mock = web.AppRunner(build_mock_app(), access_log=None)
    await mock.setup()
    site = web.TCPSite(mock, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{mock.addresses[0][1]}"
    real = {"openai": base + "/v1", "anthropic": base, "gemini": base}
    cfg = dataclasses.replace(
        cfg, upstreams=tuple(dataclasses.replace(u, base_url=real.get(u.name, u.base_url)) for u in cfg.upstreams)
    )
    running = await Running.start(cfg, "127.0.0.1", 0)
    try:
        _, key = await running.gateway.store.create_key("agent", KeyLimits())
        assert running.gateway.router.skipped == []  # every model has its provider's key
        url = f"http://127.0.0.1:{running.port}"
        hi = [{"role": "user", "content": "hi"}]
        async with aiohttp.ClientSession() as s:
            for model in CLAUDE_CODE:
                async with s.post(url + "/v1/messages?beta=true", json={"model": model, "max_tokens": 16, "stream": True, "messages": hi},
                                  headers={"x-api-key": key, "anthropic-version": "2023-06-01"}) as r:
                    assert r.status == 200, (model, await r.text())
                    assert b"message_stop" in await r.read()
            for model in CODEX:
                async with s.post(url + "/v1/responses", json={"model": model, "input": "hi", "stream": True},
                                  headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200, (model, await r.text())
                    assert b"response.completed" in await r.read()
            for model in GEMINI_CLI:
                async with s.post(url + f"/v1beta/models/{model}:streamGenerateContent?alt=sse",
                                  json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, headers={"x-goog-api-key": key}) as r:
                    assert r.status == 200, (model, await r.text())
                    assert b"finishReason" in await r.read()
            # Every alias is listed under its own name for clients that pick from /v1/models.
            async with s.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                listed = {m["id"] for m in (await r.json())["data"]}
            assert set(CLAUDE_CODE + CODEX + GEMINI_CLI) <= listed
        records = []
        for _ in range(100):
            await running.gateway.sink.flush()
            records = await running.gateway.store.list_usage(0.0)
            if len(records) >= len(CLAUDE_CODE + CODEX + GEMINI_CLI):
                break
            await asyncio.sleep(0.02)
        # Recorded under the name the client used, priced at the model's price.
        assert {r.model for r in records} == set(CLAUDE_CODE + CODEX + GEMINI_CLI)
        assert all(r.cost_usd > 0 for r in records)
    finally:
        await running.close()
        await mock.cleanup()


@pytest.mark.fast
def test_aliases_are_models_of_their_own_and_must_be_unique() -> None:
    text = """upstreams: [{name: a, base_url: 'http://x'}]
models:
  - {name: big, aliases: [b, big-2026], routes: [{upstream: a, model: big-v2}], price: {input_per_mtok: 2}}
  - {name: small, routes: [{upstream: a, model: small}], fallbacks: [b]}
"""
    cfg = parse_config(text, {})
    assert [m.name for m in cfg.models] == ["big", "b", "big-2026", "small"]
    alias = cfg.models[1]
    assert alias.routes == cfg.models[0].routes and alias.price.input_per_mtok == 2 and alias.aliases == ()
    with pytest.raises(ConfigError, match="model names and aliases must be unique: small"):
        parse_config(text.replace("[b, big-2026]", "[b, small]"), {})


# ---------------------------------------------------------------------- native TLS


def _served_cert(port: int, ca: Path) -> bytes:
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


async def test_native_tls_serves_https_and_reloads_its_certificate(tmp_path: Path) -> None:
    """server.tls: model calls (plain and streamed) and relayed routes over HTTPS; a config
    reload (what SIGHUP and /admin/reload run) serves a renewed certificate found at the
    same paths to new connections; a pair that does not load changes nothing."""
    import ssl

    from _tls import make_cert
    from proxy.config import TlsConfig
    from proxy.server import Running

    live, one, two = tmp_path / "live", tmp_path / "one", tmp_path / "two"
    for d in (live, one, two):
        d.mkdir()
    cert, key = make_cert(one)
    cert2, key2 = make_cert(two)
    shutil.copy(cert, live / "cert.pem")
    shutil.copy(key, live / "key.pem")
    cfg_path = tmp_path / "proxy.yaml"
    cfg_path.write_text(
        """server: {tls: {cert_file: live/cert.pem, key_file: live/key.pem}, shutdown_grace_s: 1}
storage: {state_dir: state}
upstreams: [{name: mock, protocol: openai, base_url: "mock://"}]
models: [{name: demo, routes: [{upstream: mock, model: mock-gpt}]}]
"""
    )
    config = load_config(cfg_path, env={})
    assert config.server.tls == TlsConfig(str(live / "cert.pem"), str(live / "key.pem"))
    running = await Running.start(config, "127.0.0.1", 0, config_path=str(cfg_path))
    try:
        _, api_key = await running.gateway.store.create_key("tls", KeyLimits())
        auth = {"Authorization": f"Bearer {api_key}"}
        url = f"https://127.0.0.1:{running.port}"
        trust = ssl.create_default_context(cafile=str(cert))
        chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as s:
            async with s.post(url + "/v1/chat/completions", json=chat, headers=auth) as r:
                assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]
            async with s.post(url + "/v1/chat/completions", json={**chat, "stream": True}, headers=auth) as r:
                assert r.status == 200 and (await r.read()).rstrip().endswith(b"data: [DONE]")
            async with s.get(url + "/v1/models", headers=auth) as r:  # relayed to the control plane
                assert r.status == 200 and (await r.json())["data"]
        # Plain HTTP on the TLS port is refused, not served.
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{running.port}/healthz") as r:
                    await r.read()
        before = await asyncio.to_thread(_served_cert, running.port, cert)
        # Renewed in place (as certbot or an ACME client does), then a reload.
        shutil.copy(cert2, live / "cert.pem")
        shutil.copy(key2, live / "key.pem")
        assert running.gateway.reloader is not None
        assert (await running.gateway.reloader.reload()).ok
        after = await asyncio.to_thread(_served_cert, running.port, cert2)
        assert after != before
        # A key that does not match its certificate: an error, and the served one stays.
        shutil.copy(cert, live / "cert.pem")
        with pytest.raises(ssl.SSLError):
            running.reload_tls(config)
        assert (await running.gateway.reloader.reload()).ok  # the rest of the reload still applies
        assert await asyncio.to_thread(_served_cert, running.port, cert2) == after
    finally:
        await running.close()


@pytest.mark.fast
def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("server: {tls: {cert_file: certs/c.pem, key_file: /abs/k.pem}}\n")
    tls = load_config(cfg, env={}).server.tls
    assert tls is not None and (tls.cert_file, tls.key_file) == (str(tmp_path / "certs" / "c.pem"), "/abs/k.pem")
    with pytest.raises(ConfigError, match=r"server\.tls \(line 1\): missing required key 'key_file'"):
        parse_config("server: {tls: {cert_file: c.pem}}", {})


async def test_relayed_requests_name_their_key_too_and_the_relay_header_stays_inside(gateway: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.access")
    gw = await gateway()
    named = await gw.create_key("équipe α")  # any printable name travels intact
    async with aiohttp.ClientSession() as s:
        for key in (gw.key, named):
            async with s.get(gw.url + "/v1/models", headers=gw.headers(key)) as r:
                assert r.status == 200
                assert not [h for h in r.headers if h.lower().startswith("x-llm-proxy")]
        async with s.get(gw.url + "/healthz") as r:
            assert r.status == 200
    gw.running.access_log.flush()
    lines = [line for line in caplog.text.splitlines() if '"GET /' in line]
    assert "key=test-key " in lines[0] and "key=équipe α " in lines[1] and "key=- " in lines[2], lines


@pytest.mark.fast
def test_the_compose_https_front_is_an_opt_in_profile_the_gateway_trusts() -> None:
    """deploy/container: Caddy only under `--profile tls`, proxying to the gateway without
    buffering streams, at the one fixed address the gateway takes X-Forwarded-For from."""
    import ipaddress

    import yaml

    compose_dir = REPO / "deploy" / "container"
    doc = yaml.safe_load((compose_dir / "compose.yaml").read_text())
    caddy, gateway = doc["services"]["caddy"], doc["services"]["llm-proxy"]
    assert caddy["profiles"] == ["tls"] and all("profiles" not in s for n, s in doc["services"].items() if n != "caddy")
    address = caddy["networks"]["default"]["ipv4_address"]
    subnet = doc["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    trusted = gateway["environment"]["LLM_PROXY_TRUSTED_PROXIES"]
    assert trusted == address
    cfg = load_config(REPO / "config" / "production.yaml", env={
        "LLM_PROXY_STORAGE_URL": "postgresql://u:p@db/x", "LLM_PROXY_LIMITS_URL": "redis://r:6379/0",
        "LLM_PROXY_TRUSTED_PROXIES": trusted,
    })
    assert cfg.server.trusted_proxies == (address,) and cfg.server.tls is None
    caddyfile = (compose_dir / caddy["volumes"][0].split(":")[0]).read_text()
    assert "reverse_proxy llm-proxy:8080" in caddyfile and "flush_interval -1" in caddyfile
    assert "{$LLM_PROXY_DOMAIN}" in caddyfile and "LLM_PROXY_DOMAIN" in caddy["environment"]
    assert {"caddy-data", "caddy-config"} <= set(doc["volumes"])


def test_check_config_loads_the_tls_files(tmp_path: Path) -> None:
    from _tls import make_cert

    cert, key = make_cert(tmp_path)
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"server: {{tls: {{cert_file: {cert.name}, key_file: {key.name}}}}}\n")
    assert _cli(tmp_path, "check-config", "--config", str(cfg)).returncode == 0
    cfg.write_text(f"server: {{tls: {{cert_file: {cert.name}, key_file: missing.pem}}}}\n")
    done = _cli(tmp_path, "check-config", "--config", str(cfg))
    assert done.returncode == 2 and not done.stdout
    assert "server.tls: cannot load the certificate and key" in done.stderr
