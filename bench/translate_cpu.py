"""CPU per request of a translated call against the same-dialect call, side by side.

    python -m bench.translate_cpu [--requests 400] [--concurrency 8]

One gateway process (the real `llm-proxy serve`, SQLite usage, access log on) in front
of the mock provider (`llm-proxy mock-upstream`, another process). The same OpenAI-chat
model is called by an OpenAI chat client (the byte-exact path) and by an Anthropic
Messages client (translated both ways), streamed and not, in alternating rounds so that
machine drift hits both alike. The gateway's own CPU time (utime + stime from /proc) is
divided by the requests of each round. A rough figure: the load generator shares the
machine; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

CONFIG = """
server: {{host: 127.0.0.1, port: {port}, workers: 1}}
auth: {{master_key: "bench-master-key-0123456789"}}
storage: {{url: "sqlite:///{data}/gw.db", spool_path: "{data}/spool.jsonl"}}
upstreams:
  - {{name: mock, protocol: openai, base_url: "http://127.0.0.1:{mock}/v1", api_key: k}}
models:
  - {{name: m, routes: [{{upstream: mock, model: mock-gpt}}]}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def _request(kind: str, stream: bool) -> tuple[str, bytes]:
    prompt = [{"role": "user", "content": "Say hello in a few words."}]
    if kind == "same":
        return "/v1/chat/completions", orjson.dumps({"model": "m", "messages": prompt, "stream": stream})
    return "/v1/messages", orjson.dumps({"model": "m", "max_tokens": 64, "messages": prompt, "stream": stream})


async def _round(base: str, key: str, pid: int, kind: str, stream: bool, n: int, conc: int) -> float:
    path, body = _request(kind, stream)
    headers = {"Authorization": f"Bearer {key}", "x-api-key": key, "Content-Type": "application/json"}
    queue = list(range(n))
    async with aiohttp.ClientSession() as s:
        async def worker() -> None:
            while queue:
                queue.pop()
                async with s.post(base + path, data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
        before = _cpu_s(pid)
        await asyncio.gather(*(worker() for _ in range(conc)))
        return (_cpu_s(pid) - before) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="translate-cpu-"))
    mock_port, port = _free_port(), _free_port()
    cfg = data / "proxy.yaml"
    cfg.write_text(CONFIG.format(port=port, data=data, mock=mock_port))
    py = sys.executable
    mock = subprocess.Popen([py, "-m", "proxy", "mock-upstream", "--port", str(mock_port)], stderr=subprocess.DEVNULL)
    gw = subprocess.Popen([py, "-m", "proxy", "serve", "--config", str(cfg)], stderr=subprocess.DEVNULL)
    try:
        await _wait_up(f"http://127.0.0.1:{port}/healthz")
        created = subprocess.run([py, "-m", "proxy", "keys", "create", "--name", "bench", "--json", "--config", str(cfg)],
                                 check=True, capture_output=True)
        key = orjson.loads(created.stdout)["key"]
        base = f"http://127.0.0.1:{port}"
        results: dict[tuple[str, bool], list[float]] = {}
        for stream in (False, True):
            for kind in ("same", "translated"):
                await _round(base, key, gw.pid, kind, stream, 50, args.concurrency)   # warm-up
        for _ in range(args.rounds):
            for stream in (False, True):
                for kind in ("same", "translated"):
                    us = await _round(base, key, gw.pid, kind, stream, args.requests, args.concurrency)
                    results.setdefault((kind, stream), []).append(us)
        for stream in (False, True):
            same = statistics.median(results[("same", stream)])
            translated = statistics.median(results[("translated", stream)])
            label = "stream    " if stream else "non-stream"
            print(f"{label}  same-dialect {same:7.0f} us/request   Anthropic->chat translated {translated:7.0f} us/request"
                  f"   ratio {translated / same:.2f}x")
    finally:
        for proc in (gw, mock):
            proc.terminate()
        for proc in (gw, mock):
            proc.wait(timeout=10)
        time.sleep(0)


if __name__ == "__main__":
    asyncio.run(main())
