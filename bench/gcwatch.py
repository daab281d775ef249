"""Run llm-proxy with the garbage collector's pauses recorded (a diagnostic, not a scenario).

    BENCH_GC_LOG=/tmp/gc.json python -m bench.gcwatch serve --config bench/proxy-bench.yaml

Same arguments as `python -m proxy`. Experiments: BENCH_GC_FREEZE=1 calls gc.freeze()
after the imports; BENCH_GC_THRESHOLD=700,10,10 sets gc thresholds. Every collection's generation and duration is
kept; on exit (SIGTERM drains and exits normally) a JSON summary per generation is
written to $BENCH_GC_LOG: count, total and max pause, pauses over 1/5/10 ms, and the
object counts seen (with BENCH_GC_COUNT=1, also the most common tracked types; that
count itself takes time, so pause numbers are only meaningful without it). Long gen-2 pauses show up as stalls of every stream at once
(bunched chunks, TTFB outliers).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time

import orjson

_start: list[float] = [0.0]
_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_objects: list[int] = []
_types: list[dict[str, int]] = []


def _cb(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _start[0] = time.perf_counter()
        if info["generation"] == 2 and os.environ.get("BENCH_GC_COUNT"):
            objs = gc.get_objects()
            _objects.append(len(objs))
            if len(_types) < 3 or len(_objects) % 10 == 0:
                counts: dict[str, int] = {}
                for o in objs:
                    name = type(o).__qualname__
                    counts[name] = counts.get(name, 0) + 1
                _types.append(dict(sorted(counts.items(), key=lambda kv: -kv[1])[:15]))
            del objs
    else:
        _pauses[info["generation"]].append((time.perf_counter() - _start[0]) * 1000)


def _dump() -> None:
    out = {}
    for gen, ps in _pauses.items():
        out[f"gen{gen}"] = {
            "count": len(ps),
            "total_ms": round(sum(ps), 2),
            "max_ms": round(max(ps), 2) if ps else 0,
            "over_1ms": sum(p > 1 for p in ps),
            "over_5ms": sum(p > 5 for p in ps),
            "over_10ms": sum(p > 10 for p in ps),
            "last_10_ms": [round(p, 2) for p in ps[-10:]],
        }
    out["gen2_objects"] = _objects[-10:]
    out["gen2_top_types"] = _types[-2:]
    path = os.environ.get("BENCH_GC_LOG", "gc-pauses.json")
    with open(path, "wb") as f:
        f.write(orjson.dumps(out, option=orjson.OPT_INDENT_2))


def main() -> int:
    gc.callbacks.append(_cb)
    atexit.register(_dump)
    from proxy.cli import main as cli_main
    import proxy.gateway  # noqa: F401  (everything the server imports, before a freeze)

    if threshold := os.environ.get("BENCH_GC_THRESHOLD"):
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    if os.environ.get("BENCH_GC_FREEZE"):
        gc.collect()
        gc.freeze()   # start-up objects leave the collector's view for good

    sys.argv[0] = "llm-proxy"
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
