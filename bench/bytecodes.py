"""Bytecodes per proxied request, by Python function: where the interpreter's work goes.

    python -m bench.bytecodes [--requests 300] [--out FILE] [--against FILE] [--top 40] [--messages]

callgrind (bench.instructions) counts instructions exactly but, on Python 3.11, names only
C functions: most of a request is `_PyEval_EvalFrameDefault`. This counts the bytecodes
each Python function executes per request instead (sys.settrace with opcode events, in
the gateway's own process), which says which Python code a change made heavier. The
tracing makes the gateway ~50x slower, so the load is a fixed rate (50 req/s, open loop,
as in bench.instructions); the counts are deterministic up to the work done per batch
(usage flushes, the access log), which depends on how requests fall between ticks.

It starts the bench upstream and llm-proxy (the bench configuration, a key with every
limit set, this checkout), warms up, counts while --requests requests are answered, and
prints the functions with the most bytecodes per request. `--out` keeps the counts;
`--against` an earlier `--out` prints the differences instead (this run minus that one):
run it in two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from bench import translated
from bench.run import (
    CONFIG,
    PY,
    REPO,
    chat_body,
    create_key,
    free_port,
    log,
    proxy_env,
    run_loadgen,
    run_wrk,
    start_upstream,
    wait_ready,
    wrk_script,
)

RATE = 50


def _child(argv: list[str]) -> int:
    """The gateway, counting bytecodes per code object from SIGUSR1 to SIGUSR2."""
    counts: collections.Counter[CodeType] = collections.Counter()
    on = False

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and on:
            counts[frame.f_code] += 1
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    def start(*_: Any) -> None:
        nonlocal on
        counts.clear()
        on = True

    def stop(*_: Any) -> None:
        nonlocal on
        on = False
        with open(os.environ["BENCH_BYTECODES_OUT"], "w") as out:
            for code, n in counts.most_common():
                out.write(f"{n}\t{code.co_filename}:{code.co_firstlineno}:{code.co_qualname}\n")

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.settrace(trace)
    threading.settrace(trace)
    from proxy.cli import main as cli_main

    return cli_main(argv)


def measure(requests: int, dialect: str = "chat") -> tuple[dict[str, float], int]:
    """Bytecodes per request by function (`file:function`, paths from the checkout);
    `dialect` "messages": bench.translated's Anthropic call onto the chat upstream."""
    with tempfile.TemporaryDirectory(prefix="llm-proxy-bytecodes-") as name:
        tmp = Path(name)
        out = tmp / "counts.tsv"
        upstream = start_upstream(tmp)
        proc = None
        try:
            key = create_key(tmp, upstream.port, "bytecodes", True)
            port = free_port()
            env = {**proxy_env(tmp, upstream.port, port), "BENCH_BYTECODES_OUT": str(out)}
            proc = subprocess.Popen([PY, "-m", "bench.bytecodes", "--child", "serve", "--config", str(CONFIG)],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "proxy.log", "wb"))
            if not wait_ready(port, proc, 120, 120, poll_s=0.5):
                raise RuntimeError("llm-proxy under the tracer did not get ready")
            log("warming up under the tracer")
            load_key, body, extra = key, chat_body(), []
            if dialect == "chat":
                run_wrk(port, wrk_script(tmp, key), 4, 3)
            else:
                call = translated.Call("bytecodes", port, None, dialect, key)
                run_wrk(port, translated.wrk_script(tmp, call), 4, 3, call.path)
                load_key, body = "", translated.body(dialect, "bench", False)
                extra = ["--path", call.path, *(a for h in call.headers for a in ("--header", h))]
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            res = run_loadgen("rate", port, load_key, body, "--rate", str(RATE), "--duration", str(requests / RATE),
                              "--warmup", "0", "--conns", "8", *extra, timeout=requests / RATE + 120)
            time.sleep(0.5)  # the last records' flush tick
            proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            answered = res.get("ok", 0)
            if not answered or res.get("errors") or not out.exists():
                raise RuntimeError(f"load: {answered} answered, {res.get('errors')} errors")
            return _parse(out.read_text(), answered), answered
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            upstream.stop()


def _parse(text: str, requests: int) -> dict[str, float]:
    per: dict[str, float] = {}
    for line in text.splitlines():
        n, where = line.split("\t", 1)
        path, _line, function = where.rsplit(":", 2)
        path = re.sub(r"^.*?/site-packages/|^.*?/lib/python3\.\d+/", "", path.replace(str(REPO) + "/", ""))
        key = f"{path}:{function}"
        per[key] = per.get(key, 0.0) + int(n) / requests
    return per


def _read(path: Path) -> dict[str, float]:
    return {k: float(v) for v, k in (line.split("\t", 1) for line in path.read_text().splitlines() if line)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None, help="keep the counts (per request, by function)")
    ap.add_argument("--against", type=Path, default=None, help="an earlier --out: print this run minus that one")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--messages", action="store_true", help="the translated call: Anthropic client, chat upstream")
    args = ap.parse_args(argv)
    try:
        per, answered = measure(args.requests, "messages" if args.messages else "chat")
    except RuntimeError as exc:
        print(f"bench.bytecodes: {exc}", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_text("".join(f"{v:.2f}\t{k}\n" for k, v in sorted(per.items(), key=lambda kv: -kv[1])))
    print(f"{sum(per.values()):,.0f} bytecodes per request ({answered} requests)")
    if args.against:
        before = _read(args.against)
        print(f"  {sum(before.values()):,.0f} in {args.against}")
        diff = {k: per.get(k, 0.0) - before.get(k, 0.0) for k in per.keys() | before.keys()}
        for k in sorted(diff, key=lambda k: -abs(diff[k]))[: args.top]:
            print(f"{diff[k]:+8.1f} {per.get(k, 0.0):8.1f} {before.get(k, 0.0):8.1f}  {k}")
    else:
        for k in sorted(per, key=lambda k: -per[k])[: args.top]:
            print(f"{per[k]:8.1f}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
