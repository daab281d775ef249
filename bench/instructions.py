"""Instructions per proxied request, counted by callgrind: an A/B measure without noise.

    python -m bench.instructions [--seconds 20] [--rate 50] [--no-limits] [--messages] [--stream]

CPU time per request moves by ±25 % between runs on a shared VM, so a change worth 3 %
cannot be seen in it. The number of instructions the gateway executes per request
barely moves (±0.3 % between runs of one build here), so two builds can be compared in
one run each. It is not a speed: it leaves out cache misses and the kernel. The load is
a fixed rate (open loop), not as fast as the gateway goes: work done per batch or per
timer tick (usage writes, the access log flush) is shared by the requests of a batch, so
the count depends on the rate, and a fixed one keeps builds comparable (the gateway
serves ~100 req/s under valgrind, ~50x slower than at full speed, so that work weighs
more here than in the bench). Use it to compare builds of the per-request path, and the
bench (`bench.run`) for what a build costs in time.

It starts the bench upstream, llm-proxy under `valgrind --tool=callgrind` with the
bench configuration (a key with every limit set), warms it with wrk, zeroes the
counters, sends --rate requests per second for --seconds (bench/loadgen.py), dumps the
counters and divides by the requests answered. Needs valgrind (Debian: `apt-get install
valgrind`) and wrk.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import translated
from bench.run import (
    CONFIG,
    PROXY_CORE,
    PY,
    REPO,
    STREAM_MODEL,
    WRK,
    create_key,
    free_port,
    log,
    pinned,
    proxy_env,
    chat_body,
    run_loadgen,
    run_wrk,
    start_upstream,
    wait_ready,
    wrk_script,
)

VALGRIND = shutil.which("valgrind")
CALLGRIND_CONTROL = shutil.which("callgrind_control")


def _counted(out_dir: Path) -> int:
    """Instructions in the dump callgrind_control -d wrote (the file ending in .1)."""
    dumps = sorted(out_dir.glob("callgrind.out.*.1"))
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    for line in dumps[-1].read_text().splitlines():
        if m := re.match(r"(?:summary|totals): (\d+)", line):
            return int(m.group(1))
    raise RuntimeError("no instruction total in the callgrind dump")


def measure(seconds: float, rate: float, limits: bool, keep: Path | None = None, dialect: str = "chat",
            stream: bool = False) -> dict[str, float]:
    """`dialect` "messages": bench.translated's Anthropic call onto the chat upstream;
    `stream`: its streamed form (20 chunks 25 ms apart), counted per stream."""
    if not (VALGRIND and CALLGRIND_CONTROL and WRK):
        raise RuntimeError("needs valgrind, callgrind_control and wrk on PATH")
    with tempfile.TemporaryDirectory(prefix="llm-proxy-instr-") as name:
        tmp = Path(name)
        upstream = start_upstream(tmp)
        proc = None
        try:
            key = create_key(tmp, upstream.port, "instr", limits)
            port = free_port()
            cmd = [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out.%p", "--dump-line=no",
                   PY, "-m", "proxy", "serve", "--config", str(CONFIG)]
            proc = subprocess.Popen(pinned(PROXY_CORE, cmd), cwd=REPO, env=proxy_env(tmp, upstream.port, port),
                                    stdout=subprocess.DEVNULL, stderr=open(tmp / "proxy.log", "wb"))
            if not wait_ready(port, proc, 240, 240, poll_s=0.5):
                raise RuntimeError("llm-proxy under valgrind did not get ready")
            log("warming up under valgrind")
            if dialect == "chat" and not stream:
                run_wrk(port, wrk_script(tmp, key), 16, 8)
                load_key, body, extra = key, chat_body(), []
            else:
                call = translated.Call("instr", port, None, dialect, key)
                body = translated.body(dialect, STREAM_MODEL if stream else "bench", stream)
                load_key, extra = "", ["--path", call.path, *(a for h in call.headers for a in ("--header", h))]
                run_loadgen("rate", port, load_key, body, "--rate", str(rate), "--duration", "8", "--warmup", "0",
                            "--conns", "8", *extra, timeout=200)
            subprocess.run([CALLGRIND_CONTROL, "-z", str(proc.pid)], capture_output=True, check=True, timeout=60)
            res = run_loadgen("rate", port, load_key, body, "--rate", str(rate), "--duration", str(seconds),
                              "--warmup", "0", "--conns", "8", *extra, timeout=seconds + 120)
            subprocess.run([CALLGRIND_CONTROL, "-d", str(proc.pid)], capture_output=True, check=True, timeout=60)
            requests = res.get("ok", 0)
            if not requests or res.get("errors") or res.get("dropped"):
                raise RuntimeError(f"load: {requests} answered, {res.get('errors')} errors, {res.get('dropped')} dropped")
            instructions = _counted(tmp)
            if keep is not None:   # the dump, for callgrind_annotate (per C function)
                shutil.copy(sorted(tmp.glob("callgrind.out.*.1"))[-1], keep)
            return {"requests": requests, "instructions": instructions, "per_request": instructions / requests}
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            upstream.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20, help="measured wrk seconds (default 20)")
    ap.add_argument("--rate", type=float, default=50, help="requests per second, open loop (default 50)")
    ap.add_argument("--no-limits", action="store_true", help="a key without limits (default: every limit set)")
    ap.add_argument("--keep", type=Path, default=None, metavar="FILE", help="keep the callgrind dump there")
    ap.add_argument("--messages", action="store_true", help="the translated call: Anthropic client, chat upstream")
    ap.add_argument("--stream", action="store_true", help="streamed calls (20 chunks), counted per stream")
    args = ap.parse_args(argv)
    try:
        r = measure(args.seconds, args.rate, not args.no_limits, args.keep,
                    "messages" if args.messages else "chat", args.stream)
    except RuntimeError as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    print(f"{r['per_request']:,.0f} instructions per {'stream' if args.stream else 'request'}"
          f"{' (translated: /v1/messages)' if args.messages else ''} ({r['requests']:,} requests, "
          f"{r['instructions']:,} instructions; key {'without' if args.no_limits else 'with'} limits)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
