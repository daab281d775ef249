"""The llm-proxy benchmark: one command, every scenario, one table.

    python -m bench.run                 # the full run (~8 min on 2 cores)
    python -m bench.run --smoke         # a few seconds per scenario: proves it all starts
    python -m bench.run --out r.json    # where the raw results go (default bench/results/last-run.json)

One run starts, in processes of their own:
  * the bench upstream (bench/upstream.py, a raw-asyncio fake OpenAI server) on core 1,
  * llm-proxy (`python -m proxy serve --config bench/proxy-bench.yaml`) on core 0, with
    auth, limits and accounting on: SQLite store and spool in a temp dir, memory limits,
    access log on, and a key with rpm/tpm/max-parallel/budget limits set far out of reach,
  * nginx (when installed) on core 0 as the reference reverse proxy: one worker,
    `proxy_buffering off`, HTTP/1.1 keep-alive to the upstream, access log on,
and measures three targets side by side: `direct` (client → upstream), `llm-proxy` and
`nginx` (client → proxy → upstream). Load generators (wrk, bench/loadgen.py) run on
core 1 with the upstream, so the proxy under test has core 0 to itself.

Scenarios (each in rounds, 3 by default and 5 for a; targets alternate within a round,
order reversed every other round; the table shows the median over rounds):
  a. closed-loop throughput, wrk, 64 connections: req/s, proxy CPU time per request
     (utime+stime of the proxy process tree from /proc, before/after)
  b. open-loop 500 req/s: latency p50/p99 from the scheduled send time; added = target − direct
  c. 50 and 200 concurrent streams of 20 chunks 25 ms apart: time to first chunk (added vs
     direct) and the share of chunk gaps under a quarter of the cadence ("bunched")
  d. 1,000 open slow streams: (proxy RSS with them − RSS before) / 1,000
  e. idle RSS after start-up and one request
  plus (full run) middleware costs: the same proxy with a key without limits, with the
  access log off, and a bare `GET /healthz` (the data plane without a model call).

Missing wrk, nginx or taskset are reported and skipped (their cells print n/a).
A full run first waits (up to --wait-quiet s) for an idle machine, and every measurement
records how much CPU *other* processes took on the proxy's core; the table's footer says
when that was above 10% (re-run then: a busy neighbour makes every number worse).

Related tools: `python -m bench.ab` (two instances under the same load at once: an A/B
without the VM's drift), `python -m bench.gcwatch serve ...` (GC pause log),
`python -m bench.pyspy_top prof.txt`.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CONFIG = BENCH_DIR / "proxy-bench.yaml"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

PROXY_CORE, LOAD_CORE = 0, 1
CHAT_BODY = (
    '{"model":"%s","messages":[{"role":"system","content":"You are a helpful assistant."},'
    '{"role":"user","content":"Say hello to the benchmark in one short sentence, please."}],'
    '"max_tokens":64%s}'
)
STREAM_MODEL = "bench-c20-d25"
SLOW_MODEL = "bench-c120-d1000"
DIRECT, PROXY, NGINX = "direct", "llm-proxy", "nginx"
TARGETS = (DIRECT, PROXY, NGINX)
VARIANT_REDIS = "limits in Redis (scaled mode)"
VARIANT_BASE = "full (limits key, access log on)"


def chat_body(model: str = "bench", stream: bool = False) -> str:
    return CHAT_BODY % (model, ',"stream":true' if stream else "")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- processes


TASKSET = shutil.which("taskset")
WRK = shutil.which("wrk")
NGINX_BIN = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
REDIS_BIN = shutil.which("redis-server")


def pinned(core: int, cmd: list[str]) -> list[str]:
    return [TASKSET, "-c", str(core), *cmd] if TASKSET else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].decode().split()


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of the process tree (all threads), in seconds."""
    user = system = 0
    for p in tree(pid):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        user += int(f[11])
        system += int(f[12])
    return user / CLK_TCK, system / CLK_TCK


def rss_kb(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except OSError:
            continue
    return total


def core_busy_s(core: int) -> float:
    """Busy time of one CPU since boot, seconds: user+nice+system+irq+softirq+steal
    (softirq too: this kernel charges the loopback softirq work a proxy's send() causes
    to the proxy's stime, so leaving it out would show the proxy's own work as negative)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:9]]
                return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK
    return 0.0


class CpuWatch:
    """The target's CPU time during a measurement, and the CPU that *other* processes
    used on the proxy's core meanwhile (anything else running there skews the result)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.t0 = time.monotonic()
        self.split0 = cpu_split(pid) if pid else (0.0, 0.0)
        self.core0 = core_busy_s(PROXY_CORE)
        self.kernel_s: float | None = None  # of the target's CPU time, the part in the kernel (after stop)

    def stop(self) -> tuple[float | None, float | None]:
        elapsed = max(1e-3, time.monotonic() - self.t0)
        cpu = None
        if self.pid:
            user, system = cpu_split(self.pid)
            self.kernel_s = system - self.split0[1]
            cpu = user - self.split0[0] + self.kernel_s
        busy = core_busy_s(PROXY_CORE) - self.core0
        foreign = max(0.0, busy - (cpu or 0.0)) / elapsed * 100 if TASKSET else None
        return cpu, foreign


FOREIGN_LIMIT_PCT = 10.0
RETRIES = 2


def measured(t_pid: int | None, label: str, fn: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float | None]:
    """Run one measurement; repeat it (up to RETRIES times) when other processes took more
    than FOREIGN_LIMIT_PCT of the proxy core meanwhile. Returns (result, target CPU s)."""
    for attempt in range(RETRIES + 1):
        w = CpuWatch(t_pid)
        res = fn()
        cpu, foreign = w.stop()
        res["core0_foreign_pct"] = foreign
        res["attempts"] = attempt + 1
        res["cpu_kernel_s"] = w.kernel_s
        if foreign is None or foreign <= FOREIGN_LIMIT_PCT or attempt == RETRIES:
            return res, cpu
        log(f"{label}: other processes took {foreign:.0f}% of the proxy core; measuring again")
        time.sleep(3)
    raise AssertionError("unreachable")


def wait_quiet(max_wait_s: float, threshold_pct: float = 10.0) -> float:
    """Wait (bounded) until the machine is idle; returns the last busy % seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = sum(core_busy_s(c) for c in range(os.cpu_count() or 1))
        time.sleep(2)
        busy = (sum(core_busy_s(c) for c in range(os.cpu_count() or 1)) - b0) / 2 * 100
        if busy < threshold_pct or time.monotonic() >= deadline:
            return busy
        log(f"machine busy ({busy:.0f}% CPU from other processes); waiting to start")


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_upstream(tmp: Path) -> Started:
    port = free_port()
    proc = subprocess.Popen(
        pinned(LOAD_CORE, [PY, "-m", "bench.upstream", "--port", str(port)]),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "upstream.log", "wb"),
    )
    wait_port(port, 15, proc)
    return Started("upstream", proc, port)


def proxy_env(tmp: Path, upstream_port: int, proxy_port: int, access_log: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_DATA_DIR=str(tmp / "data"),
        BENCH_UPSTREAM_PORT=str(upstream_port),
        BENCH_PROXY_PORT=str(proxy_port),
        BENCH_ACCESS_LOG="true" if access_log else "false",
    )
    env.pop("LLM_PROXY_CONFIG", None)
    return env


def create_key(tmp: Path, upstream_port: int, name: str, limits: bool) -> str:
    args = [PY, "-m", "proxy", "keys", "create", "--config", str(CONFIG), "--name", name, "--json"]
    if limits:
        args += ["--rpm", "1000000000", "--tpm", "1000000000000", "--max-parallel", "100000",
                 "--budget-usd", "1000000000", "--budget-period", "month"]
    out = subprocess.run(args, cwd=REPO, env=proxy_env(tmp, upstream_port, 0), capture_output=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"keys create failed: {out.stderr.decode()[-2000:]}")
    return orjson.loads(out.stdout)["key"]


def start_proxy(
    tmp: Path, upstream_port: int, *, access_log: bool = True, tag: str = "proxy", module: str = "proxy",
    env: dict[str, str] | None = None, cwd: Path | None = None,
) -> Started:
    """llm-proxy on core 0 (`module` may be bench.gcwatch: same CLI; `cwd`: another
    checkout's, whose `proxy` package `python -m` then runs)."""
    port = free_port()
    proc = subprocess.Popen(
        pinned(PROXY_CORE, [PY, "-m", module, "serve", "--config", str(CONFIG)]),
        cwd=cwd or REPO,
        env={**proxy_env(tmp, upstream_port, port, access_log), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"{tag}.log", "wb"),
    )
    wait_ready(port, proc, 30, 15)
    return Started(tag, proc, port)


def wait_ready(port: int, proc: subprocess.Popen[bytes], listen_s: float, ready_s: float, poll_s: float = 0.05) -> bool:
    """Wait for llm-proxy to listen, then (bounded) for /readyz to answer 200."""
    wait_port(port, listen_s, proc)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        try:
            if http_get(port, "/readyz") == 200:
                return True
        except OSError:
            pass
        time.sleep(poll_s)
    return False


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    keepalive_requests 1000000;
    upstream bench {{
        server 127.0.0.1:{upstream};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(tmp: Path, upstream_port: int) -> Started | None:
    if NGINX_BIN is None:
        return None
    prefix = tmp / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, tmp=prefix, upstream=upstream_port, port=port))
    cmd = [NGINX_BIN, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return _start_optional("nginx", pinned(PROXY_CORE, cmd), port, prefix / "stderr.log")


def start_redis(tmp: Path) -> Started | None:
    """A throwaway redis-server (no persistence) on the load core, like the upstream: a
    service llm-proxy uses, not part of what is measured."""
    if REDIS_BIN is None:
        return None
    port = free_port()
    cmd = [REDIS_BIN, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    return _start_optional("redis", pinned(LOAD_CORE, cmd), port, tmp / "redis.log")


def _start_optional(name: str, cmd: list[str], port: int, log_path: Path) -> Started | None:
    """A process the bench can do without: None, and a line saying why, if it does not listen."""
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, 15, proc)
    except RuntimeError as exc:
        log(f"{name} did not start ({exc}); see {log_path}")
        Started(name, proc, port).stop()
        return None
    return Started(name, proc, port)


def http_get(port: int, path: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def http_post(port: int, path: str, body: str, key: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("POST", path, body.encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


# ---------------------------------------------------------------------- load tools


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk_script(tmp: Path, key: str, method: str = "POST") -> Path:
    path = tmp / f"wrk-{abs(hash((key, method)))}.lua"
    if method == "POST":
        body = chat_body().replace("'", "\\'")
        path.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = '{body}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        )
    else:
        path.write_text('wrk.method = "GET"\n')
    return path


def run_wrk(port: int, script: Path, conns: int, duration: float, path: str = "/v1/chat/completions") -> dict[str, Any]:
    assert WRK is not None
    cmd = pinned(LOAD_CORE, [WRK, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script),
                             f"http://127.0.0.1:{port}{path}"])
    out = subprocess.run(cmd, capture_output=True, timeout=duration + 60).stdout.decode()
    res: dict[str, Any] = {"raw": out}
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out):
        res["requests"] = int(m.group(1))
        res["seconds"] = _ms(m.group(2) + m.group(3)) / 1000
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    for p in ("50", "90", "99"):
        if m := re.search(rf"^\s+{p}%\s+(\S+)", out, re.M):
            res[f"p{p}_ms"] = _ms(m.group(1))
    return res


def run_loadgen(mode: str, port: int, key: str, body: str, *extra: str, timeout: float = 120) -> dict[str, Any]:
    cmd = pinned(LOAD_CORE, [PY, "-m", "bench.loadgen", mode, "--port", str(port), "--key", key, "--body", body, *extra])
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {mode} failed: {out.stderr.decode()[-2000:]}")
    return orjson.loads(out.stdout.decode().strip().splitlines()[-1])


# ---------------------------------------------------------------------- the run


@dataclass
class Params:
    rounds: int
    a_rounds: int         # scenario a's CPU per request swings most on this VM: more rounds
    a_seconds: float
    a_conns: int
    b_rate: float
    b_seconds: float
    c_levels: tuple[int, int]
    c_seconds: float
    d_streams: int
    d_rounds: int
    variants: bool

    @classmethod
    def full(cls) -> "Params":
        return cls(rounds=3, a_rounds=5, a_seconds=10, a_conns=64, b_rate=500, b_seconds=10, c_levels=(50, 200),
                   c_seconds=8, d_streams=1000, d_rounds=2, variants=True)

    @classmethod
    def smoke(cls) -> "Params":
        return cls(rounds=1, a_rounds=1, a_seconds=1, a_conns=8, b_rate=100, b_seconds=1.5, c_levels=(5, 20),
                   c_seconds=1, d_streams=20, d_rounds=1, variants=False)


@dataclass
class Target:
    name: str
    port: int
    pid: int | None       # the process whose CPU and memory are measured (None: direct)
    key: str


@dataclass
class Bench:
    tmp: Path
    params: Params
    targets: list[Target]
    raw: dict[str, Any] = field(default_factory=dict)

    def order(self, rnd: int, names: Iterable[str] | None = None) -> list[Target]:
        ts = [t for t in self.targets if names is None or t.name in names]
        return ts if rnd % 2 == 0 else ts[::-1]

    def by_name(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)

    # -- e: idle RSS ---------------------------------------------------------------
    def scenario_e(self) -> None:
        res: dict[str, Any] = {}
        for t in self.targets:
            status = http_post(t.port, "/v1/chat/completions", chat_body(), t.key)
            if t.pid is not None:
                time.sleep(0.5)
                res[t.name] = {"status": status, "rss_kb": rss_kb(t.pid)}
            else:
                res[t.name] = {"status": status}
        self.raw["e_idle"] = res

    # -- d: memory per open stream ----------------------------------------------------
    def scenario_d(self) -> None:
        n = self.params.d_streams
        rounds: list[dict[str, Any]] = []
        # The baseline is the RSS before the first round: a Python process keeps (and
        # reuses) the memory of round 1, so "RSS before round 2" would hide the cost.
        time.sleep(0.5)
        baseline = {t.name: rss_kb(t.pid) for t in self.targets if t.pid is not None}
        for r in range(self.params.d_rounds):
            row: dict[str, Any] = {}
            for t in self.order(r, (PROXY, NGINX)):
                if t.pid is None:
                    continue
                time.sleep(0.5)
                before = baseline[t.name]
                row_before_this_round = rss_kb(t.pid)
                cmd = pinned(LOAD_CORE, [PY, "-m", "bench.loadgen", "hold", "--port", str(t.port), "--key", t.key,
                                         "--body", chat_body(SLOW_MODEL, stream=True), "--concurrency", str(n),
                                         "--timeout", "60", "--hold-max", "90"])
                proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                ready = _read_ready(proc, 90)
                samples = []
                for _ in range(4):
                    time.sleep(0.5)
                    samples.append(rss_kb(t.pid))
                w = CpuWatch(t.pid)
                time.sleep(1.0)
                idle_cpu, _ = w.stop()
                out, err = proc.communicate(input=b"stop\n", timeout=60)
                summary = orjson.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {"error": err.decode()[-500:]}
                with_streams = max(samples)
                row[t.name] = {
                    "streams_open": ready,
                    "rss_before_kb": before,
                    "rss_before_this_round_kb": row_before_this_round,
                    "rss_with_kb": with_streams,
                    "samples_kb": samples,
                    "kb_per_stream": (with_streams - before) / max(1, ready),
                    "cpu_s_per_s_holding": idle_cpu,
                    "client": summary,
                }
                log(f"d round {r + 1} {t.name}: {ready} streams, {(with_streams - before) / max(1, ready):.1f} KB/stream")
            rounds.append(row)
        self.raw["d_streams_memory"] = rounds

    # -- c: streams -------------------------------------------------------------------
    def scenario_c(self) -> None:
        p = self.params
        out: dict[str, Any] = {}
        for level in p.c_levels:
            rounds = []
            for r in range(p.rounds):
                row = {}
                for t in self.order(r):
                    res, cpu = measured(t.pid, f"c{level} {t.name}", lambda: run_loadgen(
                        "streams", t.port, t.key, chat_body(STREAM_MODEL, stream=True),
                        "--concurrency", str(level), "--duration", str(p.c_seconds),
                        "--chunks", "20", "--cadence-ms", "25", timeout=p.c_seconds + 60))
                    if cpu is not None:
                        res["cpu_us_per_stream"] = cpu * 1e6 / max(1, res["all_streams"])
                    row[t.name] = res
                    log(f"c{level} round {r + 1} {t.name}: ttfb p50 {res['ttfb_ms']['p50']:.2f} ms, "
                        f"bunched {100 * (res['bunched_share'] or 0):.2f}%, streams {res['streams']}, errors {res['errors']}")
                rounds.append(row)
            out[str(level)] = rounds
        self.raw["c_streams"] = out

    # -- b: latency at a fixed rate ------------------------------------------------------
    def scenario_b(self) -> None:
        p = self.params
        rounds = []
        for r in range(p.rounds):
            row = {}
            for t in self.order(r):
                res, cpu = measured(t.pid, f"b {t.name}", lambda: run_loadgen(
                    "rate", t.port, t.key, chat_body(), "--rate", str(p.b_rate),
                    "--duration", str(p.b_seconds), "--warmup", str(min(1.0, p.b_seconds / 4)),
                    timeout=p.b_seconds + 60))
                if cpu is not None:
                    res["cpu_us_per_req"] = cpu * 1e6 / max(1, res["ok"])
                row[t.name] = res
                lat = res["latency_ms"]
                log(f"b round {r + 1} {t.name}: p50 {lat['p50']:.3f} ms p99 {lat['p99']:.3f} ms, ok {res['ok']}, errors {res['errors']}")
            rounds.append(row)
        self.raw["b_latency"] = rounds

    # -- a: throughput ---------------------------------------------------------------------
    def scenario_a(self) -> None:
        p = self.params
        if WRK is None:
            log("wrk not installed: scenario a skipped")
            self.raw["a_throughput"] = None
            return
        scripts = {t.name: wrk_script(self.tmp, t.key) for t in self.targets}
        for t in self.targets:   # warm-up, not recorded
            run_wrk(t.port, scripts[t.name], p.a_conns, min(2, p.a_seconds))
        rounds = []
        for r in range(p.a_rounds):
            row = {}
            for t in self.order(r):
                row[t.name] = self._wrk_cpu(t, scripts[t.name], p.a_conns, p.a_seconds)
                log(f"a round {r + 1} {t.name}: {row[t.name].get('rps', 0):.0f} req/s, "
                    f"{row[t.name].get('cpu_us_per_req') or 0:.1f} us CPU/req, non-2xx {row[t.name]['non2xx']}")
            rounds.append(row)
        self.raw["a_throughput"] = rounds

    def _wrk_cpu(self, t: Target, script: Path, conns: int, seconds: float, path: str = "/v1/chat/completions") -> dict[str, Any]:
        res, cpu = measured(t.pid, f"wrk {t.name} {path}", lambda: run_wrk(t.port, script, conns, seconds, path))
        if cpu is not None and res.get("requests"):
            res["cpu_s"] = cpu
            res["cpu_us_per_req"] = cpu * 1e6 / res["requests"]
            res["cpu_kernel_us_per_req"] = res["cpu_kernel_s"] * 1e6 / res["requests"]
        res.pop("raw", None) if res.get("rps") else None
        return res

    # -- middleware costs --------------------------------------------------------------------
    def scenario_variants(self, proxy: Started, upstream_port: int, key_full: str, key_plain: str) -> list[Started]:
        """llm-proxy alone: full key, key without limits, GET /healthz, the access log off,
        and (with redis-server installed) the limits in Redis. Fresh instances of the same
        age (log on, log off, Redis limits) replace the one the scenarios used, so no
        variant inherits another's state; every round measures the full configuration too,
        and the cost of a part is the median of the per-round differences (this VM drifts
        within minutes). Returns what it started (the caller stops them)."""
        p = self.params
        if WRK is None:
            self.raw["variants"] = None
            return []
        proxy.stop()
        on = start_proxy(self.tmp, upstream_port, tag="proxy-variants")
        off = start_proxy(self.tmp, upstream_port, access_log=False, tag="proxy-nolog")
        started = [on, off]
        get = wrk_script(self.tmp, "", "GET")
        full, plain = wrk_script(self.tmp, key_full), wrk_script(self.tmp, key_plain)
        t_on, t_off = Target(PROXY, on.port, on.pid, key_full), Target(PROXY, off.port, off.pid, key_full)
        chat = "/v1/chat/completions"
        plan = [(VARIANT_BASE, t_on, full, chat),
                ("key without limits", t_on, plain, chat),
                ("GET /healthz (data plane, no model call)", t_on, get, "/healthz"),
                ("access log off", t_off, full, chat),
                ("access log off, key without limits", t_off, plain, chat)]
        redis = start_redis(self.tmp)
        if redis is not None:
            try:
                scaled = start_proxy(self.tmp, upstream_port, tag="proxy-redis",
                                     env={"BENCH_LIMITS_URL": f"redis://127.0.0.1:{redis.port}/0"})
            except BaseException:
                redis.stop()
                raise
            started += [scaled, redis]
            plan.append((VARIANT_REDIS, Target(PROXY, scaled.port, scaled.pid, key_full), full, chat))
        for t in {id(t): t for _, t, _, _ in plan}.values():
            run_wrk(t.port, full, p.a_conns, 2)   # warm: pools, caches, the spend seed
        rows: dict[str, list[dict[str, Any]]] = {}
        for r in range(p.rounds):
            for label, target, script, path in (plan if r % 2 == 0 else plan[::-1]):
                # Redis's own CPU is not the gateway's (it runs on the load core), but it is
                # what one Redis can serve: recorded beside the row.
                redis_cpu = cpu_split(redis.pid) if redis is not None and label == VARIANT_REDIS else None
                res = self._wrk_cpu(target, script, p.a_conns, p.a_seconds, path)
                if redis_cpu is not None and redis is not None and res.get("requests"):
                    res["redis_cpu_us_per_req"] = (sum(cpu_split(redis.pid)) - sum(redis_cpu)) * 1e6 / res["requests"]
                rows.setdefault(label, []).append(res)
                log(f"variant round {r + 1} {label}: {res.get('rps', 0):.0f} req/s, "
                    f"{res.get('cpu_us_per_req') or 0:.1f} us CPU/req")
        self.raw["variants"] = rows
        return started


def _read_ready(proc: subprocess.Popen[bytes], timeout: float) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            data = os.read(fd, 4096)
            if not data:
                break
            buf += data
            if m := re.search(rb"READY (\d+)", buf):
                return int(m.group(1))
    return 0


# ---------------------------------------------------------------------- summary and table


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(raw: dict[str, Any], params: Params) -> dict[str, dict[str, float | None]]:
    s: dict[str, dict[str, float | None]] = {t: {} for t in TARGETS}

    def over_rounds(rounds: list[dict[str, Any]] | None, target: str, get: Callable[[dict[str, Any], dict[str, Any]], float | None]) -> float | None:
        if not rounds:
            return None
        vals = []
        for row in rounds:
            if target in row:
                try:
                    vals.append(get(row[target], row))
                except (KeyError, TypeError):
                    vals.append(None)
        return _median(vals)

    a = raw.get("a_throughput")
    b = raw.get("b_latency")
    c = raw.get("c_streams") or {}
    d = raw.get("d_streams_memory")
    e = raw.get("e_idle") or {}
    lo, hi = (str(x) for x in params.c_levels)
    for t in TARGETS:
        m = s[t]
        m["a_rps"] = over_rounds(a, t, lambda x, row: x["rps"] if not x["non2xx"] and not x["socket_errors"] else None)
        m["a_cpu_us"] = over_rounds(a, t, lambda x, row: x.get("cpu_us_per_req"))
        m["a_kernel_us"] = over_rounds(a, t, lambda x, row: x.get("cpu_kernel_us_per_req"))
        m["a_p99_ms"] = over_rounds(a, t, lambda x, row: x.get("p99_ms"))
        m["b_p50_ms"] = over_rounds(b, t, lambda x, row: x["latency_ms"]["p50"])
        m["b_p99_ms"] = over_rounds(b, t, lambda x, row: x["latency_ms"]["p99"])
        m["b_added_p50_ms"] = over_rounds(b, t, lambda x, row: x["latency_ms"]["p50"] - row[DIRECT]["latency_ms"]["p50"])
        m["b_added_p99_ms"] = over_rounds(b, t, lambda x, row: x["latency_ms"]["p99"] - row[DIRECT]["latency_ms"]["p99"])
        m["b_cpu_us"] = over_rounds(b, t, lambda x, row: x.get("cpu_us_per_req"))
        for tag, level in (("c_lo", lo), ("c_hi", hi)):
            rounds = c.get(level)
            m[f"{tag}_ttfb_p50_ms"] = over_rounds(rounds, t, lambda x, row: x["ttfb_ms"]["p50"])
            m[f"{tag}_ttfb_p99_ms"] = over_rounds(rounds, t, lambda x, row: x["ttfb_ms"]["p99"])
            m[f"{tag}_added_ttfb_ms"] = over_rounds(rounds, t, lambda x, row: x["ttfb_ms"]["p50"] - row[DIRECT]["ttfb_ms"]["p50"])
            m[f"{tag}_bunched_pct"] = over_rounds(rounds, t, lambda x, row: 100 * x["bunched_share"] if x["bunched_share"] is not None else None)
            m[f"{tag}_cpu_us_stream"] = over_rounds(rounds, t, lambda x, row: x.get("cpu_us_per_stream"))
        m["d_kb_per_stream"] = over_rounds(d, t, lambda x, row: x["kb_per_stream"] if x["streams_open"] else None)
        m["e_idle_rss_mb"] = e[t]["rss_kb"] / 1024 if t in e and "rss_kb" in e[t] else None
        if t == DIRECT:
            for k in ("b_added_p50_ms", "b_added_p99_ms", "c_lo_added_ttfb_ms", "c_hi_added_ttfb_ms"):
                m[k] = 0.0 if m[k] is not None else None
    return s


def foreign_load(raw: Any) -> list[float]:
    """Every measurement's foreign CPU % on the proxy core (see CpuWatch)."""
    out: list[float] = []
    if isinstance(raw, dict):
        for k, v in raw.items():
            if k == "core0_foreign_pct" and isinstance(v, (int, float)):
                out.append(float(v))
            else:
                out.extend(foreign_load(v))
    elif isinstance(raw, list):
        for v in raw:
            out.extend(foreign_load(v))
    return out


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or (a <= 0 and b <= 0):
        return "n/a"
    if b < 0:
        return "n/a"
    return f"{a / b:.2f}x"


def table(summary: dict[str, dict[str, float | None]], params: Params) -> str:
    lo, hi = params.c_levels
    P, N, D = summary[PROXY], summary[NGINX], summary[DIRECT]
    rows: list[tuple[str, str, int, str, Callable[[], bool | None]]] = [
        # label, metric, digits, target text, pass check
        (f"a  req/s, {params.a_conns} conns (wrk)", "a_rps", 0, "", lambda: None),
        ("a  proxy CPU us/request", "a_cpu_us", 1, "<= 6x nginx",
         lambda: None if P["a_cpu_us"] is None or N["a_cpu_us"] is None else P["a_cpu_us"] <= 6 * N["a_cpu_us"]),
        ("a  of which in the kernel", "a_kernel_us", 1, "", lambda: None),
        ("a  latency p99 ms (wrk)", "a_p99_ms", 2, "", lambda: None),
        (f"b  p50 ms @ {params.b_rate:g} req/s", "b_p50_ms", 3, "", lambda: None),
        (f"b  p99 ms @ {params.b_rate:g} req/s", "b_p99_ms", 3, "", lambda: None),
        ("b  added p50 ms", "b_added_p50_ms", 3, "<= 1 ms",
         lambda: None if P["b_added_p50_ms"] is None else P["b_added_p50_ms"] <= 1),
        ("b  added p99 ms", "b_added_p99_ms", 3, "", lambda: None),
        (f"b  proxy CPU us/request @ {params.b_rate:g}/s", "b_cpu_us", 1, "", lambda: None),
        (f"c  TTFB p50 ms, {lo} streams", "c_lo_ttfb_p50_ms", 2, "", lambda: None),
        (f"c  added TTFB p50 ms, {lo} streams", "c_lo_added_ttfb_ms", 2, "<= 2 ms",
         lambda: None if P["c_lo_added_ttfb_ms"] is None else P["c_lo_added_ttfb_ms"] <= 2),
        (f"c  bunched gaps %, {lo} streams", "c_lo_bunched_pct", 2, "", lambda: None),
        (f"c  TTFB p50 ms, {hi} streams", "c_hi_ttfb_p50_ms", 2, "", lambda: None),
        (f"c  TTFB p99 ms, {hi} streams", "c_hi_ttfb_p99_ms", 2, "", lambda: None),
        (f"c  added TTFB p50 ms, {hi} streams", "c_hi_added_ttfb_ms", 2, "", lambda: None),
        (f"c  bunched gaps %, {hi} streams", "c_hi_bunched_pct", 2, "<= 1 %",
         lambda: None if P["c_hi_bunched_pct"] is None else P["c_hi_bunched_pct"] <= 1),
        (f"c  proxy CPU us/stream, {hi} streams", "c_hi_cpu_us_stream", 0, "", lambda: None),
        (f"d  KB per open stream ({params.d_streams})", "d_kb_per_stream", 1, "<= 50 KB",
         lambda: None if P["d_kb_per_stream"] is None else P["d_kb_per_stream"] <= 50),
        ("e  idle RSS MB", "e_idle_rss_mb", 1, "<= 80 MB",
         lambda: None if P["e_idle_rss_mb"] is None else P["e_idle_rss_mb"] <= 80),
    ]
    head = ["metric", DIRECT, PROXY, NGINX, "proxy/direct", "proxy/nginx", "target", "ok"]
    lines = [head]
    for label, key, digits, target, check in rows:
        ok = check()
        lines.append([
            label, _fmt(D[key], digits), _fmt(P[key], digits), _fmt(N[key], digits),
            _ratio(P[key], D[key]), _ratio(P[key], N[key]), target,
            "" if not target else ("n/a" if ok is None else ("PASS" if ok else "FAIL")),
        ])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = []
    for i, r in enumerate(lines):
        out.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def variants_table(raw: dict[str, Any]) -> str | None:
    rows = raw.get("variants")
    if not rows:
        return None
    base = [r.get("cpu_us_per_req") for r in rows.get(VARIANT_BASE, [])]
    lines = [["llm-proxy variant", "req/s", "CPU us/req", "vs full (paired)"]]
    for label, results in rows.items():
        rps = _median([r.get("rps") for r in results])
        cpu = [r.get("cpu_us_per_req") for r in results]
        # Differences within a round, then their median: the VM's drift cancels out.
        diffs = [c - b for c, b in zip(cpu, base) if c is not None and b is not None]
        delta = "" if label == VARIANT_BASE or not diffs else f"{statistics.median(diffs):+.1f} us"
        lines.append([label, _fmt(rps, 0), _fmt(_median(cpu), 1), delta])
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    out = []
    for i, r in enumerate(lines):
        out.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    redis_cpu = _median([r.get("redis_cpu_us_per_req") for r in rows.get(VARIANT_REDIS, [])])
    if redis_cpu is not None:
        out.append(f"(redis-server itself, on the load core: {redis_cpu:,.1f} us CPU per request of that row)")
    return "\n".join(out)


def python_build() -> str:
    """How this interpreter is linked. llm-proxy runs under the interpreter that runs the
    bench (sys.executable), and its build changes the gateway's CPU per request: Debian's
    python3 (static, PGO + LTO, like the official python images) against a default pyenv
    build (shared libpython, no PGO); see RESULTS.md."""
    try:
        with open("/proc/self/maps") as maps:
            shared = any("libpython" in line for line in maps)
    except OSError:
        return "unknown"
    return "shared libpython" if shared else "static libpython"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp
    import uvloop

    nginx_version = None
    if NGINX_BIN:
        r = subprocess.run([NGINX_BIN, "-v"], capture_output=True)
        nginx_version = r.stderr.decode().strip().split("/")[-1]
    wrk_version = None
    if WRK:
        r = subprocess.run([WRK, "-v"], capture_output=True)
        wrk_version = (r.stdout + r.stderr).decode().split("\n")[0].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "python_build": python_build(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "orjson": orjson.__version__,
        "nginx": nginx_version,
        "wrk": wrk_version,
        "taskset": bool(TASKSET),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="llm-proxy benchmark (see bench/RESULTS.md)")
    ap.add_argument("--smoke", "--quick", action="store_true", help="a tiny run that proves everything starts")
    ap.add_argument("--out", help="raw results JSON (default bench/results/last-run.json; smoke: the temp dir)")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (full default 3; 5 for scenario a)")
    ap.add_argument("--seconds", type=float, help="seconds per throughput/latency run (full default 10)")
    ap.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    ap.add_argument("--no-variants", action="store_true", help="skip the middleware-cost runs")
    ap.add_argument("--only", default="edcbav", help="scenarios to run, e.g. 'ab'; v = middleware costs (default all: edcbav)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, SQLite db)")
    ap.add_argument("--wait-quiet", type=float, default=None,
                    help="seconds to wait for an idle machine before starting (full default 600, smoke 0)")
    args = ap.parse_args(argv)

    params = Params.smoke() if args.smoke else Params.full()
    if args.rounds:
        params.rounds = params.a_rounds = args.rounds
        params.d_rounds = min(params.d_rounds, args.rounds)
    if args.seconds:
        params.a_seconds = params.b_seconds = args.seconds
    if args.no_variants:
        params.variants = False

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    missing = [name for name, path in (("taskset", TASKSET), ("wrk", WRK), ("nginx", NGINX_BIN), ("redis-server", REDIS_BIN)) if not path]
    if missing:
        log(f"not installed, skipped: {', '.join(missing)}")
    if (os.cpu_count() or 1) < 2:
        log("fewer than 2 CPUs: pinning is meaningless, numbers will be pessimistic")

    wait = args.wait_quiet if args.wait_quiet is not None else (0 if args.smoke else 600)
    if wait > 0:
        busy = wait_quiet(wait)
        if busy >= 10:
            log(f"starting anyway; the machine is {busy:.0f}% busy with other work")
    tmp = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-"))
    (tmp / "data").mkdir()
    started: list[Started] = []
    raw: dict[str, Any] = {"machine": machine(), "params": params.__dict__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])])}
    t_start = time.monotonic()
    try:
        upstream = start_upstream(tmp)
        started.append(upstream)
        key = create_key(tmp, upstream.port, "bench", limits=True)
        key_plain = create_key(tmp, upstream.port, "bench-nolimits", limits=False)
        proxy = start_proxy(tmp, upstream.port)
        started.append(proxy)
        nginx = None if args.no_nginx else start_nginx(tmp, upstream.port)
        if nginx is not None:
            started.append(nginx)
        targets = [Target(DIRECT, upstream.port, None, key), Target(PROXY, proxy.port, proxy.pid, key)]
        if nginx is not None:
            targets.append(Target(NGINX, nginx.port, nginx.pid, key))
        log(f"upstream :{upstream.port}  llm-proxy :{proxy.port} (pid {proxy.pid})"
            + (f"  nginx :{nginx.port} (pid {nginx.pid})" if nginx else "  nginx n/a") + f"  tmp {tmp}")
        raw["targets"] = [t.name for t in targets]
        bench = Bench(tmp, params, targets, raw)
        for name in "edcba":
            if name in args.only:
                log(f"scenario {name}")
                getattr(bench, f"scenario_{name}")()
        if params.variants and "v" in args.only:
            log("middleware costs")
            started += bench.scenario_variants(proxy, upstream.port, key, key_plain)
    finally:
        for s in reversed(started):
            s.stop()
        raw["seconds"] = round(time.monotonic() - t_start, 1)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(raw, params)
    raw["summary"] = summary
    out_path = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "llm-proxy-bench-smoke.json" if args.smoke
                                               else BENCH_DIR / "results" / "last-run.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    m = raw["machine"]
    print(f"\nllm-proxy benchmark — {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']} "
          f"({m['python_executable']}, {m['python_build']}), aiohttp {m['aiohttp']}, "
          f"nginx {m['nginx'] if NGINX in raw.get('targets', ()) else 'n/a'}; {'smoke run' if args.smoke else f'median of {params.rounds} rounds (a: {params.a_rounds})'}; "
          f"proxy on core {PROXY_CORE}, upstream + load on core {LOAD_CORE}\n")
    print(table(summary, params))
    vt = variants_table(raw)
    if vt:
        print("\nMiddleware costs (llm-proxy alone, wrk, same load as a):\n")
        print(vt)
    foreign = foreign_load({k: v for k, v in raw.items() if k != "summary"})
    if foreign:
        bad = sum(f > 10 for f in foreign)
        print(f"\nother processes on the proxy core during measurements: median {statistics.median(foreign):.1f}%, "
              f"max {max(foreign):.1f}% of the core" + (f"; {bad} of {len(foreign)} measurements above 10%: "
                                                       "the machine was not quiet, re-run for clean numbers" if bad else ""))
    print(f"\nraw results: {out_path}  ({raw['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
