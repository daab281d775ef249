"""Translated calls side by side: an Anthropic Messages client on an OpenAI-chat upstream.

    python -m bench.translated                  # full run, ~8 min (+ LiteLLM's install, once)
    python -m bench.translated --no-litellm     # llm-proxy only
    python -m bench.translated --smoke          # seconds: proves it all starts (no LiteLLM)
    nice -n -10 python -m bench.translated      # on a shared machine: others' work yields to the targets

Issue 22's speed targets, measured with bench.run's machinery (targets on core 0, the
bench upstream and the load on core 1, CPU from /proc over the process tree, targets
alternating within a round, medians and per-round ratios):

  * CPU per request, non-streamed (wrk, 64 connections) and streamed (scenario c's
    streams of 20 chunks 25 ms apart, at 50 at once): the translated call
    (`POST /v1/messages`, Anthropic body and `x-api-key`, on a model whose route is the
    OpenAI-chat bench upstream) against the same-dialect call (`POST
    /v1/chat/completions`) on the same llm-proxy instance. Target: ≤ 2×.
  * Time to first content chunk at 50 concurrent streams, against `direct` (a chat
    client on the upstream). Target: a translated stream adds ≤ 2 ms.
  * Bunched chunk gaps (< a quarter of the cadence) at 200 concurrent streams. Target: 0 %.

LiteLLM (`litellm[proxy]`, installed on demand into bench/.venv-litellm) is a target in
the same run, translating the same Anthropic call onto the same upstream's chat completions (its default for an
`openai/` model is OpenAI's Responses API, which the bench upstream does not serve), and
serving the same-dialect chat call, for its own ratio. It runs as `litellm --config` with one
worker, a master key and no database, callbacks, telemetry or cost-map download: it
authenticates but keeps no per-key accounting (llm-proxy does: usage into SQLite,
limits, access log), so it does less work per request than llm-proxy here.

Content chunks are counted by the text the upstream sends in every delta (`" token"`),
which each dialect's delta carries as a JSON string whatever its envelope.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.run import (
    BENCH_DIR,
    LOAD_CORE,
    PROXY_CORE,
    PY,
    STREAM_MODEL,
    TASKSET,
    WRK,
    CpuWatch,
    Started,
    create_key,
    free_port,
    log,
    pinned,
    run_loadgen,
    run_wrk,
    start_proxy,
    start_upstream,
    wait_port,
    wait_quiet,
)

LITELLM_VENV = BENCH_DIR / ".venv-litellm"
LITELLM_SPEC = "litellm[proxy]"
LITELLM_KEY = "sk-litellm-bench-master"
MARKER = '" token"'
SYSTEM = "You are a helpful assistant."
PROMPT = "Say hello to the benchmark in one short sentence, please."

DIRECT = "direct (chat)"
P_SAME, P_TRANS = "llm-proxy chat (same dialect)", "llm-proxy messages->chat"
L_SAME, L_TRANS = "LiteLLM chat (same dialect)", "LiteLLM messages->chat"
PAIRS = ((P_TRANS, P_SAME), (L_TRANS, L_SAME))   # translated, its same-dialect reference


def body(dialect: str, model: str, stream: bool) -> str:
    """The same conversation in each dialect (bench.run's chat body, as Anthropic's)."""
    if dialect == "chat":
        doc: dict[str, Any] = {"model": model, "messages": [{"role": "system", "content": SYSTEM},
                                                            {"role": "user", "content": PROMPT}], "max_tokens": 64}
    else:
        doc = {"model": model, "max_tokens": 64, "system": SYSTEM, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        doc["stream"] = True
    return orjson.dumps(doc).decode()


@dataclass
class Call:
    """One kind of request against one target."""

    name: str
    port: int
    pid: int | None       # whose CPU is measured (None: direct)
    dialect: str          # "chat" | "messages"
    key: str

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.dialect == "chat" else "/v1/messages"

    @property
    def headers(self) -> list[str]:
        """Request header lines besides the body's; the Anthropic SDK sends x-api-key."""
        if self.dialect == "chat":
            return [f"Authorization: Bearer {self.key}"]
        return [f"x-api-key: {self.key}", "anthropic-version: 2023-06-01"]


@dataclass
class Params:
    rounds: int
    seconds: float        # wrk per non-streamed measurement
    conns: int
    levels: tuple[int, int]
    stream_seconds: float

    @classmethod
    def full(cls) -> Params:
        return cls(rounds=3, seconds=10, conns=64, levels=(50, 200), stream_seconds=8)

    @classmethod
    def smoke(cls) -> Params:
        return cls(rounds=1, seconds=1, conns=8, levels=(5, 20), stream_seconds=0.5)


# ---------------------------------------------------------------------- LiteLLM


LITELLM_CONFIG = """\
model_list:
{models}
litellm_settings:
  telemetry: false
  drop_params: true
  callbacks: []
  success_callback: []
  failure_callback: []
  turn_off_message_logging: true
  json_logs: false
  # /v1/messages on an openai/ model goes to OpenAI's Responses API by default; the
  # bench upstream (like vLLM, Ollama, DeepSeek) serves chat completions only.
  use_chat_completions_url_for_anthropic_messages: true
general_settings:
  master_key: {key}
  disable_spend_logs: true
  disable_error_logs: true
  allow_requests_on_db_unavailable: true
"""
LITELLM_MODEL = """\
  - model_name: {name}
    litellm_params:
      model: openai/{name}
      api_base: http://127.0.0.1:{port}/v1
      api_key: sk-bench-upstream
"""
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",   # no download of the cost map at start
    "LITELLM_TELEMETRY": "False",
    "LITELLM_USE_CHAT_COMPLETIONS_URL_FOR_ANTHROPIC_MESSAGES": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",             # no .env loading
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
}


def litellm_bin() -> tuple[Path | None, str]:
    """The venv's `litellm` (made on first use: `pip install 'litellm[proxy]'` from PyPI),
    or None and why not."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe, ""
    log(f"installing {LITELLM_SPEC} into {LITELLM_VENV} (once)")
    steps = [[PY, "-m", "venv", str(LITELLM_VENV)],
             [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", LITELLM_SPEC]]
    for cmd in steps:
        out = subprocess.run(cmd, capture_output=True, timeout=1200)
        if out.returncode != 0:
            return None, f"`{' '.join(cmd[-3:])}` failed: {out.stderr.decode(errors='replace')[-500:]}"
    return (exe, "") if exe.exists() else (None, "pip installed litellm but no `litellm` command")


def litellm_version() -> str | None:
    out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True)
    return out.stdout.decode().strip() or None


def start_litellm(tmp: Path, upstream_port: int) -> tuple[Started | None, str]:
    exe, why = litellm_bin()
    if exe is None:
        return None, why
    cfg = tmp / "litellm.yaml"
    models = "".join(LITELLM_MODEL.format(name=name, port=upstream_port) for name in ("bench", STREAM_MODEL))
    cfg.write_text(LITELLM_CONFIG.format(models=models, key=LITELLM_KEY))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")} | LITELLM_ENV
    cmd = pinned(PROXY_CORE, [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                              "--num_workers", "1", "--telemetry", "False"])
    log_path = tmp / "litellm.log"
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    started = Started("litellm", proc, port)
    try:
        wait_port(port, 180, proc)
    except RuntimeError as exc:
        started.stop()
        return None, f"LiteLLM did not start ({exc}): {log_path.read_text(errors='replace')[-800:]}"
    return started, ""


# ---------------------------------------------------------------------- measurements


def probe(call: Call, stream: bool) -> str | None:
    """One request; None when it answers 200 with a content chunk, else what it answered."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", call.port, timeout=30)
    try:
        headers = dict(h.split(": ", 1) for h in call.headers) | {"Content-Type": "application/json"}
        c.request("POST", call.path, body(call.dialect, STREAM_MODEL if stream else "bench", stream).encode(), headers)
        r = c.getresponse()
        data = r.read()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        c.close()
    if r.status != 200 or (stream and MARKER.encode() not in data):
        return f"{r.status}: {data[:600]!r}"
    return None


def wrk_script(tmp: Path, call: Call) -> Path:
    path = tmp / f"wrk-{call.name.split()[0]}-{call.dialect}.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = '{body(call.dialect, 'bench', False)}'",
             'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in (h.split(": ", 1) for h in call.headers)]
    path.write_text("\n".join(lines) + "\n")
    return path


def watched(pid: int | None, fn: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float | None]:
    """fn's result and the target's CPU seconds meanwhile; the share of the proxy core
    other processes took is recorded (no retries: a round's ratio is what is read, and
    on this shared machine a retry rarely finds it quieter)."""
    w = CpuWatch(pid)
    res = fn()
    cpu, foreign = w.stop()
    res["core0_foreign_pct"] = foreign
    return res, cpu


def non_stream(tmp: Path, call: Call, p: Params) -> dict[str, Any]:
    script = wrk_script(tmp, call)
    res, cpu = watched(call.pid, lambda: run_wrk(call.port, script, p.conns, p.seconds, call.path))
    res.pop("raw", None)
    if cpu is not None and res.get("requests"):
        res["cpu_us_per_req"] = cpu * 1e6 / res["requests"]
    return res


def streams(call: Call, level: int, p: Params) -> dict[str, Any]:
    extra = ["--path", call.path, "--marker", MARKER, "--concurrency", str(level), "--duration", str(p.stream_seconds),
             "--chunks", "20", "--cadence-ms", "25"]
    for h in call.headers:
        extra += ["--header", h]
    res, cpu = watched(call.pid, lambda: run_loadgen("streams", call.port, "", body(call.dialect, STREAM_MODEL, True),
                                                     *extra, timeout=p.stream_seconds + 90))
    if cpu is not None:
        res["cpu_us_per_stream"] = cpu * 1e6 / max(1, res["all_streams"])
    return res


def run_rounds(tmp: Path, calls: list[Call], p: Params, non_streamed: bool = True) -> dict[str, Any]:
    raw: dict[str, Any] = {"non_stream": [], **{f"streams_{n}": [] for n in p.levels}}
    measured = [c for c in calls if c.pid is not None]
    wrk = WRK is not None and non_streamed
    if wrk and p.rounds > 1:
        for c in measured:   # warm-up: pools, caches, the spend seed
            run_wrk(c.port, wrk_script(tmp, c), p.conns, min(2, p.seconds), c.path)
    for r in range(p.rounds):
        order = measured if r % 2 == 0 else measured[::-1]
        if wrk:
            row = {}
            for c in order:
                row[c.name] = res = non_stream(tmp, c, p)
                log(f"round {r + 1} non-stream {c.name}: {res.get('rps', 0):.0f} req/s, "
                    f"{res.get('cpu_us_per_req') or 0:.1f} us CPU/req, non-2xx {res.get('non2xx')}")
            raw["non_stream"].append(row)
        for level in p.levels:
            row = {}
            for c in (calls if r % 2 == 0 else calls[::-1]):
                row[c.name] = res = streams(c, level, p)
                log(f"round {r + 1} {level} streams {c.name}: ttfb p50 {res['ttfb_ms']['p50'] or 0:.2f} ms, "
                    f"bunched {100 * (res['bunched_share'] or 0):.2f}%, {res.get('cpu_us_per_stream') or 0:.0f} us CPU/stream, "
                    f"streams {res['streams']}, errors {res['errors']}, short {res['short']}")
            raw[f"streams_{level}"].append(row)
    return raw


# ---------------------------------------------------------------------- summary


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _span(values: list[float | None]) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None]
    return (min(vals), max(vals)) if vals else None


def _get(row: dict[str, Any], name: str, *keys: str) -> float | None:
    v: Any = row.get(name)
    for k in keys:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return float(v) if isinstance(v, (int, float)) else None


def summarize(raw: dict[str, Any], names: list[str], levels: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """Per target: medians over rounds; per translated target: the per-round ratios to
    its same-dialect reference (median and range) and the per-round added TTFT."""
    lo, hi = (raw.get(f"streams_{n}") or [] for n in levels)
    ns = raw.get("non_stream") or []
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        m: dict[str, Any] = {
            "cpu_us_per_req": _med([_get(r, name, "cpu_us_per_req") for r in ns]),
            "rps": _med([_get(r, name, "rps") for r in ns]),
            "non2xx": sum(int(_get(r, name, "non2xx") or 0) for r in ns),
            "cpu_us_per_stream": _med([_get(r, name, "cpu_us_per_stream") for r in lo]),
            "ttfb_p50_ms": _med([_get(r, name, "ttfb_ms", "p50") for r in lo]),
            "ttfb_p99_ms": _med([_get(r, name, "ttfb_ms", "p99") for r in lo]),
            "hi_ttfb_p50_ms": _med([_get(r, name, "ttfb_ms", "p50") for r in hi]),
            "hi_cpu_us_per_stream": _med([_get(r, name, "cpu_us_per_stream") for r in hi]),
            "stream_errors": sum(int(_get(r, name, "errors") or 0) for r in (*lo, *hi)),
            "short_streams": sum(int(_get(r, name, "short") or 0) for r in (*lo, *hi)),
        }
        bunched = [_get(r, name, "bunched_share") for r in hi]
        m["hi_bunched_pct"] = _med([100 * b if b is not None else None for b in bunched])
        m["hi_bunched_pct_span"] = _span([100 * b if b is not None else None for b in bunched])
        added = [_sub(_get(r, name, "ttfb_ms", "p50"), _get(r, DIRECT, "ttfb_ms", "p50")) for r in lo]
        m["added_ttfb_ms"], m["added_ttfb_ms_span"] = _med(added), _span(added)
        out[name] = m
    for trans, same in PAIRS:
        if trans not in out or same not in out:
            continue
        m = out[trans]
        for key, rounds, metric in (("ratio_cpu_req", ns, ("cpu_us_per_req",)), ("ratio_cpu_stream", lo, ("cpu_us_per_stream",)),
                                    ("ratio_cpu_stream_hi", hi, ("cpu_us_per_stream",))):
            ratios = [_div(_get(r, trans, *metric), _get(r, same, *metric)) for r in rounds]
            m[key], m[key + "_span"] = _med(ratios), _span(ratios)
        over = [_sub(_get(r, trans, "ttfb_ms", "p50"), _get(r, same, "ttfb_ms", "p50")) for r in lo]
        m["ttfb_over_same_ms"], m["ttfb_over_same_ms_span"] = _med(over), _span(over)
    return out


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _f(v: Any, digits: int = 1, span: Any = None) -> str:
    if v is None:
        return "n/a"
    text = f"{v:,.{digits}f}"
    if span is not None and span[0] != span[1]:
        text += f" ({span[0]:,.{digits}f}–{span[1]:,.{digits}f})"
    return text


def table(summary: dict[str, dict[str, Any]], levels: tuple[int, int]) -> str:
    lo, hi = levels
    head = ["target", "CPU us/req", "x same", f"CPU us/stream@{lo}", "x same", f"TTFT p50@{lo} ms",
            "added vs direct", f"bunched %@{hi}"]
    lines = [head]
    for name, m in summary.items():
        lines.append([
            name, _f(m["cpu_us_per_req"]), _f(m.get("ratio_cpu_req"), 2, m.get("ratio_cpu_req_span")),
            _f(m["cpu_us_per_stream"], 0), _f(m.get("ratio_cpu_stream"), 2, m.get("ratio_cpu_stream_span")),
            _f(m["ttfb_p50_ms"], 2), _f(m["added_ttfb_ms"], 2, m["added_ttfb_ms_span"]),
            _f(m["hi_bunched_pct"], 2, m["hi_bunched_pct_span"]),
        ])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = []
    for i, r in enumerate(lines):
        out.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def verdicts(summary: dict[str, dict[str, Any]]) -> list[str]:
    t = summary.get(P_TRANS)
    if t is None:
        return []
    checks = [
        ("CPU per translated request <= 2x same-dialect (non-stream)", t.get("ratio_cpu_req"), lambda v: v <= 2),
        ("CPU per translated stream <= 2x same-dialect", t.get("ratio_cpu_stream"), lambda v: v <= 2),
        ("translated stream adds <= 2 ms TTFT at the lower level (vs direct)", t.get("added_ttfb_ms"), lambda v: v <= 2),
        ("0 % bunched gaps at the higher level, translated", t.get("hi_bunched_pct"), lambda v: v == 0),
    ]
    return [f"{'n/a ' if v is None else 'PASS' if ok(v) else 'FAIL'}  {label}: {_f(v, 2)}" for label, v, ok in checks]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run that proves everything starts (no LiteLLM)")
    ap.add_argument("--no-litellm", action="store_true", help="llm-proxy only")
    ap.add_argument("--litellm", action="store_true", help="with LiteLLM even in a smoke run")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--levels", help="the two stream concurrencies, e.g. 50,200 (full default; smoke 5,20)")
    ap.add_argument("--streams-only", action="store_true", help="skip the non-streamed CPU measurement")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs: litellm.log, proxy.log)")
    ap.add_argument("--out", help="raw results JSON (default bench/results/last-translated.json; smoke: the temp dir)")
    ap.add_argument("--wait-quiet", type=float, default=None, help="seconds to wait for an idle machine (full default 120)")
    args = ap.parse_args(argv)
    p = Params.smoke() if args.smoke else Params.full()
    if args.rounds:
        p.rounds = args.rounds
    if args.levels:
        lo, hi = (int(x) for x in args.levels.split(","))
        p.levels = (lo, hi)
    with_litellm = not args.no_litellm and (args.litellm or not args.smoke)
    wait = args.wait_quiet if args.wait_quiet is not None else (0 if args.smoke else 120)
    if wait > 0:
        wait_quiet(wait)
    tmp = Path(tempfile.mkdtemp(prefix="llm-proxy-translated-"))
    (tmp / "data").mkdir()
    started: list[Started] = []
    raw: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "params": p.__dict__, "taskset": bool(TASKSET),
                           "python": sys.version.split()[0], "python_executable": PY}
    t0 = time.monotonic()
    try:
        upstream = start_upstream(tmp)
        started.append(upstream)
        key = create_key(tmp, upstream.port, "bench", limits=True)
        proxy = start_proxy(tmp, upstream.port)
        started.append(proxy)
        calls = [Call(DIRECT, upstream.port, None, "chat", "none"),
                 Call(P_SAME, proxy.port, proxy.pid, "chat", key),
                 Call(P_TRANS, proxy.port, proxy.pid, "messages", key)]
        if with_litellm:
            litellm, why = start_litellm(tmp, upstream.port)
            raw["litellm"] = {"version": litellm_version() if litellm else None, "skipped": why or None}
            if litellm is None:
                log(f"LiteLLM skipped: {why}")
            else:
                started.append(litellm)
                calls += [Call(L_SAME, litellm.port, litellm.pid, "chat", LITELLM_KEY),
                          Call(L_TRANS, litellm.port, litellm.pid, "messages", LITELLM_KEY)]
        for c in list(calls):
            for stream in (False, True):
                problem = probe(c, stream)
                if problem is not None:
                    log(f"{c.name} ({'stream' if stream else 'non-stream'}) does not answer as expected, left out: {problem}")
                    raw.setdefault("left_out", {})[c.name] = problem
                    calls.remove(c)
                    break
        log("targets: " + ", ".join(f"{c.name} :{c.port}" for c in calls) + f"  tmp {tmp}")
        raw["rounds"] = run_rounds(tmp, calls, p, non_streamed=not args.streams_only)
        raw["targets"] = [c.name for c in calls]
    finally:
        for s in reversed(started):
            s.stop()
        raw["seconds"] = round(time.monotonic() - t0, 1)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(raw["rounds"], raw["targets"], p.levels)
    raw["summary"] = summary
    out_path = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "llm-proxy-translated-smoke.json" if args.smoke
                                               else BENCH_DIR / "results" / "last-translated.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    lit = raw.get("litellm") or {}
    print(f"\nTranslated calls (Anthropic Messages client -> OpenAI-chat upstream), {'smoke run' if args.smoke else f'median of {p.rounds} rounds'}"
          f"{', LiteLLM ' + lit['version'] if lit.get('version') else ''}; (range over rounds); targets on core {PROXY_CORE}, "
          f"upstream + load on core {LOAD_CORE}\n")
    print(table(summary, p.levels))
    print()
    for line in verdicts(summary):
        print(line)
    foreign = [v for v in _foreign(raw["rounds"]) if v is not None]
    if foreign:
        print(f"\nother processes on the proxy core during measurements: median {statistics.median(foreign):.1f}%, "
              f"max {max(foreign):.1f}%")
    if lit.get("skipped"):
        print(f"\nLiteLLM not measured: {lit['skipped']}")
    for name, why in (raw.get("left_out") or {}).items():
        print(f"\n{name} left out: {why}")
    print(f"\nraw results: {out_path}  ({raw['seconds']} s)")
    return 0


def _foreign(rounds: dict[str, Any]) -> list[float | None]:
    return [res.get("core0_foreign_pct") for rows in rounds.values() for row in rows for res in row.values()]


if __name__ == "__main__":
    sys.exit(main())
