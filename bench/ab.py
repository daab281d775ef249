"""A/B the candidate optimisations in bench/patches.py against the current proxy.

    python -m bench.ab                      # every variant below, 3 rounds
    python -m bench.ab base gc gc,client    # chosen variants (comma-joined patch sets)
    python -m bench.ab --streams base gc    # also 200 streams right after the wrk run

Each variant is its own llm-proxy process (core 0) behind the bench upstream; per round,
variants run in turn (order reversed every other round): wrk at 64 connections for
--seconds, CPU time per request from /proc. `--streams` adds scenario c at 200 streams
straight after the wrk run, when the limiter and the heap hold a minute of traffic.
Prints the median per variant and the gain against `base`. A measurement during which
other processes took over 10% of the proxy core is repeated (see run.measured).
Expect about ±10% run-to-run noise on a shared 2-core VM: use --rounds 5+ for small effects.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench import run as R

DEFAULT = ["base", "gc", "accesslog", "period,settle", "metrics", "nometrics", "noaccounting", "client",
           "gc,accesslog,period,settle,metrics", "gc,accesslog,period,settle,metrics,client"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--streams", action="store_true")
    ap.add_argument("--no-limits", action="store_true", help="use a key without limits")
    ap.add_argument("--out", help="raw results JSON")
    args = ap.parse_args(argv)
    if not R.WRK:
        print("wrk is needed", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="llm-proxy-ab-"))
    (tmp / "data").mkdir()
    started: list[R.Started] = []
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    try:
        upstream = R.start_upstream(tmp)
        started.append(upstream)
        key = R.create_key(tmp, upstream.port, "bench", limits=not args.no_limits)
        script = R.wrk_script(tmp, key)
        for rnd in range(args.rounds):
            order = args.variants if rnd % 2 == 0 else args.variants[::-1]
            for v in order:
                patches = "" if v == "base" else v
                p = R.start_proxy(tmp, upstream.port, tag=f"ab-{v}", module="bench.patches", env={"BENCH_PATCHES": patches})
                started.append(p)
                try:
                    R.run_wrk(p.port, script, 64, 2)   # warm-up
                    t = R.Target(R.PROXY, p.port, p.pid, key)
                    res, cpu = R.measured(p.pid, f"ab {v}", lambda: R.run_wrk(p.port, script, 64, args.seconds))
                    res.pop("raw", None)
                    res["cpu_us_per_req"] = (cpu or 0) * 1e6 / max(1, res.get("requests", 1))
                    if args.streams:
                        s, _ = R.measured(p.pid, f"ab {v} streams", lambda: R.run_loadgen(
                            "streams", t.port, key, R.chat_body(R.STREAM_MODEL, stream=True),
                            "--concurrency", "200", "--duration", "8", timeout=90))
                        res["c200_ttfb_p50_ms"] = s["ttfb_ms"]["p50"]
                        res["c200_ttfb_p99_ms"] = s["ttfb_ms"]["p99"]
                        res["c200_bunched_pct"] = 100 * (s["bunched_share"] or 0)
                    results[v].append(res)
                    R.log(f"round {rnd + 1} {v or 'base'}: {res.get('rps', 0):.0f} req/s, {res['cpu_us_per_req']:.1f} us/req"
                          + (f", c200 ttfb p99 {res['c200_ttfb_p99_ms']:.1f} ms bunched {res['c200_bunched_pct']:.2f}%" if args.streams else ""))
                finally:
                    p.stop()
                    started.remove(p)
    finally:
        for s in reversed(started):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(v: str, k: str) -> float | None:
        vals = [r[k] for r in results[v] if r.get(k) is not None]
        return statistics.median(vals) if vals else None

    base = med("base", "cpu_us_per_req") if "base" in results else None
    cols = ["variant", "req/s", "CPU us/req", "vs base"] + (["c200 TTFB p50", "p99 ms", "bunched %"] if args.streams else [])
    rows = [cols]
    for v in args.variants:
        cpu = med(v, "cpu_us_per_req")
        row = [v, f"{med(v, 'rps') or 0:,.0f}", f"{cpu or 0:.1f}",
               "" if base is None or cpu is None or v == "base" else f"{cpu - base:+.1f} us ({100 * (cpu - base) / base:+.0f}%)"]
        if args.streams:
            row += [f"{med(v, 'c200_ttfb_p50_ms') or 0:.2f}", f"{med(v, 'c200_ttfb_p99_ms') or 0:.2f}", f"{med(v, 'c200_bunched_pct') or 0:.2f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    print(f"\nllm-proxy A/B, wrk 64 conns x {args.seconds:g}s, median of {args.rounds} rounds"
          + (", key without limits" if args.no_limits else ", key with limits") + "\n")
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(cols) - 1)))
    if args.out:
        Path(args.out).write_bytes(orjson.dumps({"results": results, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                                option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
