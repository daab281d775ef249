"""`llm-proxy serve`: uvloop, an aiohttp AppRunner with explicit limits, graceful stop.

SIGTERM / SIGINT: stop accepting, /readyz turns 503, new requests on open
connections get 503, in-flight requests and streams may finish within
`shutdown_grace_s`; then the rest are cancelled (streams get a shutdown error
event), the usage sink flushes, stores close, and the process exits 0.

`--workers N` runs N such processes on one port (SO_REUSEPORT); the parent
forwards signals and exits 0 once every worker has drained.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time

import uvloop
from aiohttp import web

from proxy.access_log import AccessLogger
from proxy.app import STATE, build_app
from proxy.config import Config, load_config

log = logging.getLogger("llm_proxy.server")


def install_uvloop() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc.strerror)


async def serve(config: Config, host: str, port: int, *, reuse_port: bool = False, notify: bool = True) -> None:
    app = build_app(config)
    state = app[STATE]
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("llm_proxy.access") if config.server.access_log else None,
        keepalive_timeout=config.server.keepalive_s,
        shutdown_timeout=config.server.shutdown_grace_s,
        # A client that goes away cancels its handler at once: the upstream request is
        # closed promptly and the usage record is written in `finally`.
        handler_cancellation=True,
        max_headers=config.server.max_headers,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    log.info("llm-proxy listening on http://%s:%d", host, port)
    if notify:
        sd_notify("READY=1")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("stopping: draining %d requests (grace %.0fs)", state.in_flight, config.server.shutdown_grace_s)
    if notify:
        sd_notify("STOPPING=1")
    state.streams.stopping = True
    # aiohttp stops listening, waits up to shutdown_timeout for handlers, cancels the
    # rest (our streams write a shutdown error event then), then runs cleanup_ctx in
    # reverse: the usage sink flushes before stores close.
    await runner.cleanup()
    log.info("stopped")


def _worker(config_path: str | None, host: str, port: int) -> None:
    install_uvloop()
    configure_logging()
    asyncio.run(serve(load_config(config_path), host, port, reuse_port=True, notify=False))


def _wait_listening(host: str, port: int, procs: list[multiprocessing.process.BaseProcess], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not all(p.is_alive() for p in procs):
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def run(config: Config, config_path: str | None, host: str, port: int, workers: int) -> int:
    if workers <= 1:
        install_uvloop()
        asyncio.run(serve(config, host, port))
        return 0
    if config.limits.url.startswith("memory://"):
        log.warning("limits.url is memory://: rate limits and budgets are enforced per worker process (x%d)", workers)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(config_path, host, port), name=f"llm-proxy-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if _wait_listening(host, port, procs, 30):
        sd_notify("READY=1")
        log.info("%d workers serving on http://%s:%d", workers, host, port)
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    return 0 if all(c == 0 for c in codes) else 1


def configure_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("LLM_PROXY_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


__all__ = ["configure_logging", "run", "sd_notify", "serve"]
