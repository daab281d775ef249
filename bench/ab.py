"""Two llm-proxy instances under the same load at the same time: an A/B without the VM's drift.

    python -m bench.ab                              # aged (scenarios e, d, c, b) vs fresh, same code
    python -m bench.ab --age "" --b-tree ../other   # this checkout vs another one, both fresh
    python -m bench.ab --age "" --b-tree ../other --get /healthz   # the same for GET /healthz
    python -m bench.ab --age "" --b-tree ../other --messages      # a translated call (Anthropic -> chat)

CPU per request moves by up to 35 % between the rounds of one bench run on this VM, so two
builds, or two states of one build, measured one after the other differ mostly by when
they ran. Here both instances share the proxy core at once, each under its own wrk (half
of scenario a's 64 connections) on the load core: whatever slows the core slows both, and
the ratio of their CPU per request within a round cancels it. An instance aged by
scenario d (or e, d, c, b) against a fresh one measured +7 to +14 % in each of 13 rounds
this way (bench/RESULTS.md, session 11) while each one's own CPU per request moved by 30 %.

A is this checkout (aged by `--age` scenarios of bench.run first, on A alone); B is fresh,
from `--b-tree` (another checkout: `python -m proxy` runs from there) or this one. Both use
the bench configuration and one key with every limit set. Prints each round and the
median of the per-round ratios A/B; `--out` writes the raw numbers.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import orjson

from bench import translated
from bench.run import (
    PROXY,
    REPO,
    WRK,
    Bench,
    Params,
    Started,
    Target,
    cpu_split,
    create_key,
    log,
    rss_kb,
    run_wrk,
    start_proxy,
    start_upstream,
    wrk_script,
)

CONNS = 32  # per instance: scenario a's 64 in all


def _round(instances: list[Started], script: Path, seconds: float, path: str) -> list[dict[str, Any]]:
    """wrk against every instance at once; each one's requests and CPU per request."""
    results: list[dict[str, Any]] = [{} for _ in instances]
    before = [sum(cpu_split(s.pid)) for s in instances]

    def load(i: int) -> None:
        results[i] = run_wrk(instances[i].port, script, CONNS, seconds, path)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(instances))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, s in enumerate(instances):
        res = results[i]
        res.pop("raw", None)
        cpu = sum(cpu_split(s.pid)) - before[i]
        res["cpu_us_per_req"] = cpu * 1e6 / res["requests"] if res.get("requests") else None
        res["rss_kb"] = rss_kb(s.pid)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--age", default="edcb", help="bench.run scenarios A runs first (default edcb; '' for none)")
    ap.add_argument("--b-tree", type=Path, default=None, help="run B from this checkout (default: this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--out", type=Path, default=None, help="raw results JSON")
    ap.add_argument("--get", default=None, metavar="PATH",
                    help="load GET PATH (e.g. /healthz, /metrics) instead of the model call")
    ap.add_argument("--messages", action="store_true",
                    help="load the translated call instead: POST /v1/messages (bench.translated's) onto the chat upstream")
    args = ap.parse_args(argv)
    if WRK is None:
        log("wrk is not installed (Debian: apt-get install wrk)")
        return 2
    if not set(args.age) <= set("edcb"):
        ap.error("--age takes scenarios among e, d, c, b")
    tmp = Path(tempfile.mkdtemp(prefix="llm-proxy-ab-"))
    (tmp / "data").mkdir()
    started: list[Started] = []
    raw: dict[str, Any] = {"age": args.age, "b_tree": str(args.b_tree or REPO), "rounds": []}
    try:
        upstream = start_upstream(tmp)
        started.append(upstream)
        key = create_key(tmp, upstream.port, "ab", limits=True)
        # B keeps its own copy of the store (same key): with one shared database, the
        # schema one tree migrates in (triggers, indexes) would load the other one too.
        shutil.copytree(tmp / "data", tmp / "data-b")
        a = start_proxy(tmp, upstream.port, tag="a")
        started.append(a)
        if args.age:
            bench = Bench(tmp, Params.full(), [Target(PROXY, a.port, a.pid, key)])
            for name in args.age:
                log(f"ageing A: scenario {name}")
                getattr(bench, f"scenario_{name}")()
        b = start_proxy(tmp, upstream.port, tag="b", cwd=args.b_tree, env={"BENCH_DATA_DIR": str(tmp / "data-b")})
        started.append(b)
        if args.messages:
            script, path = translated.wrk_script(tmp, translated.Call("ab", 0, None, "messages", key)), "/v1/messages"
        else:
            script = wrk_script(tmp, key, "GET" if args.get else "POST")
            path = args.get or "/v1/chat/completions"
        _round([a, b], script, 3, path)  # warm-up: pools, caches, the spend seed
        ratios = []
        for r in range(args.rounds):
            res_a, res_b = _round([a, b], script, args.seconds, path)
            raw["rounds"].append({"a": res_a, "b": res_b})
            ua, ub = res_a["cpu_us_per_req"], res_b["cpu_us_per_req"]
            if ua and ub:
                ratios.append(ua / ub)
            log(f"round {r + 1}: A {ua or 0:.1f} us/req ({res_a.get('rps', 0):.0f} req/s), "
                f"B {ub or 0:.1f} us/req ({res_b.get('rps', 0):.0f} req/s), A/B {ua / ub if ua and ub else 0:.3f}")
        raw["median_ratio"] = statistics.median(ratios) if ratios else None
    finally:
        for s in reversed(started):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        args.out.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    if raw["median_ratio"] is None:
        return 1
    print(f"A ({'aged by ' + args.age if args.age else 'fresh'}, {REPO}) / B (fresh, {args.b_tree or REPO}): "
          f"CPU per request ratio {raw['median_ratio']:.3f} (median of {len(ratios)} rounds; "
          f"per round {', '.join(f'{x:.3f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
