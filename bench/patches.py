"""Run llm-proxy with candidate optimisations monkeypatched in, to measure them before
anyone edits proxy/ (bench/ab.py drives this; see bench/RESULTS.md for the numbers).

    BENCH_PATCHES=gc,accesslog python -m bench.patches serve --config bench/proxy-bench.yaml

Same arguments as `python -m proxy`. Patches (comma-separated in $BENCH_PATCHES):

  gc          gc.freeze() after start-up imports, gc.set_threshold(10_000, 50, 100)
  accesslog   access log lines formatted directly (cached timestamp) and written in
              batches every 0.2 s instead of one logging call + flush per request
  period      MemoryLimiter: budget period bounds cached until the period ends
              (instead of two datetime computations per request)
  settle      Admission.settle: the memory limiter settles inline (it never awaits)
              instead of one asyncio Task per request
  metrics     Metrics.observe_record: labelled children cached per label tuple
  nometrics   Metrics.observe_record is a no-op (what metrics cost at all)
  noaccounting UsageSink.record drops the record (what the usage path costs at all;
              never in production: it loses every usage record)
  client      the upstream request goes through bench/fastclient.py (a lean pooled
              HTTP/1.1 client protocol) instead of aiohttp's ClientSession
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from typing import Any

ALL = ("gc", "accesslog", "period", "settle", "metrics", "nometrics", "noaccounting", "client")


def _gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def _accesslog() -> None:
    import proxy.access_log as al
    import proxy.server as server
    from proxy.middleware.auth import KEY
    from proxy.middleware.context import REQUEST_ID

    class BufferedAccessLogger(al.AccessLogger):
        _lines: list[str] = []
        _scheduled = False
        _sec = -1
        _stamp = ""

        def log(self, request: Any, response: Any, t: float) -> None:
            now = time.time()
            sec = int(now)
            cls = BufferedAccessLogger
            if sec != cls._sec:
                cls._sec, cls._stamp = sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
            key = request.get(KEY)
            path = request.path
            if not path.isprintable():
                path = al._printable(path)
            cls._lines.append(
                f'{cls._stamp},{int(now % 1 * 1000):03d} INFO llm_proxy.access {request.remote} "{request.method} '
                f'{path[:200]}" {response.status} {t * 1000:.1f}ms key={key.name if key is not None else "-"} '
                f'rid={request.get(REQUEST_ID, "-")}\n'
            )
            if not cls._scheduled:
                cls._scheduled = True
                asyncio.get_running_loop().call_later(0.2, cls._flush)

        @classmethod
        def _flush(cls) -> None:
            cls._scheduled = False
            lines, cls._lines = cls._lines, []
            sys.stderr.write("".join(lines))
            sys.stderr.flush()

    server.AccessLogger = BufferedAccessLogger  # type: ignore[misc]


def _period() -> None:
    import proxy.limits.memory as mem

    original = mem.period_bounds
    cache: dict[str, tuple[int, int | None]] = {}

    def period_bounds(now_s: int, period: str | None) -> tuple[int, int | None]:
        if period is None:
            return 0, None
        hit = cache.get(period)
        if hit is not None and hit[0] <= now_s < hit[1]:  # type: ignore[operator]
            return hit
        hit = cache[period] = original(now_s, period)
        return hit

    mem.period_bounds = period_bounds


def _settle() -> None:
    import proxy.middleware.limits as ml
    from proxy.limits.memory import MemoryLimiter

    original = ml.Admission.settle

    def settle(self: Any, reservation: Any, tokens: int, cost_usd: float) -> None:
        if reservation is not None and isinstance(self._limiter, MemoryLimiter):
            coro = self._limiter.settle(reservation, tokens, cost_usd)
            try:
                coro.send(None)     # MemoryLimiter.settle never awaits: runs to completion
            except StopIteration:
                return
            coro.close()
            raise RuntimeError("MemoryLimiter.settle awaited")
        original(self, reservation, tokens, cost_usd)

    ml.Admission.settle = settle  # type: ignore[method-assign]


def _metrics(noop: bool) -> None:
    import proxy.metrics as pm

    if noop:
        pm.Metrics.observe_record = lambda self, rec: None  # type: ignore[method-assign]
        return

    kinds = pm._TOKEN_KINDS

    def observe_record(self: Any, rec: Any) -> None:
        cache = self.__dict__.setdefault("_bench_children", {})
        key = (rec.endpoint, rec.model, rec.status, rec.upstream)
        c = cache.get(key)
        if c is None:
            c = cache[key] = (
                self.requests.labels(rec.endpoint, rec.model, str(rec.status)),
                tuple(self.tokens.labels(rec.model, k) for k in kinds),
                self.estimated.labels(rec.model),
                self.cost.labels(rec.model),
                self.ttft.labels(rec.endpoint),
                self.duration.labels(rec.endpoint),
            )
        req, toks, est, cost, ttft, dur = c
        req.inc()
        for child, value in zip(toks, (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens,
                                       rec.cache_creation_tokens, rec.reasoning_tokens)):
            if value > 0:
                child.inc(value)
        if rec.estimated:
            est.inc()
        if rec.cost_usd > 0:
            cost.inc(rec.cost_usd)
        if rec.outcome in ("upstream_error", "timeout"):
            self.upstream_errors.labels(rec.upstream, rec.outcome).inc()
        if rec.ttft_ms is not None:
            ttft.observe(max(0.0, rec.ttft_ms) / 1000)
        dur.observe(max(0.0, rec.duration_ms) / 1000)

    pm.Metrics.observe_record = observe_record  # type: ignore[method-assign]


def _noaccounting() -> None:
    import proxy.accounting as acc

    acc.UsageSink.record = lambda self, rec: None  # type: ignore[method-assign]


def _client() -> None:
    from bench import fastclient

    fastclient.install()


def apply(names: list[str]) -> None:
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise SystemExit(f"unknown patches: {unknown}; known: {ALL}")
    import proxy.app  # noqa: F401  (import everything the server imports)
    import proxy.server  # noqa: F401

    for name in names:
        if name == "accesslog":
            _accesslog()
        elif name == "period":
            _period()
        elif name == "settle":
            _settle()
        elif name in ("metrics", "nometrics"):
            _metrics(noop=name == "nometrics")
        elif name == "noaccounting":
            _noaccounting()
        elif name == "client":
            _client()
    if "gc" in names:  # last: freeze what the other patches imported too
        _gc()


def main() -> int:
    names = [n for n in os.environ.get("BENCH_PATCHES", "").split(",") if n]
    apply(names)
    from proxy.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
