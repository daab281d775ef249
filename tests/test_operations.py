"""Day-two operations (issue 26): which files every command uses, config mistakes that
must not pass, logs an operator can use, and what the caller of a dead key is told.

CLI checks run the real entry point (`python -m proxy`) in subprocesses; log checks run
a real gateway (tests/_gateway.py) and read what its loggers wrote.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
from proxy.store.base import StoreError

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
