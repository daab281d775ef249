"""Instructions per proxied request, counted by callgrind: an A/B measure without noise.

    python -m bench.instructions [--seconds 20] [--conns 16] [--no-limits]

CPU time per request moves by ±25 % between runs on a shared VM, so a change worth 3 %
cannot be seen in it. The number of instructions the gateway executes per request
barely moves (±0.3 % between runs of one build here), so two builds can be compared in
one run each. It is not a speed: it leaves out cache misses and the kernel, and the
gateway runs ~50x slower under valgrind, so work done per batch or per timer tick (usage
writes, the access log flush) is spread over fewer requests than at full speed and
weighs more. Use it to compare builds of the per-request path, and the bench (`bench.run`)
for what a build costs in time.

It starts the bench upstream, llm-proxy under `valgrind --tool=callgrind` with the
bench configuration (a key with every limit set), warms it with wrk, zeroes the
counters, runs wrk for --seconds, dumps the counters and divides by the requests wrk
completed. Needs valgrind (Debian: `apt-get install valgrind`) and wrk.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import (
    CONFIG,
    PROXY_CORE,
    PY,
    REPO,
    WRK,
    create_key,
    free_port,
    http_get,
    log,
    pinned,
    proxy_env,
    run_wrk,
    start_upstream,
    wait_port,
    wrk_script,
)

VALGRIND = shutil.which("valgrind")
CALLGRIND_CONTROL = shutil.which("callgrind_control")


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    wait_port(port, timeout, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http_get(port, "/readyz") == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("llm-proxy under valgrind did not get ready")


def _counted(out_dir: Path) -> int:
    """Instructions in the dump callgrind_control -d wrote (the file ending in .1)."""
    dumps = sorted(out_dir.glob("callgrind.out.*.1"))
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    for line in dumps[-1].read_text().splitlines():
        if m := re.match(r"(?:summary|totals): (\d+)", line):
            return int(m.group(1))
    raise RuntimeError("no instruction total in the callgrind dump")


def measure(seconds: float, conns: int, limits: bool) -> dict[str, float]:
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
            _wait_ready(port, proc, 240)
            script = wrk_script(tmp, key)
            log("warming up under valgrind")
            run_wrk(port, script, conns, 8)
            subprocess.run([CALLGRIND_CONTROL, "-z", str(proc.pid)], capture_output=True, check=True, timeout=60)
            res = run_wrk(port, script, conns, seconds)
            subprocess.run([CALLGRIND_CONTROL, "-d", str(proc.pid)], capture_output=True, check=True, timeout=60)
            requests = res.get("requests", 0)
            if not requests or res.get("non2xx"):
                raise RuntimeError(f"wrk: {requests} requests, {res.get('non2xx')} not 2xx")
            instructions = _counted(tmp)
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
    ap.add_argument("--conns", type=int, default=16, help="wrk connections (default 16)")
    ap.add_argument("--no-limits", action="store_true", help="a key without limits (default: every limit set)")
    args = ap.parse_args(argv)
    try:
        r = measure(args.seconds, args.conns, not args.no_limits)
    except RuntimeError as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    print(f"{r['per_request']:,.0f} instructions per request ({r['requests']:,} requests, "
          f"{r['instructions']:,} instructions; key {'without' if args.no_limits else 'with'} limits)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
