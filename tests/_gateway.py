"""Test harness: a real gateway on a loopback port in front of real upstream servers.

- `ScriptedUpstream`: an aiohttp server whose next answers the test scripts (status,
  headers, body chunks with pauses, abrupt cuts, hangs) and which counts what it got.
- `gateway`: a factory fixture that starts the gateway (SQLite store in tmp_path,
  in-memory limits, handler cancellation as in production) in front of the scripted
  upstream and the built-in mock provider, creates a client key, and stops it all.

After every test that used the gateway, the billing invariant is checked: the usage
store holds exactly one record per request an upstream received.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from proxy.config import (
    AuthConfig,
    Config,
    LimitsConfig,
    ModelConfig,
    Price,
    RouteConfig,
    ServerConfig,
    StorageConfig,
    Timeouts,
    UpstreamConfig,
)
from proxy.mock_upstream import MockOptions, build_mock_app
from proxy.server import Running
from proxy.store.base import KeyLimits, UsageRecord

UPSTREAM_KEY = "sk-upstream-CANARY-7f3e9a1c2b4d6e8f"
MASTER_KEY = "master-CANARY-0c1d2e3f4a5b6c7d8e9f"
PRICE = Price(input_per_mtok=1.0, output_per_mtok=2.0, cached_input_per_mtok=0.5)

__all__ = ["Gateway", "MASTER_KEY", "PRICE", "Reply", "ScriptedUpstream", "UPSTREAM_KEY", "gateway", "scripted_upstream"]


@dataclass
class Reply:
    """One scripted upstream answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    chunks: list[bytes] = field(default_factory=list)
    delay_s: float = 0.0           # pause before each chunk after the first
    ttfb_s: float = 0.0            # pause before the headers
    cut_after: int | None = None   # close the connection abruptly after this many chunks
    hang_after: int | None = None  # stop sending (but keep the connection) after this many chunks
    wait_for: asyncio.Event | None = None  # chunks after the first wait for this event, one set per chunk


@dataclass
class Received:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class ScriptedUpstream:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.default = Reply(headers={"Content-Type": "application/json"}, chunks=[b'{"ok":true}'])
        self.received: list[Received] = []
        self.closed_early = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, request.query_string, dict(request.headers), body))
        reply = self.replies.pop(0) if self.replies else self.default
        if reply.ttfb_s:
            await asyncio.sleep(reply.ttfb_s)
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        await resp.prepare(request)
        try:
            for i, chunk in enumerate(reply.chunks):
                if reply.cut_after is not None and i >= reply.cut_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if reply.hang_after is not None and i >= reply.hang_after:
                    await asyncio.sleep(3600)
                if i and reply.wait_for is not None:
                    await reply.wait_for.wait()
                    reply.wait_for.clear()
                elif i and reply.delay_s:
                    await asyncio.sleep(reply.delay_s)
                await resp.write(chunk)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.closed_early.set()
            raise
        return resp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_config(tmp: Path, upstream_base: str, mock_base: str, **overrides: Any) -> Config:
    """Models: `up-*` go to the scripted upstream, `mock-*` to the mock provider."""
    timeouts = overrides.pop("timeouts", Timeouts(connect_s=2, first_byte_s=5, idle_s=5))
    ups = (
        UpstreamConfig("up", upstream_base + "/v1", "openai", UPSTREAM_KEY, timeouts),
        UpstreamConfig("up-anthropic", upstream_base, "anthropic", UPSTREAM_KEY, timeouts),
        UpstreamConfig("up-gemini", upstream_base, "gemini", UPSTREAM_KEY, timeouts),
        UpstreamConfig("mock", mock_base + "/v1", "openai", "mock-key", timeouts),
        UpstreamConfig("mock-anthropic", mock_base, "anthropic", "mock-key", timeouts),
        UpstreamConfig("mock-gemini", mock_base, "gemini", "mock-key", timeouts),
        UpstreamConfig("dead", "http://127.0.0.1:9/v1", "openai", "dead-key", timeouts),
        # Chat-only servers (vLLM, Ollama...): Responses calls are translated onto chat.
        UpstreamConfig("up-chatonly", upstream_base + "/v1", "openai", UPSTREAM_KEY, timeouts, responses=False),
        UpstreamConfig("mock-chatonly", mock_base + "/v1", "openai", "mock-key", timeouts, responses=False),
    )

    def model(name: str, upstream: str, target: str, fallbacks: tuple[str, ...] = ()) -> ModelConfig:
        return ModelConfig(name, (RouteConfig(upstream, target),), fallbacks, PRICE)

    models = (
        model("up-gpt", "up", "gpt-4o-2024-08-06"),
        model("up-claude", "up-anthropic", "claude-sonnet-4-5"),
        model("up-gemini", "up-gemini", "gemini-2.5-flash"),
        model("mock-gpt", "mock", "mock-gpt"),
        model("mock-claude", "mock-anthropic", "mock-claude"),
        model("mock-gemini", "mock-gemini", "mock-gemini"),
        model("dead-gpt", "dead", "gpt-dead"),
        model("dead-then-mock", "dead", "gpt-dead", ("mock-gpt",)),
        model("up-chatonly", "up-chatonly", "local-model"),
        model("mock-chatonly", "mock-chatonly", "mock-gpt"),
    )
    base = Config(
        server=ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=2, stream_keepalive_s=15),
        # The brute-force brake is off here: many tests send bad keys on purpose; it has
        # its own tests (test_keys_auth.py, B6).
        auth=AuthConfig(master_key=MASTER_KEY, max_failures_per_min=0),
        storage=StorageConfig(url=f"sqlite:///{tmp}/gw.db", spool_path=str(tmp / "spool.jsonl"), flush_interval_s=0.05),
        limits=LimitsConfig(url="memory://"),
        upstreams=ups,
        models=models,
    )
    return dataclasses.replace(base, **overrides)


class Gateway:
    def __init__(self, running: Running, upstream: ScriptedUpstream, mock_stats: Any) -> None:
        self.running = running
        self.app = running.gateway.control_app
        self.upstream = upstream
        self.mock_stats = mock_stats
        self.key = ""
        self.url = ""
        # Checked at teardown: one usage record per request the scripted upstream got.
        self.audit = True

    @property
    def state(self) -> Any:
        return self.running.gateway

    async def create_key(self, name: str, **limits: Any) -> str:
        _, key = await self.state.store.create_key(name, KeyLimits(**limits))
        return key

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def records(self) -> list[UsageRecord]:
        await self.state.sink.flush()
        return await self.state.store.list_usage(0.0)

    async def wait_records(self, n: int, timeout: float = 5.0) -> list[UsageRecord]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            recs = await self.records()
            if len(recs) >= n or asyncio.get_running_loop().time() > deadline:
                return recs
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.running.close()


async def _start_gateway(config: Config, upstream: ScriptedUpstream, mock_stats: Any) -> Gateway:
    running = await Running.start(config, "127.0.0.1", 0)
    gw = Gateway(running, upstream, mock_stats)
    gw.url = f"http://127.0.0.1:{running.port}"
    gw.key = await gw.create_key("test-key")
    return gw


@pytest.fixture
async def scripted_upstream() -> AsyncIterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def gateway(
    tmp_path: Path, scripted_upstream: ScriptedUpstream
) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """`gw = await gateway(**config_overrides)`; stopped (and audited) after the test."""
    mock_app = build_mock_app(MockOptions())
    mock_runner = web.AppRunner(mock_app, access_log=None, handler_cancellation=True)
    await mock_runner.setup()
    await web.TCPSite(mock_runner, "127.0.0.1", 0).start()
    mock_base = f"http://127.0.0.1:{mock_runner.addresses[0][1]}"
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        cfg = test_config(tmp_path, scripted_upstream.base, mock_base, **overrides)
        gw = await _start_gateway(cfg, scripted_upstream, mock_app)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        if gw.audit:
            await _audit(gw)
        await gw.stop()
    await mock_runner.cleanup()


async def _audit(gw: Gateway) -> None:
    """Billing invariant: records for the scripted upstreams == requests they received."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while gw.state.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    scripted = [r for r in await gw.records() if r.upstream.startswith("up")]
    assert len(scripted) == len(gw.upstream.received), (
        f"{len(gw.upstream.received)} upstream requests ({[r.path for r in gw.upstream.received]}) "
        f"but {len(scripted)} usage records: {scripted}"
    )
    ids = [r.id for r in await gw.records()]
    assert len(ids) == len(set(ids))


async def read_all(resp: aiohttp.ClientResponse) -> bytes:
    return await resp.read()
