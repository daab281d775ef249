"""A minimal, fast fake OpenAI upstream for the benchmark (raw asyncio protocol + uvloop).

It exists because the realistic aiohttp mock (`llm-proxy mock-upstream`) tops out at
~6k req/s on a core, which would cap nginx, not measure it. This one answers a
keep-alive HTTP/1.1 `POST .../chat/completions` from precomputed bytes:

* non-streaming (`"stream":true` absent from the body): one fixed chat.completion JSON
  with a `usage` object (Content-Length framing);
* streaming: an SSE stream, chunked framing, of N content chunks D ms apart, paced on
  absolute deadlines (no drift, no task per stream, just `call_at` handles). N and D are
  chosen per request by the model name, `bench-c<N>-d<D>` (the gateway forwards only a
  few client headers, the model always reaches the upstream), or by the headers
  `x-bench-chunks` / `x-bench-delay-ms` when sent directly. The last content chunk goes
  out together with the finish chunk, the usage chunk (only when the body says
  `"include_usage":true`, as OpenAI does) and `data: [DONE]`.

Run: `python -m bench.upstream --port P` (prints `READY <port>` on stdout when listening).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys

_MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
_CHUNKS = re.compile(rb"-c(\d+)")
_DELAY = re.compile(rb"-d(\d+)")
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_CLEN = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_HDR_CHUNKS = re.compile(rb"\r\nx-bench-chunks:\s*(\d+)", re.IGNORECASE)
_HDR_DELAY = re.compile(rb"\r\nx-bench-delay-ms:\s*(\d+)", re.IGNORECASE)

CREATED = 1_735_689_600

COMPLETION = (
    b'{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion","created":1735689600,'
    b'"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":'
    b'"Hello! I am a benchmark upstream. This answer has a realistic size: a sentence or two of text, '
    b'the usual envelope, and a usage object at the end.","refusal":null,"annotations":[]},'
    b'"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":32,'
    b'"total_tokens":56,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,'
    b'"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_bench"}'
)
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: req_bench\r\n"
    b"Content-Length: " + str(len(COMPLETION)).encode() + b"\r\n\r\n" + COMPLETION
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
    b"x-request-id: req_bench\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_ENV = b'{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion.chunk","created":1735689600,"model":"bench","system_fingerprint":"fp_bench","choices":[{"index":0,"delta":'
FIRST_EVENT = b"data: " + _ENV + b'{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
CONTENT_EVENT = b"data: " + _ENV + b'{"content":" token"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
FINISH_EVENT = b"data: " + _ENV + b'{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
DONE_EVENT = b"data: [DONE]\n\n"
# Anything but chat completions (a gateway that translates onto another OpenAI API, e.g.
# LiteLLM's /v1/messages onto /v1/responses) is told so, not answered in chat's shape.
NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 73\r\n\r\n"
    b'{"error":{"message":"bench upstream: chat completions only","type":"x"}}\n'
)


def usage_event(completion: int) -> bytes:
    return (
        b'data: {"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion.chunk","created":1735689600,'
        b'"model":"bench","system_fingerprint":"fp_bench","choices":[],"usage":{"prompt_tokens":24,"completion_tokens":'
        + str(completion).encode()
        + b',"total_tokens":'
        + str(24 + completion).encode()
        + b',"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}\n\n'
    )


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


CHUNK_FIRST = chunk(FIRST_EVENT + CONTENT_EVENT)
CHUNK_CONTENT = chunk(CONTENT_EVENT)
_TAILS: dict[tuple[int, bool], bytes] = {}


def stream_tail(n: int, usage: bool) -> bytes:
    """The last content chunk + finish (+ usage) + [DONE], then the chunked terminator."""
    key = (n, usage)
    tail = _TAILS.get(key)
    if tail is None:
        data = CONTENT_EVENT + FINISH_EVENT + (usage_event(n) if usage else b"") + DONE_EVENT
        tail = _TAILS[key] = chunk(data) + b"0\r\n\r\n"
    return tail


class _Conn(asyncio.Protocol):
    __slots__ = ("loop", "transport", "buf", "streaming", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.streaming = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        self._process()

    def _process(self) -> None:
        while not self.streaming:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[: end + 2]
            m = _CLEN.search(head)
            clen = int(m.group(1)) if m else 0
            total = end + 4 + clen
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self.buf = buf[total:]
            self._respond(head, body)

    def _respond(self, head: bytes, body: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        if head.find(b"/chat/completions", 0, head.find(b"\r\n")) < 0:
            transport.write(NOT_FOUND)
            return
        if not _STREAM.search(body):
            transport.write(JSON_RESPONSE)
            return
        n, delay_ms = 20, 25
        m = _MODEL.search(body)
        if m is not None:
            model = m.group(1)
            if (c := _CHUNKS.search(model)) is not None:
                n = int(c.group(1))
            if (d := _DELAY.search(model)) is not None:
                delay_ms = int(d.group(1))
        if (h := _HDR_CHUNKS.search(head)) is not None:
            n = int(h.group(1))
        if (h := _HDR_DELAY.search(head)) is not None:
            delay_ms = int(h.group(1))
        n = max(1, n)
        usage = _INCLUDE_USAGE.search(body) is not None
        if n == 1:
            transport.write(STREAM_HEAD + chunk(FIRST_EVENT) + stream_tail(1, usage))
            return
        self.streaming = True
        transport.write(STREAM_HEAD + CHUNK_FIRST)
        start = self.loop.time()
        self._next(start, 1, n, delay_ms / 1000.0, usage)

    def _next(self, start: float, i: int, n: int, delay: float, usage: bool) -> None:
        # Content chunk i (0-based) is due at start + i * delay.
        self.timer = self.loop.call_at(start + i * delay, self._tick, start, i, n, delay, usage)

    def _tick(self, start: float, i: int, n: int, delay: float, usage: bool) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if i + 1 >= n:
            transport.write(stream_tail(n, usage))
            self.streaming = False
            if self.buf:
                self._process()
            return
        transport.write(CHUNK_CONTENT)
        self._next(start, i + 1, n, delay, usage)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(loop), host, port, backlog=4096, reuse_address=True)
    sock = server.sockets[0]
    print(f"READY {sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
