"""proxy.http1.server: the lean HTTP/1.1 server protocol, over real sockets (raw bytes
and aiohttp) and, where byte-exact splitting matters, fed through a fake transport."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.http1.headers import HEADER_KEYS, header_key
from proxy.http1.outbox import HOLD_MAX
from proxy.http1.server import Exchange, Http1Server, Request, ServerLimits

Handler = Callable[[Exchange], Awaitable[None]]


def render_error(status: int, message: str, req: Request | None) -> tuple[list[tuple[str, str]], bytes]:
    path = req.path if req is not None else "-"
    return [("Content-Type", "application/json")], json.dumps({"error": message, "path": path}).encode()


async def echo(ex: Exchange) -> None:
    r = ex.request
    body = json.dumps(
        {
            "method": r.method, "path": r.path, "query": r.query_string, "body": r.body.decode("latin-1"),
            "version": r.http_version, "keep_alive": r.keep_alive, "remote": r.remote,
            "x": r.headers.get("x-test"),  # names arrive lower-cased
        }
    ).encode()
    ex.respond(200, [("Content-Type", "application/json"), ("X-Path", r.path)], body)


@contextlib.asynccontextmanager
async def serve(
    handler: Handler = echo, *, limits: ServerLimits | None = None, on_done: Callable[[Exchange], None] | None = None,
) -> AsyncIterator[tuple[Http1Server, int]]:
    server = Http1Server(handler, limits=limits or ServerLimits(), render_error=render_error, on_done=on_done)
    listener = await asyncio.get_running_loop().create_server(server.protocol, "127.0.0.1", 0)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        server.abort_all()
        tasks = list(server.tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await listener.wait_closed()
        await asyncio.sleep(0.01)  # connection_lost callbacks
        assert server.connections == 0


class Raw:
    """A raw client connection with a minimal HTTP/1.1 response reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head: bool = False, timeout: float = 3.0) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(timeout):
            return await self._response(head)

    async def _response(self, head: bool) -> tuple[int, dict[str, str], bytes]:
        line = await self.reader.readline()
        if not line:
            raise EOFError("connection closed")
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while (h := await self.reader.readline()) not in (b"\r\n", b""):
            name, value = h.decode("latin-1").split(":", 1)
            assert name.lower() not in headers, f"duplicate {name}"
            headers[name.lower()] = value.strip()
        if head or status == 100:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await self.reader.readline()).strip(), 16):
                body += await self.reader.readexactly(size)
                assert await self.reader.readexactly(2) == b"\r\n"
            assert await self.reader.readexactly(2) == b"\r\n"
            return status, headers, body
        return status, headers, await self.reader.read()

    async def closed(self, timeout: float = 2.0) -> bool:
        """True once the server closed (EOF or reset) with no further bytes."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read() == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw(port: int) -> AsyncIterator[Raw]:
    conn = await Raw.open(port)
    try:
        yield conn
    finally:
        await conn.close()


def get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


# ---------------------------------------------------------------------- normal traffic


async def test_simple_request_with_aiohttp():
    done: list[Exchange] = []
    async with serve(on_done=done.append) as (server, port), aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/v1/x%20y?a=1&b=2", data=b"hello", headers={"X-Test": "t"}) as r:
            assert r.status == 200 and r.reason == "OK"
            assert r.headers["Content-Length"] == str(len(await r.read()))
            got = await r.json()
    assert got == {
        "method": "POST", "path": "/v1/x%20y", "query": "a=1&b=2", "body": "hello", "version": "1.1",
        "keep_alive": True, "remote": "127.0.0.1", "x": "t",
    }
    assert len(done) == 1 and done[0].status == 200 and done[0].bytes_sent > 0 and not done[0].client_gone


async def test_keep_alive_reuses_one_connection():
    peers: set[str] = set()

    async def handler(ex: Exchange) -> None:
        peers.add(ex.request.remote)
        await echo(ex)

    async with serve(handler) as (server, port):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            for i in range(5):
                async with s.get(f"http://127.0.0.1:{port}/n{i}") as r:
                    assert (await r.json())["path"] == f"/n{i}"
            assert server.connections == 1
        async with raw(port) as c:
            for i in range(3):
                await c.send(get(f"/r{i}"))
                status, headers, body = await c.response()
                assert status == 200 and "connection" not in headers and json.loads(body)["path"] == f"/r{i}"


async def test_pipelined_requests_are_answered_in_order():
    started: list[str] = []

    async def handler(ex: Exchange) -> None:
        started.append(ex.request.path)
        await asyncio.sleep({"/a": 0.05, "/b": 0.0, "/c": 0.02}[ex.request.path])
        await echo(ex)

    async with serve(handler) as (_, port), raw(port) as c:
        await c.send(get("/a") + post("/b", b"xyz") + get("/c"))
        paths = [json.loads((await c.response())[2])["path"] for _ in range(3)]
    assert paths == started == ["/a", "/b", "/c"]


async def loop_turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = self.eof = self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.7", 4242) if name == "peername" else default

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0


async def test_request_split_at_every_byte_boundary():
    # Exact splits need a fake transport: TCP may coalesce what a client writes apart.
    seen: list[Request] = []

    async def handler(ex: Exchange) -> None:
        seen.append(ex.request)
        ex.respond(200, [], ex.request.body)

    server = Http1Server(handler, limits=ServerLimits(), render_error=render_error)
    plain = post("/p?q=1", b"hello world", "X-Test: a\r\nX-Test: b\r\n")
    chunked = b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    for data in (plain, chunked):
        for cut in range(1, len(data)):
            proto, t = server.protocol(), FakeTransport()
            proto.connection_made(t)
            proto.data_received(data[:cut])
            proto.data_received(data[cut:])
            await loop_turns(2)  # the handler's task, then the outbox sending what it held
            assert t.out.endswith(b"\r\n\r\nhello world"), (cut, bytes(t.out))
            proto.connection_lost(None)
    # And one byte at a time, twice over on one connection.
    proto, t = server.protocol(), FakeTransport()
    proto.connection_made(t)
    for byte in plain * 2:
        proto.data_received(bytes([byte]))
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the outbox
    assert t.out.count(b"HTTP/1.1 200 OK\r\n") == 2 and not t.closed
    proto.connection_lost(None)
    r = seen[0]
    assert (r.path, r.query_string, r.headers["x-test"], r.remote) == ("/p", "q=1", "a, b", "10.0.0.7")
    assert all(s.body == b"hello world" for s in seen)


async def test_request_target_forms_and_misuse():
    errors: list[str] = []

    async def handler(ex: Exchange) -> None:
        with pytest.raises(RuntimeError):
            ex.end()  # before start()
        with pytest.raises(ValueError):
            ex.respond(101, [], b"")
        ex.respond(200, [], f"{ex.request.path}|{ex.request.query_string}".encode())
        for misuse in (lambda: ex.respond(200, [], b""), lambda: ex.start(200, [])):
            with pytest.raises(RuntimeError):
                misuse()
        with pytest.raises(RuntimeError):
            await ex.write(b"x")
        errors.append("checked")

    async with serve(handler) as (_, port), raw(port) as c:
        for target, want in [
            ("http://host:1/a/b?c=d", b"/a/b|c=d"), ("http://host?q", b"/|q"), ("*", b"*|"), ("/x?#frag", b"/x|"),
        ]:
            await c.send(f"OPTIONS {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert (await c.response())[2] == want
    assert errors == ["checked"] * 4


async def test_byte_by_byte_over_a_socket():
    async with serve() as (_, port), raw(port) as c:
        for byte in post("/slow", b"abc"):
            await c.send(bytes([byte]))
        status, _, body = await c.response()
    assert status == 200 and json.loads(body)["body"] == "abc"


async def test_chunked_request_body():
    async with serve() as (_, port), raw(port) as c:
        await c.send(b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await asyncio.sleep(0.02)
        await c.send(b"2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n")
        status, _, body = await c.response()
        assert status == 200 and json.loads(body)["body"] == "abcde"


async def test_expect_100_continue():
    async with serve(limits=ServerLimits(max_body_bytes=100)) as (_, port):
        async with raw(port) as c:
            await c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            status, _, _ = await c.response()
            assert status == 100  # before any body byte was sent
            await c.send(b"body")
            status, _, body = await c.response()
            assert status == 200 and json.loads(body)["body"] == "body"
        async with raw(port) as c:  # over the limit: 413 straight away, no 100
            await c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n")
            status, headers, _ = await c.response()
            assert status == 413 and headers["connection"] == "close" and await c.closed()


async def test_expect_100_continue_behind_a_pipelined_request():
    async def handler(ex: Exchange) -> None:
        if ex.request.path == "/slow":
            await asyncio.sleep(0.05)
        await echo(ex)

    async with serve(handler) as (_, port), raw(port) as c:
        await c.send(get("/slow") + b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert json.loads((await c.response())[2])["path"] == "/slow"  # not interleaved with a 100
        assert (await c.response())[0] == 100
        await c.send(b"ok")
        assert json.loads((await c.response())[2])["body"] == "ok"


# ---------------------------------------------------------------------- refusals


async def test_413_by_content_length_without_reading_the_body():
    called: list[str] = []
    done: list[Exchange] = []

    async def handler(ex: Exchange) -> None:
        called.append(ex.request.path)

    async with serve(handler, limits=ServerLimits(max_body_bytes=1000), on_done=done.append) as (_, port):
        async with raw(port) as c:
            await c.send(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10)
            status, headers, body = await c.response()
            assert status == 413 and headers["connection"] == "close"
            assert json.loads(body) == {"error": "Request body too large.", "path": "/big"}
            assert await c.closed()
        async with raw(port) as c:  # a chunked body is counted as it arrives
            await c.send(b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            await c.send(b"3e8\r\n" + b"x" * 1000 + b"\r\n1\r\nx\r\n")
            assert (await c.response())[0] == 413 and await c.closed()
    assert not called and [d.status for d in done] == [413, 413]


async def test_431_for_too_many_or_too_large_headers_and_414_for_a_long_url():
    limits = ServerLimits(max_headers=10, max_field_size=100, max_line_size=200)
    async with serve(limits=limits) as (_, port):
        for extra, path, want in [
            ("".join(f"X-{i}: v\r\n" for i in range(11)), "/", 431),
            ("X-Big: " + "v" * 100 + "\r\n", "/", 431),
            ("", "/" + "a" * 200, 414),
        ]:
            async with raw(port) as c:
                await c.send(get(path, extra))
                status, headers, body = await c.response()
                assert status == want and headers["connection"] == "close" and json.loads(body)["path"] == "-"
                assert await c.closed()
        async with raw(port) as c:  # at the limits: fine
            await c.send(get("/" + "a" * 199, "".join(f"X-{i}: v\r\n" for i in range(9))))
            assert (await c.response())[0] == 200


async def test_431_for_a_huge_header_line_is_not_buffered_whole():
    async with serve() as (_, port), raw(port) as c:
        await c.send(b"GET / HTTP/1.1\r\nX-Huge: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(20):  # 2 MB of one header line, never finished
                await c.send(b"v" * 100_000)
        assert (await c.response())[0] == 431


# HTTP/1.1 without Host: 400 (RFC 9112 3.2, as h11 and nginx answer; issue 25 item 5).
NO_HOST = (b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nX-Host: a\r\n\r\n")


@pytest.mark.parametrize(
    "data, want",
    [
        (b"\x00\x01\x02garbage\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        *((case, 400) for case in NO_HOST),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
    ],
)
async def test_malformed_requests_get_400_and_a_close(data: bytes, want: int):
    async with serve() as (_, port), raw(port) as c:
        await c.send(data)
        status, headers, body = await c.response()
        assert status == want and headers["connection"] == "close" and await c.closed()
        if want == 400 and b"gzip" not in data:
            message = "Missing Host header." if data in NO_HOST else "Malformed HTTP request."
            assert json.loads(body)["error"] == message


async def test_malformed_pipelined_request_waits_for_the_one_before():
    async with serve() as (_, port), raw(port) as c:
        await c.send(get("/ok") + b"NOT HTTP\r\n\r\n")
        assert (await c.response())[0] == 200
        assert (await c.response())[0] == 400 and await c.closed()


# ---------------------------------------------------------------------- timers


async def test_slowloris_gets_408_and_a_close():
    loop = asyncio.get_running_loop()
    async with serve(limits=ServerLimits(head_timeout_s=0.2)) as (_, port), raw(port) as c:
        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in get("/", "X-Pad: " + "p" * 50 + "\r\n"):
                    await c.send(bytes([byte]))
                    await asyncio.sleep(0.1)

        sender = asyncio.create_task(dribble())
        t0 = loop.time()
        status, headers, _ = await c.response()
        elapsed = loop.time() - t0
        assert status == 408 and headers["connection"] == "close" and await c.closed()
        assert 0.15 <= elapsed < 0.6
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def test_slow_body_gets_408():
    async with serve(limits=ServerLimits(head_timeout_s=0.2)) as (_, port), raw(port) as c:
        await c.send(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
        await asyncio.sleep(0.1)
        await c.send(b"cd")  # gaps under the limit are fine...
        status, _, body = await c.response()  # ...until one is longer
        assert status == 408 and json.loads(body)["path"] == "/b" and await c.closed()


async def test_idle_keep_alive_connection_is_closed():
    loop = asyncio.get_running_loop()
    async with serve(limits=ServerLimits(keepalive_s=0.2)) as (server, port), raw(port) as c:
        await c.send(get())
        assert (await c.response())[0] == 200
        t0 = loop.time()
        assert await c.closed()
        assert 0.15 <= loop.time() - t0 < 0.6
        await asyncio.sleep(0.01)
        assert server.connections == 0


# ---------------------------------------------------------------------- streaming and back pressure


async def test_streaming_response_is_chunked():
    async def handler(ex: Exchange) -> None:
        ex.start(200, [("Content-Type", "text/event-stream")])
        for i in range(5):
            await ex.write(f"data: {i}\n\n".encode())
            await ex.write(b"")  # no-op, not an end-of-body chunk
            await asyncio.sleep(0.01)
        ex.end()

    done: list[Exchange] = []
    async with serve(handler, on_done=done.append) as (_, port):
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/s") as r:
            assert r.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in r.headers
            pieces = [p async for p in r.content.iter_any()]
        assert b"".join(pieces) == b"".join(f"data: {i}\n\n".encode() for i in range(5)) and len(pieces) > 1
        async with raw(port) as c:  # the exact framing, and the connection stays usable
            await c.send(get("/s"))
            status, headers, body = await c.response()
            assert headers["transfer-encoding"] == "chunked" and body.startswith(b"data: 0")
            await c.send(get("/s"))
            assert (await c.response())[0] == 200
    assert [d.bytes_sent for d in done] == [45, 45, 45]


async def test_back_pressure_blocks_the_writer_instead_of_buffering():
    total, piece = 20 * 1024 * 1024, b"x" * 65536
    state: dict[str, Any] = {"max_buffer": 0, "sent": 0}

    async def handler(ex: Exchange) -> None:
        ex.start(200, [])
        transport = ex._conn._transport
        assert transport is not None
        while state["sent"] < total:
            await ex.write(piece)
            state["sent"] += len(piece)
            state["max_buffer"] = max(state["max_buffer"], transport.get_write_buffer_size())
        ex.end()

    async with serve(handler) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer.write(get("/big"))
        await asyncio.sleep(0.3)  # not reading
        assert 0 < state["sent"] < total // 2  # blocked in write(), not buffered
        assert state["max_buffer"] <= 256 * 1024
        received = 0
        async with asyncio.timeout(5):
            while chunk := await reader.read(1 << 20):
                received += len(chunk)
                if received >= total:
                    break
        assert received >= total and state["sent"] == total
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_pipelined_flood_pauses_reading():
    release = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        await release.wait()
        ex.respond(200, [], b"")

    server = Http1Server(handler, limits=ServerLimits(), render_error=render_error)
    proto, t = server.protocol(), FakeTransport()
    proto.connection_made(t)
    proto.data_received(get("/first"))
    proto.data_received(post("/q", b"x" * 600_000) * 2)
    assert t.paused
    release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert t.out.count(b"HTTP/1.1 200 OK") == 3 and not t.paused
    proto.connection_lost(None)


# ---------------------------------------------------------------------- the client going away


@pytest.mark.parametrize("how", ["close", "reset", "fin"])
async def test_client_going_away_cancels_the_handler(how: str):
    entered, cancelled, after = asyncio.Event(), asyncio.Event(), asyncio.Event()
    write_error: list[BaseException] = []
    done: list[Exchange] = []

    async def handler(ex: Exchange) -> None:
        ex.start(200, [])
        await ex.write(b"first")
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            try:
                await ex.write(b"more")
            except ConnectionResetError as e:
                write_error.append(e)
            after.set()
            raise

    async with serve(handler, on_done=done.append) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/wait"))
        async with asyncio.timeout(2):
            await entered.wait()
            if how == "fin":
                writer.write_eof()
            elif how == "reset":
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
            else:
                writer.close()
            await cancelled.wait()
            await after.wait()
            while server.tasks or server.connections:
                await asyncio.sleep(0.01)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert write_error and len(done) == 1 and done[0].client_gone and done[0].bytes_sent == 5


@pytest.mark.parametrize("how", ["fin", "lost"])
async def test_client_gone_before_its_handler_ran_still_settles_the_request(how: str):
    """The request and the FIN (or the connection's loss) arrive in one loop iteration:
    the handler's task is cancelled before its first step and the handler never runs.
    The request must still be reported once (on_done) and leave no task behind."""
    ran: list[Exchange] = []
    done: list[Exchange] = []

    async def handler(ex: Exchange) -> None:
        ran.append(ex)
        ex.respond(200, [], b"ok")

    server = Http1Server(handler, limits=ServerLimits(), render_error=render_error, on_done=done.append)
    proto, t = server.protocol(), FakeTransport()
    proto.connection_made(t)
    proto.data_received(get("/x"))
    if how == "fin":
        proto.eof_received()
    proto.connection_lost(None)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not ran and not server.tasks
    assert len(done) == 1 and done[0].client_gone and done[0].status == 0


def sleeps_until_cancelled(cancelled: asyncio.Event) -> Callable[[Exchange], Awaitable[None]]:
    """A handler that never answers and sets `cancelled` when its task is cancelled."""

    async def handler(ex: Exchange) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return handler


async def test_disconnect_before_the_handler_finishes_a_plain_response():
    cancelled = asyncio.Event()
    handler = sleeps_until_cancelled(cancelled)

    async with serve(handler) as (_, port):
        c = await Raw.open(port)
        await c.send(post("/p", b"{}"))
        await asyncio.sleep(0.05)
        await c.close()
        async with asyncio.timeout(2):
            await cancelled.wait()


# ---------------------------------------------------------------------- handler failures


async def test_handler_errors(caplog: pytest.LogCaptureFixture):
    async def handler(ex: Exchange) -> None:
        path = ex.request.path
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/silent":
            return
        if path == "/midstream":
            ex.start(200, [])
            await ex.write(b"partial")
            raise RuntimeError("midstream")
        if path == "/crlf":
            for bad in ("a\r\nSet-Cookie: x", "a\nb"):
                with pytest.raises(ValueError):
                    ex.respond(200, [("X-Bad", bad)], b"")
                with pytest.raises(ValueError):
                    ex.start(200, [("X-Bad", bad)])
            with pytest.raises(ValueError):
                ex.respond(200, [("X-Bad\r\nY", "v")], b"")
            assert not ex.head_sent
            ex.respond(201, [("X-Good", "v")], b"ok")
            return
        await echo(ex)

    caplog.set_level(logging.DEBUG, logger="llm_proxy.http")
    secret = "Authorization: Bearer sk-secret-123\r\n"
    async with serve(handler) as (_, port), raw(port) as c:
        for path in ("/boom?key=sk-query", "/silent"):
            await c.send(get(path, secret))
            status, headers, body = await c.response()
            assert status == 500 and "connection" not in headers
            assert json.loads(body) == {"error": "Internal server error.", "path": path.split("?")[0]}
        await c.send(get("/crlf"))  # the connection stays usable
        status, headers, body = await c.response()
        assert (status, headers["x-good"], body) == (201, "v", b"ok")
        await c.send(get("/midstream", secret))
        async with asyncio.timeout(2):
            got = await c.reader.read(-1)  # up to the close, with no last chunk
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"7\r\npartial\r\n")
    text = caplog.text
    assert "GET /boom" in text and "GET /silent" in text and "GET /midstream" in text
    assert "sk-secret" not in text and "sk-query" not in text


async def test_bad_error_renderer_and_on_done_do_not_break_the_connection(caplog: pytest.LogCaptureFixture):
    def bad_render(status: int, message: str, req: Request | None) -> tuple[list[tuple[str, str]], bytes]:
        raise RuntimeError("renderer")

    def bad_on_done(ex: Exchange) -> None:
        raise RuntimeError("on_done")

    async def handler(ex: Exchange) -> None:
        raise ValueError("x")

    server = Http1Server(handler, limits=ServerLimits(), render_error=bad_render, on_done=bad_on_done)
    listener = await asyncio.get_running_loop().create_server(server.protocol, "127.0.0.1", 0)
    try:
        async with raw(listener.sockets[0].getsockname()[1]) as c:
            for _ in range(2):
                await c.send(get())
                status, _, body = await c.response()
                assert (status, body) == (500, b"Internal server error.")
    finally:
        listener.close()
        server.abort_all()
        await listener.wait_closed()
    assert "render_error failed" in caplog.text and "on_done callback failed" in caplog.text


# ---------------------------------------------------------------------- connection semantics


async def test_http10_and_connection_close():
    async def handler(ex: Exchange) -> None:
        if ex.request.path == "/stream":
            ex.start(200, [])
            await ex.write(b"abc")
            await ex.write(b"def")
            ex.end()
        else:
            await echo(ex)

    async with serve(handler) as (_, port):
        async with raw(port) as c:  # HTTP/1.0: closes after the response
            await c.send(b"GET /a HTTP/1.0\r\n\r\n")
            status, headers, body = await c.response()
            assert headers["connection"] == "close" and json.loads(body)["version"] == "1.0"
            assert await c.closed()
        async with raw(port) as c:  # HTTP/1.0 keep-alive: stays open, says so
            for _ in range(2):
                await c.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                status, headers, body = await c.response()
                assert headers["connection"] == "keep-alive" and json.loads(body)["keep_alive"]
            await c.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # close-delimited
            status, headers, body = await c.response()
            assert headers["connection"] == "close" and "transfer-encoding" not in headers and body == b"abcdef"
        async with raw(port) as c:  # HTTP/1.1 Connection: close
            await c.send(get("/a", "Connection: close\r\n"))
            status, headers, _ = await c.response()
            assert status == 200 and headers["connection"] == "close" and await c.closed()


async def test_head_and_no_body_statuses():
    async def handler(ex: Exchange) -> None:
        if ex.request.path == "/204":
            ex.respond(204, [("Content-Length", "99")], b"ignored")
        else:
            ex.respond(200, [("Content-Length", "99"), ("Connection", "keep-alive")], b"12345")

    async with serve(handler) as (_, port), raw(port) as c:
        await c.send(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = await c.response(head=True)
        assert headers["content-length"] == "5" and "connection" not in headers
        await c.send(get("/204"))
        status, headers, _ = await c.response(head=True)
        assert status == 204 and "content-length" not in headers
        await c.send(get("/"))  # nothing stray was sent for the HEAD or the 204
        assert (await c.response())[2] == b"12345"


async def test_upgrade_request_is_answered_as_plain_http():
    async with serve() as (_, port), raw(port) as c:
        await c.send(post("/u", b"hello", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"))
        status, headers, body = await c.response()
        assert status == 200 and json.loads(body)["body"] == "hello" and headers["connection"] == "close"
        assert await c.closed()


# ---------------------------------------------------------------------- shutdown


async def test_shutdown_drains():
    release = asyncio.Event()
    calls: list[str] = []

    async def handler(ex: Exchange) -> None:
        calls.append(ex.request.path)
        if ex.request.path == "/busy":
            await release.wait()
        await echo(ex)

    async with serve(handler) as (server, port):
        idle, busy, partial = await Raw.open(port), await Raw.open(port), await Raw.open(port)
        try:
            await idle.send(get("/idle"))
            assert (await idle.response())[0] == 200
            await busy.send(get("/busy"))
            await partial.send(b"GET /late HTTP/1.1\r\nHost")
            await asyncio.sleep(0.05)
            assert server.connections == 3
            server.shutdown()
            assert await idle.closed()
            release.set()
            status, headers, _ = await busy.response()
            assert status == 200 and headers["connection"] == "close" and await busy.closed()
            await partial.send(b": t\r\n\r\n")
            status, headers, body = await partial.response()
            assert status == 503 and headers["connection"] == "close" and await partial.closed()
            assert json.loads(body) == {"error": "The gateway is shutting down.", "path": "/late"}
            assert calls == ["/idle", "/busy"]
        finally:
            for c in (idle, busy, partial):
                await c.close()


async def test_abort_all_closes_everything_and_cancels_handlers():
    cancelled = asyncio.Event()
    handler = sleeps_until_cancelled(cancelled)

    async with serve(handler) as (server, port):
        conns = [await Raw.open(port) for _ in range(3)]
        try:
            await conns[0].send(get("/busy"))
            await asyncio.sleep(0.05)
            assert server.connections == 3 and len(server.tasks) == 1
            server.abort_all()
            for c in conns:
                assert await c.closed()
            async with asyncio.timeout(1):
                await cancelled.wait()
            await asyncio.sleep(0.01)
            assert server.connections == 0 and not server.tasks
        finally:
            for c in conns:
                await c.close()


def test_header_key_cache_is_bounded_and_exact() -> None:
    """Names become lower-case str keys through a cache; made-up names cannot grow it
    without bound, and past the bound they are still converted, just not stored."""
    for i in range(2000):
        raw = b"X-Made-Up-%d" % i
        assert (HEADER_KEYS.get(raw) or header_key(raw)) == "x-made-up-%d" % i
    assert len(HEADER_KEYS) <= 512
    assert header_key(b"X-Made-Up-1999") == "x-made-up-1999"
    assert header_key(b"\xc9T\xc9") == "\xc9t\xc9"  # only ASCII letters are lowered (latin-1 otherwise)


# ---------------------------------------------------------------------- held writes (outbox.py)


class LoggedTransport(FakeTransport):
    """A fake transport that notes its writes and closes in one shared list."""

    def __init__(self, name: str, events: list[str]) -> None:
        super().__init__()
        self.name, self.events = name, events

    def write(self, data: Any) -> None:
        self.events.append(f"write {self.name}")
        super().write(data)

    def close(self) -> None:
        self.events.append(f"close {self.name}")
        super().close()


def connections(
    handler: Handler, events: list[str], requests: dict[str, bytes]
) -> list[LoggedTransport]:
    """One connection per request, each fed its request in the same loop turn."""
    server = Http1Server(handler, limits=ServerLimits(), render_error=render_error)
    transports = []
    for name, request in requests.items():
        proto, t = server.protocol(), LoggedTransport(name, events)
        proto.connection_made(t)
        proto.data_received(request)
        transports.append(t)
    return transports


async def test_a_request_alone_is_answered_at_once():
    # Nothing to group its write with: it goes out before the handler's bookkeeping.
    events: list[str] = []

    async def handler(ex: Exchange) -> None:
        ex.respond(200, [], b"ok")
        events.append("bookkeeping")

    [t] = connections(handler, events, {"a": get("/a")})
    await loop_turns(2)
    assert events == ["write a", "bookkeeping"] and t.out.endswith(b"\r\n\r\nok")


async def test_responses_of_requests_that_arrived_together_are_written_after_all_ran():
    # Handlers woken in one loop turn hold their writes until the last has run, then the
    # writes go out in one burst, one write per connection (outbox.py).
    events: list[str] = []

    async def handler(ex: Exchange) -> None:
        events.append(f"handle {ex.request.path}")
        ex.start(200, [])
        ex.send(b"one")
        ex.send(b"two")
        ex.end()

    transports = connections(handler, events, {n: get(f"/{n}") for n in "abc"})
    await loop_turns(1)
    assert events == ["handle /a", "handle /b", "handle /c", "write a", "write b", "write c"]
    for t in transports:
        assert t.out.endswith(b"\r\n\r\n3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n") and not t.closed


async def test_a_held_response_is_written_before_the_close():
    events: list[str] = []

    async def handler(ex: Exchange) -> None:
        ex.respond(200, [], b"bye")

    a, _ = connections(handler, events, {"a": get("/a", "Connection: close\r\n"), "b": get("/b")})
    await loop_turns(1)
    assert events == ["write a", "close a", "write b"] and a.out.endswith(b"\r\n\r\nbye")


async def test_big_writes_are_not_held():
    # Past HOLD_MAX the transport gets the bytes at once, so its flow control applies.
    events: list[str] = []
    big = b"x" * HOLD_MAX

    async def handler(ex: Exchange) -> None:
        ex.start(200, [])
        ex.send(b"small")
        events.append(f"sent small {ex.request.path}")
        ex.send(big)
        events.append(f"sent big {ex.request.path}")
        ex.end()

    a, _ = connections(handler, events, {"a": get("/a"), "b": get("/b")})
    await loop_turns(1)
    assert events == [
        "sent small /a", "write a", "sent big /a", "sent small /b", "write b", "sent big /b", "write a", "write b",
    ]  # fmt: skip
    assert a.out.endswith(b"5\r\nsmall\r\n%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n")


async def test_a_pipelining_client_does_not_hold_back_other_connections():
    # Each pipelined request is dispatched from its predecessor's response, in a task:
    # that must not keep moving the flush behind it while other connections' answers wait.
    events: list[str] = []

    async def handler(ex: Exchange) -> None:
        ex.respond(200, [], b"ok")

    a, b = connections(handler, events, {"a": get("/a") * 10, "b": get("/b")})
    await loop_turns(3)
    assert "write b" in events and b.out.endswith(b"\r\n\r\nok")
    await loop_turns(20)
    assert a.out.count(b"HTTP/1.1 200 OK") == 10
