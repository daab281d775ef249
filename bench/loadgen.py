"""Load clients for the benchmark: raw asyncio protocol over keep-alive HTTP/1.1 (uvloop).

Three modes, each prints one JSON document on stdout (`hold` also prints `READY n`):

* ``rate``: open loop at a fixed rate. A ticker thread sleeps (clock_nanosleep, sub-ms
  precision) until each scheduled send time and hands the tick to the event loop; the
  request goes out on an idle keep-alive connection, or a new one (so a slow target
  never slows the schedule down). Latency is taken from the *scheduled* send time to
  the last response byte (so queueing behind a stall counts), and also from the actual
  send time.
* ``streams``: C workers, each running streams back to back on its own connection;
  starts are staggered over one stream's length so that C streams are in flight in the
  steady state (not a thundering herd). Per stream: time to the first content chunk
  from the send, and the gaps between consecutive content chunks (a gap under a quarter
  of the cadence is "bunched"). Content chunks are recognised by the bench upstream's
  content marker, whatever the HTTP framing.
* ``hold``: open C slow streams, print ``READY n`` once every one has received its
  first content chunk, keep them open until stdin closes (or a line arrives), then close
  them all.

Run with ``python -m bench.loadgen MODE --host H --port P ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import threading
import time
from typing import Any, Callable

import orjson

CONTENT_MARKER = b'{"content":" token"}'
_CHUNKED_END = b"\r\n0\r\n\r\n"
perf = time.perf_counter


def percentiles(values: list[float], ps: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float | None]:
    if not values:
        return {f"p{p:g}": None for p in ps} | {"max": None, "mean": None, "n": 0}
    s = sorted(values)
    out: dict[str, Any] = {}
    for p in ps:
        k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
        out[f"p{p:g}"] = s[k]
    out["max"] = s[-1]
    out["mean"] = sum(s) / len(s)
    out["n"] = len(s)
    return out


def build_request(host: str, port: int, path: str, body: bytes, key: str, extra: list[str] | None = None) -> bytes:
    """An empty `key` sends no Authorization header (an Anthropic client sends x-api-key: `extra`)."""
    lines = (f"Authorization: Bearer {key}\r\n" if key else "") + "".join(f"{h}\r\n" for h in extra or ())
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"{lines}User-Agent: llm-proxy-bench\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time.

    `on_content(t)` is called for every content chunk marker seen (stream mode), with the
    perf_counter time of the read that carried it; `on_done(ok, t)` once per response.
    `marker` (under 32 bytes) is what marks a content chunk: the bench upstream's chat
    delta by default; `--marker` sets another for targets that answer in another dialect.
    """

    marker = CONTENT_MARKER

    def __init__(self, on_lost: Callable[["Conn"], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._on_lost = on_lost
        self._reset(None, None)

    def _reset(self, on_done: Callable[[bool, float], None] | None, on_content: Callable[[float], None] | None) -> None:
        self.on_done = on_done
        self.on_content = on_content
        self.head = b""
        self.in_body = False
        self.status = 0
        self.clen = -1
        self.got = 0
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_done is not None:
            done, self.on_done = self.on_done, None
            done(False, perf())
        if self._on_lost is not None:
            self._on_lost(self)

    def send(self, data: bytes, on_done: Callable[[bool, float], None], on_content: Callable[[float], None] | None = None) -> None:
        self._reset(on_done, on_content)
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        now = perf()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.in_body = True
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.status = 0
            low = head.lower()
            i = low.find(b"\r\ncontent-length:")
            if i >= 0:
                j = low.find(b"\r\n", i + 2)
                self.clen = int(low[i + 17 : j if j >= 0 else len(low)].strip())
            self.tail = b"\r\n"
        if self.on_content is not None and data:
            marker = self.marker
            window = self.tail[-(len(marker) - 1) :] + data
            n = window.count(marker)
            for _ in range(n):
                self.on_content(now)
        if self.clen >= 0:
            self.got += len(data)
            finished = self.got >= self.clen
        else:
            window = self.tail[-6:] + data
            finished = window.endswith(_CHUNKED_END) or (self.got == 0 and window == _CHUNKED_END)
            self.got += len(data)
        self.tail = (self.tail + data)[-32:]
        if finished and self.on_done is not None:
            done, self.on_done = self.on_done, None
            ok = self.status == 200
            self.in_body = False
            self.head = b""
            done(ok, now)


async def connect(host: str, port: int, on_lost: Callable[[Conn], None] | None = None) -> Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Conn(on_lost), host, port)
    return proto


# ---------------------------------------------------------------------- rate


async def run_rate(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    req = build_request(args.host, args.port, args.path, args.body.encode(), args.key, args.header)
    idle: list[Conn] = []
    lat_sched: list[float] = []
    lat_send: list[float] = []
    late: list[float] = []
    stats = {"sent": 0, "ok": 0, "errors": 0, "connects": 0, "dropped": 0}
    outstanding = 0
    finished = asyncio.Event()
    total = int(args.rate * args.duration)
    warm_until = int(args.warmup * args.rate)   # the first sends warm connections up
    ticks_done = False

    for _ in range(args.conns):
        idle.append(await connect(args.host, args.port))
        stats["connects"] += 1

    def complete(conn: Conn, sched: float, sent: float, i: int) -> Callable[[bool, float], None]:
        def done(ok: bool, t: float) -> None:
            nonlocal outstanding
            outstanding -= 1
            if ok:
                stats["ok"] += 1
                if i >= warm_until:
                    lat_sched.append((t - sched) * 1000)
                    lat_send.append((t - sent) * 1000)
            else:
                stats["errors"] += 1
            if not conn.closed:
                idle.append(conn)
            if ticks_done and outstanding == 0:
                finished.set()

        return done

    async def fire_new(sched: float, i: int) -> None:
        nonlocal outstanding
        if stats["connects"] >= args.max_conns:
            stats["dropped"] += 1
            outstanding -= 1
            return
        stats["connects"] += 1
        try:
            conn = await connect(args.host, args.port)
        except OSError:
            stats["errors"] += 1
            outstanding -= 1
            return
        sent = perf()
        conn.send(req, complete(conn, sched, sent, i))

    def fire(sched: float, i: int) -> None:
        nonlocal outstanding
        outstanding += 1
        stats["sent"] += 1
        now = perf()
        late.append((now - sched) * 1000)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.send(req, complete(conn, sched, now, i))
                return
        loop.create_task(fire_new(sched, i))

    def end_ticks() -> None:
        nonlocal ticks_done
        ticks_done = True
        if outstanding == 0:
            finished.set()

    def ticker(t0: float) -> None:
        for i in range(total):
            t = t0 + i / args.rate
            d = t - perf()
            if d > 0:
                time.sleep(d)
            loop.call_soon_threadsafe(fire, t, i)
        loop.call_soon_threadsafe(end_ticks)

    t0 = perf() + 0.05
    th = threading.Thread(target=ticker, args=(t0,), daemon=True)
    th.start()
    try:
        await asyncio.wait_for(finished.wait(), args.duration + 30)
    except TimeoutError:
        stats["errors"] += outstanding
    th.join(timeout=1)
    return {
        "mode": "rate",
        "rate": args.rate,
        "duration_s": args.duration,
        **stats,
        "latency_ms": percentiles(lat_sched),
        "service_ms": percentiles(lat_send),
        "send_lateness_ms": percentiles(late),
    }


# ---------------------------------------------------------------------- streams


async def run_streams(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    req = build_request(args.host, args.port, args.path, args.body.encode(), args.key, args.header)
    cadence_ms = args.cadence_ms
    stream_s = args.chunks * cadence_ms / 1000
    ttfb: list[float] = []
    gaps: list[float] = []
    stats = {"streams": 0, "all_streams": 0, "errors": 0, "short": 0}
    deadline = perf() + args.duration + stream_s
    measure_from = perf() + stream_s   # the stagger period is warm-up

    async def one(conn: Conn) -> bool:
        times: list[float] = []
        fut: asyncio.Future[tuple[bool, float]] = loop.create_future()

        def done(ok: bool, t: float) -> None:
            if not fut.done():
                fut.set_result((ok, t))

        sent = perf()
        conn.send(req, done, times.append)
        ok, _ = await fut
        if not ok:
            stats["errors"] += 1
            return False
        stats["all_streams"] += 1
        if len(times) < args.chunks:
            stats["short"] += 1
        if sent >= measure_from and times:
            stats["streams"] += 1
            ttfb.append((times[0] - sent) * 1000)
            gaps.extend((b - a) * 1000 for a, b in zip(times, times[1:]))
        return True

    async def worker(k: int) -> None:
        await asyncio.sleep(stream_s * k / args.concurrency)
        conn = await connect(args.host, args.port)
        while perf() < deadline:
            if conn.closed:
                conn = await connect(args.host, args.port)
            if not await one(conn):
                await asyncio.sleep(0.01)
        if conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
    threshold = cadence_ms / 4
    bunched = sum(1 for g in gaps if g < threshold)
    return {
        "mode": "streams",
        "concurrency": args.concurrency,
        "chunks": args.chunks,
        "cadence_ms": cadence_ms,
        **stats,
        "ttfb_ms": percentiles(ttfb),
        "gap_ms": percentiles(gaps, (1, 50, 99)),
        "gaps": len(gaps),
        "bunched": bunched,
        "bunched_share": bunched / len(gaps) if gaps else None,
    }


# ---------------------------------------------------------------------- hold


async def run_hold(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    req = build_request(args.host, args.port, args.path, args.body.encode(), args.key, args.header)
    conns: list[Conn] = []
    first = 0
    all_first = asyncio.Event()
    stats = {"opened": 0, "errors": 0, "ended_early": 0}

    def on_content_factory() -> Callable[[float], None]:
        seen = False

        def on_content(t: float) -> None:
            nonlocal seen, first
            if not seen:
                seen = True
                first += 1
                if first >= args.concurrency:
                    all_first.set()

        return on_content

    def done(ok: bool, t: float) -> None:
        stats["ended_early"] += 1
        if not ok:
            stats["errors"] += 1

    for i in range(0, args.concurrency, 100):
        batch = await asyncio.gather(
            *(connect(args.host, args.port) for _ in range(min(100, args.concurrency - i))), return_exceptions=True
        )
        for c in batch:
            if isinstance(c, BaseException):
                stats["errors"] += 1
                continue
            c.send(req, done, on_content_factory())
            conns.append(c)
            stats["opened"] += 1
        await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(all_first.wait(), args.timeout)
    except TimeoutError:
        pass
    print(f"READY {first}", flush=True)
    # Hold until the orchestrator says so (a line or EOF on stdin), bounded.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await asyncio.wait_for(reader.readline(), args.hold_max)
    except TimeoutError:
        pass
    for c in conns:
        if c.transport is not None:
            c.on_done = None
            c.transport.abort()
    await asyncio.sleep(0.05)
    return {"mode": "hold", "concurrency": args.concurrency, "streaming": first, **stats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="llm-proxy benchmark load clients")
    p.add_argument("mode", choices=("rate", "streams", "hold"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--key", default="none")
    p.add_argument("--body", required=True)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=0.5, help="rate: seconds of sends not measured")
    p.add_argument("--rate", type=float, default=500)
    p.add_argument("--conns", type=int, default=32, help="rate: connections opened up front")
    p.add_argument("--max-conns", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--cadence-ms", type=float, default=25)
    p.add_argument("--timeout", type=float, default=60, help="hold: max wait for every first chunk")
    p.add_argument("--hold-max", type=float, default=120, help="hold: max time to keep streams open")
    p.add_argument("--header", action="append", default=[], help="an extra request header line, 'Name: value'")
    p.add_argument("--marker", default=CONTENT_MARKER.decode(),
                   help="the bytes that mark a content chunk (default: the bench upstream's chat delta)")
    args = p.parse_args(argv)
    Conn.marker = args.marker.encode()
    sys.setswitchinterval(0.0005)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    run = {"rate": run_rate, "streams": run_streams, "hold": run_hold}[args.mode]
    result = asyncio.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
