"""Issue 23: live configuration (and, at the end, two processes sharing a cooldown through
Redis). A real `llm-proxy serve` process, reloaded by SIGHUP,
POST /admin/reload and `llm-proxy reload`: in-flight requests finish on the old config,
new ones use the new; a broken file changes nothing and its error is logged and returned;
with --workers N every worker reloads."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import orjson
import pytest

from _gateway import Reply, ScriptedUpstream, free_port
from proxy.store import open_store
from proxy.store.base import KeyLimits

ROOT = Path(__file__).resolve().parent.parent
MASTER = "master-reload-CANARY-5e6f7a8b9c0d"
OLD_KEY = "sk-old-CANARY-1a2b3c4d5e6f7a8b"
NEW_KEY = "sk-new-CANARY-9f8e7d6c5b4a3f2e"
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
JSON = {"Content-Type": "application/json"}


def _config(port: int, db: Path, upstream: ScriptedUpstream, key: str, grace_s: float = 5, extra: str = "") -> str:
    return f"""
server: {{host: 127.0.0.1, port: {port}, shutdown_grace_s: {grace_s}, access_log: false}}
auth: {{master_key: "{MASTER}"}}
storage: {{url: "sqlite:///{db}", spool_path: "{db.parent / 'spool.jsonl'}", flush_interval_s: 0.05}}
upstreams:
  - {{name: up, protocol: openai, base_url: "{upstream.base}/v1", api_key: "{key}"}}
models:
  - {{name: gpt, routes: [{{upstream: up, model: gpt-x}}], price: {{input_per_mtok: 1, output_per_mtok: 2}}}}
{extra}"""


class Proc:
    def __init__(self, tmp: Path, workers: int = 1) -> None:
        self.tmp, self.workers = tmp, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = tmp / "gw.db"
        self.config = tmp / "proxy.yaml"
        self.proc: asyncio.subprocess.Process | None = None
        self.key = ""

    def write(self, upstream: ScriptedUpstream, key: str, **kw: Any) -> None:
        self.config.write_text(_config(self.port, self.db, upstream, key, **kw))

    async def start(self) -> None:
        store = open_store(f"sqlite:///{self.db}")
        await store.open()
        try:
            _, self.key = await store.create_key("reload-key", KeyLimits())
        finally:
            await store.close()
        env = {**os.environ, "LLM_PROXY_LOG_LEVEL": "INFO"}
        env.pop("LLM_PROXY_CONFIG", None)
        with open(self.tmp / "gateway.log", "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--config", str(self.config), "--workers", str(self.workers),
                cwd=ROOT, env=env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            )
        await self.until(lambda: self.log().count("listening on") >= self.workers, 30)

    def log(self) -> str:
        try:
            return (self.tmp / "gateway.log").read_text(errors="replace")
        except OSError:
            return ""

    async def until(self, pred: Any, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert self.proc is None or self.proc.returncode is None, self.log()[-3000:]
            assert time.monotonic() < deadline, self.log()[-3000:]
            await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def proc(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Proc] = []

    def make(workers: int = 1) -> Proc:
        p = Proc(tmp_path, workers)
        made.append(p)
        return p

    yield make
    for p in made:
        await p.stop()


@pytest.fixture
async def second() -> AsyncIterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    await up.start()
    yield up
    await up.stop()


async def _call(s: aiohttp.ClientSession, gw: Proc) -> tuple[int, bytes]:
    body = {"model": "gpt", "messages": [{"role": "user", "content": "x"}]}
    async with s.post(gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gw.key}"}) as r:
        return r.status, await r.read()


async def test_sighup_reloads_while_a_stream_finishes_on_the_old_config(proc, scripted_upstream, second):
    gw = proc()
    gw.write(scripted_upstream, OLD_KEY)
    await gw.start()
    go = asyncio.Event()
    scripted_upstream.script(Reply(chunks=[CHUNK, CHUNK, CHUNK, b"data: [DONE]\n\n"], wait_for=go))
    second.default = Reply(headers=JSON, chunks=[b'{"id":"from-second","choices":[]}'])
    body = {"model": "gpt", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gw.key}"}) as r:
            assert r.status == 200
            first = await r.content.readany()
            gw.write(second, NEW_KEY)
            gw.signal(signal.SIGHUP)
            await gw.until(lambda: "config reloaded" in gw.log())
            # The next request takes the new upstream, with its new credential.
            status, answer = await _call(s, gw)
            assert status == 200 and b"from-second" in answer
            assert second.received[0].headers["Authorization"] == f"Bearer {NEW_KEY}"
            # The stream begun before the reload completes on the old upstream.
            rest = b""
            for _ in range(3):
                go.set()
                rest += await r.content.readany()
            rest += await r.content.read()
    assert (first + rest).endswith(b"data: [DONE]\n\n") and (first + rest).count(CHUNK) == 3
    assert len(scripted_upstream.received) == 1 and len(second.received) == 1
    line = next(x for x in gw.log().splitlines() if "config reloaded" in x)
    assert "upstreams ~up (base_url, api_key)" in line
    assert OLD_KEY not in gw.log() and NEW_KEY not in gw.log()
    assert gw.proc is not None and gw.proc.returncode is None   # SIGHUP no longer stops it


async def test_a_broken_file_changes_nothing_and_reports_its_error(proc, scripted_upstream):
    gw = proc()
    gw.write(scripted_upstream, OLD_KEY)
    await gw.start()
    good = gw.config.read_text()
    gw.config.write_text(good.replace("routes: [{upstream: up", "routes: [{upstream: nowhere"))
    gw.signal(signal.SIGHUP)
    await gw.until(lambda: "config not reloaded" in gw.log())
    assert "routes to unknown upstream 'nowhere'" in gw.log()
    async with aiohttp.ClientSession() as s:
        assert (await _call(s, gw))[0] == 200   # still serving, on the old config
        async with s.post(gw.url + "/admin/reload", headers={"Authorization": f"Bearer {MASTER}"}) as r:
            assert r.status == 400
            err = orjson.loads(await r.read())["error"]
            assert err["code"] == "invalid_config" and "unknown upstream 'nowhere'" in err["message"]
        cli = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy", "reload", "--config", str(gw.config)],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        # The CLI reads the same broken file for the address and master key it needs:
        # it says what is wrong with it, like check-config.
        assert cli.returncode == 2 and "unknown upstream 'nowhere'" in cli.stderr
        assert (await _call(s, gw))[0] == 200
    assert len(scripted_upstream.received) == 2


async def test_admin_and_cli_reload_report_changes_and_restart_only_settings(proc, scripted_upstream, second):
    gw = proc()
    gw.write(scripted_upstream, OLD_KEY)
    await gw.start()
    gw.write(second, OLD_KEY, grace_s=7, extra="limits: {default_max_tokens: 99}\n")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/admin/reload", headers={"Authorization": f"Bearer {MASTER}"}) as r:
            assert r.status == 200
            doc = orjson.loads(await r.read())
    assert doc["status"] == "reloaded"
    assert doc["changed"] == ["upstreams ~up (base_url)", "limits.default_max_tokens"]
    assert doc["restart_required"] == ["server.shutdown_grace_s"]
    cli = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", "reload", "--config", str(gw.config)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    assert "no changes" in cli.stdout and "server.shutdown_grace_s" in cli.stdout
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/admin/reload") as r:
            assert r.status == 401


async def test_every_worker_reloads(proc, scripted_upstream, second):
    gw = proc(workers=2)
    gw.write(scripted_upstream, OLD_KEY)
    await gw.start()
    second.default = Reply(headers=JSON, chunks=[b'{"id":"from-second","choices":[]}'])
    gw.write(second, NEW_KEY)
    gw.signal(signal.SIGHUP)   # to the parent: it tells each worker
    await gw.until(lambda: gw.log().count("config reloaded") >= 2)
    for _ in range(12):   # new connections: SO_REUSEPORT spreads them over both workers
        async with aiohttp.ClientSession() as s:
            assert await _call(s, gw) == (200, b'{"id":"from-second","choices":[]}')
    assert len(scripted_upstream.received) == 0 and len(second.received) == 12
    pids = {line.split("(pid ")[1].split(")")[0] for line in gw.log().splitlines() if "listening on" in line}
    assert len(pids) == 2
    # Through one worker's admin API: that worker reloads and has the parent reload all.
    scripted_upstream.default = Reply(headers=JSON, chunks=[b'{"id":"from-first","choices":[]}'])
    gw.write(scripted_upstream, OLD_KEY)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/admin/reload", headers={"Authorization": f"Bearer {MASTER}"}) as r:
            assert r.status == 200 and (await r.json())["changed"] == ["upstreams ~up (base_url, api_key)"]
    await gw.until(lambda: gw.log().count("config reloaded: upstreams") >= 4)
    for _ in range(12):
        async with aiohttp.ClientSession() as s:
            assert await _call(s, gw) == (200, b'{"id":"from-first","choices":[]}')
    assert len(scripted_upstream.received) == 12


async def test_two_gateway_processes_share_a_cooldown_through_redis(tmp_path, scripted_upstream, second, redis_server):
    """Process A sees `up` fail and cools it down in Redis; process B, which never called
    it, sends it nothing (its failover goes straight to `backup`)."""
    second.default = Reply(headers=JSON, chunks=[b'{"id":"from-second","choices":[]}'])
    scripted_upstream.script(Reply(status=500, headers=JSON, chunks=[b'{"error":{"message":"down"}}']))
    gws = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        gw = Proc(tmp_path / name)
        gw.config.write_text(f"""
server: {{host: 127.0.0.1, port: {gw.port}, shutdown_grace_s: 2, access_log: false}}
auth: {{master_key: "{MASTER}"}}
storage: {{url: "sqlite:///{gw.db}", spool_path: "{tmp_path / name / 'spool.jsonl'}", flush_interval_s: 0.05}}
limits: {{url: "{redis_server.url}"}}
routing: {{breaker: {{failures: 1, cooldown_s: 300}}, shared_sync_s: 0.1}}
upstreams:
  - {{name: up, protocol: openai, base_url: "{scripted_upstream.base}/v1", api_key: "{OLD_KEY}"}}
  - {{name: backup, protocol: openai, base_url: "{second.base}/v1", api_key: "{NEW_KEY}"}}
models:
  - {{name: gpt, routes: [{{upstream: up, model: gpt-x}}, {{upstream: backup, model: gpt-y, priority: 1}}]}}
""")
        gws.append(gw)
    a, b = gws
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession() as s:
            assert await _call(s, a) == (200, b'{"id":"from-second","choices":[]}')
            assert len(scripted_upstream.received) == 1
            # B reads the shared states every shared_sync_s (its gauge shows its own view).
            deadline = time.monotonic() + 10
            while True:
                async with s.get(b.url + "/metrics") as r:
                    if "llm_proxy_routes_in_cooldown 1.0" in await r.text():
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            for _ in range(5):
                assert await _call(s, b) == (200, b'{"id":"from-second","choices":[]}')
            async with s.get(b.url + "/admin/upstreams", headers={"Authorization": f"Bearer {MASTER}"}) as r:
                rows = {row["upstream"]: row for row in (await r.json())["data"]}
        assert len(scripted_upstream.received) == 1 and len(second.received) == 6
        assert rows["up"]["state"] == "cooldown" and rows["up"]["attempts"] == 0 and rows["backup"]["attempts"] == 5
    finally:
        await asyncio.gather(a.stop(), b.stop())
