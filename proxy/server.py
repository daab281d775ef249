"""`llm-proxy serve`: sockets, worker processes and signals around one gateway each.

The gateway itself (backends, both planes, the chains) is built in proxy/gateway.py;
this module listens, runs the front HTTP/1.1 server on the gateway's handler, and stops
gracefully.

SIGHUP: reload the config file (proxy/live_config.py); the server keeps serving.

SIGTERM / SIGINT: stop accepting, /readyz turns 503, idle keep-alive connections close,
new requests on busy connections get 503; in-flight requests and streams may finish
within `shutdown_grace_s`. Then the rest are cancelled (streams get a shutdown error
event first), the usage sink flushes, stores close, and the process exits 0. In a
single process a second signal ends the grace period at once.

`--workers N` runs N such processes on one port (SO_REUSEPORT). The parent tells
systemd READY=1 once every worker listens, forwards those signals (and SIGHUP) to them, and
exits 0 once all of them drained. A worker that dies on its own takes the others
down gracefully and the parent exits 1, so the service manager restarts the set.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from proxy.access_log import AccessLog
from proxy.config import Config, load_config
from proxy.front import protocol_error
from proxy.gateway import Gateway, build_gateway
from proxy.http1.server import Http1Server, ServerLimits
from proxy.logs import configure_logging
from proxy.tls import ServerTls
from proxy.worker_metrics import WorkerMetrics

log = logging.getLogger("llm_proxy.server")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# SIGHUP reloads the configuration. Its default action would end the process at once (the
# requests in flight unrecorded): it is blocked or handled from the start of every process.
_RELOAD_SIGNAL = signal.SIGHUP
_HANDLED_SIGNALS = (*_STOP_SIGNALS, _RELOAD_SIGNAL)
# After the grace period: how long cancelled handlers get to write their shutdown error
# event and record usage.
_CANCEL_WAIT_S = 5.0
# How long the --workers parent waits for every worker to listen.
_START_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1

# Stop signals that arrived before the event loop took them over (a worker process
# starts with them blocked; see `run`).
_early_signals: list[int] = []


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


async def serve(
    config: Config,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    notify: bool = True,
    on_ready: Callable[[], None] | None = None,
    second_signal_ends_grace: bool = True,
    config_path: str | None = None,
    parent_pid: int | None = None,
    worker_metrics: WorkerMetrics | None = None,
) -> None:
    """Serve until a stop signal (SIGTERM / SIGINT), then drain (see the module docstring)
    and return; SIGHUP reloads `config_path` (None: resolved as at start-up).

    `notify`: send READY=1 / STOPPING=1 on $NOTIFY_SOCKET. `on_ready`: called once the
    port accepts connections. `second_signal_ends_grace`: off in --workers children, which
    may get one signal twice (from the terminal's process group and from the parent).
    `worker_metrics`: this process is one of `--workers N` (proxy/worker_metrics.py).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set() and second_signal_ends_grace:
            hurry.set()
        stop.set()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    early, _early_signals[:] = list(_early_signals), []
    for _ in early:
        on_signal()
    reloads: set[asyncio.Task[object]] = set()
    started: list[Running] = []

    def on_reload() -> None:
        if not started:
            log.warning("SIGHUP before the server started: the config it loads is read now anyway")
            return
        task: asyncio.Task[object] = asyncio.ensure_future(started[0].gateway.reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(_RELOAD_SIGNAL, on_reload)

    running = await Running.start(config, host, port, reuse_port=reuse_port, config_path=config_path, parent_pid=parent_pid)
    started.append(running)
    # Everything made at start-up lives until exit: keep it out of every collection, and
    # collect the young generation less often (the hot path allocates many short-lived
    # objects but builds no cycles worth chasing every 700 allocations).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    try:
        if worker_metrics is not None:
            await worker_metrics.start(lambda: running.gateway.metrics.render(running.gateway)[0])
            running.gateway.worker_metrics = worker_metrics
        scheme = "https" if running.tls is not None else "http"
        log.info("llm-proxy listening on %s://%s:%d (pid %d)", scheme, host, running.port, os.getpid())
        if notify:
            sd_notify("READY=1")
        if on_ready is not None:
            on_ready()

        await stop.wait()
        if notify:
            sd_notify("STOPPING=1")
        await running.drain(config.server.shutdown_grace_s, hurry)
    finally:
        # Closes what is left, then the gateway in reverse: the usage sink flushes
        # before the upstream pools and stores close.
        # The signal handlers stay until the loop closes: a late duplicate signal must
        # not kill the process while it flushes.
        if worker_metrics is not None:
            worker_metrics.close()
        await running.close()
    log.info("stopped")


class Running:
    """A started gateway (proxy/gateway.py) and the front HTTP/1.1 server on its port,
    which every client connection reaches."""

    def __init__(self, gateway: Gateway, http: Http1Server) -> None:
        self.gateway = gateway
        self.http = http
        self.server: asyncio.Server | None = None
        self.port = 0
        # `server.tls`: the listening socket's certificate. A config reload calls
        # `reload_tls` (turning TLS on or off needs a restart: the socket is made once).
        self.tls: ServerTls | None = None

    @property
    def access_log(self) -> AccessLog | None:
        return self.gateway.access_log

    def reload_tls(self, config: Config) -> None:
        """Re-read the certificate and key files named by `config` (server.tls) for new
        connections. Raises OSError / ssl.SSLError on a bad pair, changing nothing."""
        if self.tls is not None and config.server.tls is not None:
            self.tls.reload(config.server.tls)

    def _reread_tls(self) -> None:
        """After a config reload (SIGHUP, /admin/reload): a renewed certificate at the same
        paths is served to new connections; one that does not load is logged and the
        current one stays. (New paths are server.* settings: they need a restart.)"""
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except OSError as exc:  # ssl.SSLError is an OSError
            log.error("TLS certificate not reloaded, the current one stays: %s", exc)
        else:
            log.info("TLS certificate re-read from %s", self.tls.config.cert_file)

    @classmethod
    async def start(
        cls,
        config: Config,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        config_path: str | None = None,
        parent_pid: int | None = None,
    ) -> Running:
        gateway = build_gateway(config, config_path=config_path, parent_pid=parent_pid)
        srv = config.server
        http = Http1Server(
            gateway.front.handle,
            limits=ServerLimits(
                max_line_size=srv.max_line_size,
                max_field_size=srv.max_field_size,
                max_headers=srv.max_headers,
                max_body_bytes=int(srv.max_body_mb * 1024 * 1024),
                keepalive_s=srv.keepalive_s,
                head_timeout_s=srv.head_timeout_s,
                write_stall_s=srv.write_stall_s,
                body_timeout_s=srv.body_timeout_s,
                max_connections=srv.max_connections,
                max_connections_per_client=srv.max_connections_per_client,
            ),
            render_error=protocol_error,
            on_done=gateway.front.on_done,
            head_check=gateway.front.head_check,
            uncapped_peer=gateway.client_address.trusted,
        )
        gateway.handlers = http.tasks  # requests in flight: drained at shutdown
        await gateway.open()  # opens the store, limiter, upstream pools, usage sink and control plane
        running = cls(gateway, http)
        try:
            if srv.tls is not None:
                running.tls = ServerTls(srv.tls)
                running.gateway.reloader.reread = running._reread_tls
            running.server = await asyncio.get_running_loop().create_server(
                http.protocol, host, port, reuse_port=reuse_port or None, backlog=1024,
                ssl=running.tls.context if running.tls is not None else None,
            )
        except BaseException:
            await running.close()
            raise
        running.port = running.server.sockets[0].getsockname()[1]
        return running

    async def drain(self, grace_s: float, hurry: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        handlers = self.http.tasks
        log.info("stopping: draining %d requests (grace %gs)", len(handlers), grace_s)
        # New requests on open connections get 503 and /readyz turns 503 from here on.
        self.gateway.streams.stopping = True
        if self.server is not None:
            self.server.close()  # stop accepting: with SO_REUSEPORT the other workers take over
        self.http.shutdown()  # idle keep-alive connections close, busy ones after their response
        deadline = loop.time() + grace_s
        while handlers and not hurry.is_set() and loop.time() < deadline:
            try:
                await asyncio.wait_for(hurry.wait(), min(0.05, max(0.0, deadline - loop.time())))
            except TimeoutError:
                pass
        if not handlers:
            return
        left = list(handlers)
        log.warning("grace period over: ending %d requests", len(left))
        # Stream handlers write a shutdown error event to their client and record the usage
        # delivered so far (outcome "shutdown"); other requests are cancelled and recorded.
        self.gateway.streams.end_all()
        for task in left:
            if not task.done() and not task.cancelling():
                task.cancel()
        _done, pending = await asyncio.wait(left, timeout=_CANCEL_WAIT_S)
        if pending:
            log.warning("%d requests did not end within %gs of cancellation", len(pending), _CANCEL_WAIT_S)

    async def close(self) -> None:
        self.gateway.streams.stopping = True
        if self.server is not None:
            self.server.close()
        self.http.abort_all()  # cancels the handlers still running: they record their usage
        if self.http.tasks:
            await asyncio.wait(list(self.http.tasks), timeout=_CANCEL_WAIT_S)
        # In reverse of the start: the usage sink flushes before pools and stores close.
        await self.gateway.close()


# ---------------------------------------------------------------------- --workers N


def _stop_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM when the parent dies (Linux), so that a killed
    parent does not leave workers serving on their own; they drain and exit."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent_pid:  # it died before the request took effect
        _early_signals.append(signal.SIGTERM)


def _worker(
    config_path: str | None,
    host: str,
    port: int,
    ready: multiprocessing.connection.Connection,
    index: int,
    parent_pid: int,
    metrics: tuple[str, int],
) -> None:
    # The parent started this process with the stop signals blocked, so a stop signal
    # sent while it was starting up waits until it can be handled gracefully.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: _early_signals.append(signum))
    # A reload before the loop runs: the config is read after this anyway.
    signal.signal(_RELOAD_SIGNAL, lambda signum, _frame: None)
    _stop_with_parent(parent_pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)
    install_uvloop()
    configure_logging()

    def on_ready() -> None:
        ready.send_bytes(b"ready")
        ready.close()

    try:
        config = load_config(config_path)
        configure_logging(fmt=config.server.log_format)
        directory, count = metrics
        asyncio.run(serve(
            config, host, port, reuse_port=True, notify=False, on_ready=on_ready, second_signal_ends_grace=False,
            config_path=config_path, parent_pid=parent_pid, worker_metrics=WorkerMetrics(Path(directory), index, count),
        ))
    except Exception:
        log.exception("worker %d failed", index)
        sys.exit(1)


class _Workers:
    """N spawned worker processes and the parent's view of them."""

    def __init__(self, config_path: str | None, host: str, port: int, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self._ready: list[multiprocessing.connection.Connection] = []
        self._writers: list[multiprocessing.connection.Connection] = []
        self.stopping = False
        self.signalled = False  # a stop signal came from outside (not a worker failure)
        # The workers' metrics sockets (proxy/worker_metrics.py); mkdtemp makes it 0700.
        self.metrics_dir = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
        for i in range(count):
            reader, writer = ctx.Pipe(duplex=False)
            self.procs.append(
                ctx.Process(
                    target=_worker,
                    args=(config_path, host, port, writer, i, os.getpid(), (self.metrics_dir, count)),
                    name=f"llm-proxy-worker-{i}",
                )
            )
            self._ready.append(reader)
            self._writers.append(writer)

    def start(self) -> None:
        for proc in self.procs:
            proc.start()
        for writer in self._writers:
            writer.close()  # each worker holds its own copy

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def reload(self) -> None:
        """SIGHUP every worker: each re-reads the config file on its own."""
        if self.stopping:
            return
        for proc in self.procs:
            if proc.pid is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, _RELOAD_SIGNAL)
                except ProcessLookupError:
                    pass

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every worker to drain and exit (a repeated signal is forwarded too; the
        workers treat it as the same request)."""
        if not self.stopping:
            self.stopping = True
            sd_notify("STOPPING=1")
        for proc in self.procs:
            if proc.pid is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def wait_ready(self, timeout: float) -> bool:
        """True once every worker listens; False if one exited first, time ran out or
        a stop signal came."""
        waiting = list(self._ready)
        deadline = time.monotonic() + timeout
        while waiting and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("the workers did not start within %gs", timeout)
                return False
            sentinels = [p.sentinel for p in self.procs]
            for obj in multiprocessing.connection.wait([*waiting, *sentinels], timeout=min(remaining, 0.5)):
                if isinstance(obj, int):
                    return False  # a worker exited before it listened
                assert isinstance(obj, multiprocessing.connection.Connection)  # `waiting` holds only pipes
                try:
                    obj.recv_bytes()
                except EOFError:
                    return False
                waiting.remove(obj)
                obj.close()
        return not waiting

    def wait_exit(self) -> None:
        """Return once every worker has exited; one exiting on its own stops the rest."""
        alive = [p for p in self.procs if p.pid is not None]
        while alive:
            multiprocessing.connection.wait([p.sentinel for p in alive])
            for proc in [p for p in alive if not p.is_alive()]:
                alive.remove(proc)
                proc.join()
                if not self.stopping:
                    log.error("%s (pid %s) exited with code %s: stopping the others", proc.name, proc.pid, proc.exitcode)
                    self.stop()


def run(config: Config, config_path: str | None, host: str, port: int, workers: int) -> int:
    if workers <= 1:
        install_uvloop()
        signal.signal(_RELOAD_SIGNAL, lambda _signum, _frame: None)   # until serve() handles it
        try:
            asyncio.run(serve(config, host, port, config_path=config_path))
        except OSError as exc:  # e.g. the address is in use, the spool is not writable
            log.error("cannot start: %s", exc)
            return 1
        return 0
    if config.limits.url.startswith("memory://"):
        log.warning("limits.url is memory://: rate limits and budgets are enforced per worker process (x%d)", workers)
    group = _Workers(config_path, host, port, workers)

    def on_signal(signum: int, _frame: object) -> None:
        group.signalled = True
        group.stop(signum)

    # Stop signals are blocked while the workers are spawned and they inherit that mask:
    # a signal cannot kill a half-started worker, it is handled once the worker can.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    previous[_RELOAD_SIGNAL] = signal.signal(_RELOAD_SIGNAL, lambda _signum, _frame: group.reload())
    try:
        try:
            group.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if group.wait_ready(_START_TIMEOUT_S):
            sd_notify("READY=1")
            log.info("%d workers serving on %s://%s:%d", workers, "https" if config.server.tls else "http", host, port)
        elif not group.stopping:
            log.error("not every worker started: stopping")
            group.stop()
        group.wait_exit()
    finally:
        if group.alive():  # only on an unexpected error in this process
            group.stop()
            group.wait_exit()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(group.metrics_dir, ignore_errors=True)
    # A worker ended by the stop signal itself (one that arrived while it was already
    # closing its event loop) stopped as asked.
    asked = {0} | ({-sig for sig in _STOP_SIGNALS} if group.signalled else set())
    codes = [p.exitcode for p in group.procs]
    if any(c not in asked for c in codes):
        log.error("worker exit codes: %s", codes)
        return 1
    return 0


__all__ = ["configure_logging", "install_uvloop", "run", "sd_notify", "serve"]
