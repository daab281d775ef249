"""proxy.http1.client against real servers on 127.0.0.1, scripted byte by byte.

Every test is a fixture-free coroutine so `test_on_uvloop` can run a selection of
them again on uvloop (pytest-asyncio runs the rest on the default loop).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from _garbage import alive, collector_off, cyclic_garbage
from _tls import make_cert
from proxy.http1.client import (
    _HIGH_WATER,
    BodyTooLarge,
    ConnState,
    ConnectFailed,
    ConnectionCut,
    Http1Client,
    Http1Response,
    MAX_FIELD_SIZE,
    MAX_LINE_SIZE,
    ProtocolViolation,
    _Conn,
)
from proxy.http1.outbox import HOLD_MAX, outbox_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head + Content-Length body), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


async def wait_eof(reader: asyncio.StreamReader) -> None:
    """Until the client closes (FIN or reset); whatever it still sends is dropped."""
    with suppress(ConnectionError):
        while await reader.read(65536):
            pass


class RawServer:
    """asyncio.start_server on an ephemeral port; `handler(reader, writer, n)` runs for
    the n-th connection (from 0). Counts connections and how many were open at once."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.requests: list[bytes] = []
        self.closed: list[asyncio.Event] = []  # set when the n-th connection's handler ended
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        n = self.connections
        self.connections += 1
        self.closed.append(asyncio.Event())
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await self.handler(reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # torn down by __aexit__; re-raising would only make asyncio log it
        finally:
            self.open_now -= 1
            writer.close()
            with suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()
            self.closed[n].set()
            self._tasks.discard(task)


def keep_alive(*responses: bytes, delay: float = 0.0, then_close: bool = False) -> Callable[[RawServer], Handler]:
    """Answer each request on a connection with the next response (the last repeats)."""

    def make(srv: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            i = 0
            while (request := await read_request(reader)) is not None:
                srv.requests.append(request)
                if delay:
                    await asyncio.sleep(delay)
                writer.write(responses[min(i, len(responses) - 1)])
                await writer.drain()
                i += 1
                if then_close:
                    return

        return handler

    return make


class Serve(RawServer):
    def __init__(self, make: Callable[[RawServer], Handler], ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(self._dispatch, ssl_context)
        self._handler = make(self)

    async def _dispatch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await self._handler(reader, writer, n)


async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll until `predicate()` (bounded)."""
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


async def get(client: Http1Client, target: str = "/v1/x", cap: int = 1 << 24) -> tuple[int, bytes]:
    resp = await client.request("GET", target, b"", b"")
    return resp.status, await resp.read_all(cap)


# ------------------------------------------------------------------ framing


async def test_content_length_request_bytes_and_keep_alive_reuse() -> None:
    async with Serve(keep_alive(b"HTTP/1.1 201 Created\r\nX-Thing: a\r\nx-thing: b\r\nContent-Length: 5\r\n\r\nhello")) as srv:
        client = Http1Client(srv.url)
        try:
            resp = await client.request("POST", "/v1/chat?x=1", b"Authorization: Bearer k\r\n", b'{"a":1}')
            assert (resp.status, resp.reason) == (201, "Created")
            assert resp.headers["x-thing"] == "a, b" and resp.headers.get("content-length") == "5"
            assert await resp.read() == b"hello"
            assert await resp.read() == b""
            resp.close()  # idempotent after the end
            assert await get(client) == (201, b"hello")
            assert srv.connections == 1 and len(client._idle) == 1
            assert srv.requests[0] == (
                b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer k\r\n"
                b'Content-Length: 7\r\n\r\n{"a":1}' % srv.port
            )
            assert srv.requests[1] == b"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 0\r\n\r\n" % srv.port
        finally:
            await client.close()


def test_host_header_omits_default_port() -> None:
    assert Http1Client("https://api.openai.com/v1").host_header == b"api.openai.com"
    assert Http1Client("http://example.com:80").host_header == b"example.com"
    assert Http1Client("https://example.com:8443/x").host_header == b"example.com:8443"
    assert Http1Client("http://[::1]:8000").host_header == b"[::1]:8000"
    with pytest.raises(ValueError):
        Http1Client("ftp://example.com")


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)


async def test_chunked_split_at_every_boundary() -> None:
    """The same chunked response split in two at every offset, then sent byte by
    byte, all on one keep-alive connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        cut = 1
        while await read_request(reader) is not None:
            pieces = [CHUNKED[:cut], CHUNKED[cut:]] if cut < len(CHUNKED) else [bytes([b]) for b in CHUNKED]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.0005)  # let the client see each piece on its own
            cut += 1

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            for _ in range(len(CHUNKED)):
                resp = await client.request("POST", "/v1/chat", b"", b"{}")
                assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
                body = b""
                while data := await resp.read():
                    body += data
                assert body == b"hello world"
            assert srv.connections == 1
        finally:
            await client.close()


async def test_close_delimited_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"second")
        await writer.drain()

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            assert await get(client) == (200, b"first second")
            assert await get(client) == (200, b"first second")
            assert srv.connections == 2 and client._open == 0
        finally:
            await client.close()


async def test_informational_responses_are_skipped() -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    async with Serve(keep_alive(response)) as srv:
        client = Http1Client(srv.url)
        try:
            resp = await client.request("POST", "/v1/x", b"", b"x")
            assert resp.status == 200 and "link" not in resp.headers
            assert await resp.read_all(10) == b"ok"
            assert await get(client) == (200, b"ok")
            assert srv.connections == 1
        finally:
            await client.close()


async def test_no_body_statuses_and_head() -> None:
    responses = (
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",  # to HEAD
    )
    async with Serve(keep_alive(*responses)) as srv:
        client = Http1Client(srv.url)
        try:
            assert await get(client) == (204, b"")
            assert await get(client) == (304, b"")
            resp = await client.request("HEAD", "/v1/x", b"", b"")
            assert resp.status == 200 and await resp.read() == b""
            assert srv.connections == 1
            # httptools cannot skip a HEAD response's body: that connection is not reused
            await asyncio.wait_for(srv.closed[0].wait(), 2)
            assert client._open == 0
        finally:
            await client.close()


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_not_kept_alive_when_the_server_says_so(response: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        await wait_eof(reader)  # the client must be the one to close

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            assert await get(client) == (200, b"ok")
            await asyncio.wait_for(srv.closed[0].wait(), 2)
            assert await get(client) == (200, b"ok")
            assert srv.connections == 2
        finally:
            await client.close()


async def test_extra_bytes_after_the_body_drop_the_connection() -> None:
    async with Serve(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE\r\n\r\n")) as srv:
        client = Http1Client(srv.url)
        try:
            assert await get(client) == (200, b"ok")
            assert await get(client) == (200, b"ok")
            assert srv.connections == 2
        finally:
            await client.close()


# ------------------------------------------------------------------ failures


async def test_garbage_is_a_protocol_violation() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n" if n == 0 else b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            with pytest.raises(ProtocolViolation):
                await get(client)
            resp = await client.request("GET", "/", b"", b"")
            assert await resp.read() == b"hello"
            with pytest.raises(ProtocolViolation):
                await resp.read()
            await asyncio.wait_for(srv.closed[1].wait(), 2)
            assert client._open == 0
        finally:
            await client.close()


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
)
async def test_cut_mid_body(partial: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(partial)
        await writer.drain()

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            resp = await client.request("GET", "/", b"", b"")
            assert await resp.read() == b"hello"
            with pytest.raises(ConnectionCut):
                await resp.read()
            with pytest.raises(ConnectionCut):
                await resp.read()
            resp.close()
            assert client._open == 0
        finally:
            await client.close()


async def test_a_lost_connection_leaves_no_cycle() -> None:
    """Once the upstream closes, the connection and its response are freed by reference
    counting, also when the response was dropped without close() (a task cancelled as
    its head came in): the cyclic collector's oldest generation is collected rarely."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        writer.close()

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            with collector_off():
                for dropped in (False, True):
                    resp = await client.request("GET", "/", b"", b"", timeout_s=5)
                    with pytest.raises(ConnectionCut):
                        await resp.read_all(100)
                    if not dropped:
                        resp.close()
                    del resp
                await asyncio.sleep(0.05)  # the connections' connection_lost
                garbage = cyclic_garbage()
                left = [type(o).__name__ for o in garbage if isinstance(o, (_Conn, Http1Response))]
                left += [f"live {type(o).__name__}" for o in alive(_Conn, garbage)]
        finally:
            await client.close()
    assert left == []


async def test_refused_port_is_connect_failed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Http1Client(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ConnectFailed) as info:
            await get(client)
        assert str(port) not in str(info.value)
        assert client._open == 0
    finally:
        await client.close()


async def test_connect_timeout() -> None:
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def connect(factory: Callable[[], asyncio.Protocol]) -> Any:
        return await never

    client = Http1Client("http://upstream.test", connect=connect, connect_timeout_s=0.02)
    try:
        with pytest.raises(ConnectFailed, match="timed out"):
            await get(client)
        assert client._open == 0
    finally:
        await client.close()


# ------------------------------------------------------------------ stale keep-alive connections


async def test_stale_pooled_connection_is_retried_once_on_a_new_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nconn%d" % (5, n))
        await writer.drain()
        if n == 0:
            await read_request(reader)  # the server "timed out" the connection as this arrived
            return
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            assert await get(client) == (200, b"conn0")
            assert await get(client) == (200, b"conn1")
            assert srv.connections == 2 and client._open == 1
        finally:
            await client.close()


@pytest.mark.parametrize("second", [b"", b"HTTP/1.1 200 O"])
async def test_no_retry_on_a_fresh_connection_or_after_response_bytes(second: bytes) -> None:
    """`second` b"": the fresh connection is closed before any response byte;
    otherwise a reused connection is cut after part of the status line."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if second:
            writer.write(OK)
            await read_request(reader)
            writer.write(second)
            await writer.drain()

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            if second:
                assert await get(client) == (200, b"hello")
            with pytest.raises(ConnectionCut):
                await get(client)
            assert srv.connections == 1 and client._open == 0
        finally:
            await client.close()


async def test_idle_connection_closed_by_the_server_leaves_the_pool() -> None:
    async with Serve(keep_alive(OK, then_close=True)) as srv:
        client = Http1Client(srv.url)
        try:
            assert await get(client) == (200, b"hello")
            await wait_for(lambda: not client._idle)
            assert client._open == 0
            assert await get(client) == (200, b"hello")
            assert srv.connections == 2
        finally:
            await client.close()


async def test_idle_connections_expire_after_keepalive_s() -> None:
    async with Serve(keep_alive(OK)) as srv:
        client = Http1Client(srv.url, keepalive_s=0.05)
        try:
            assert await get(client) == (200, b"hello")
            assert len(client._idle) == 1
            await asyncio.wait_for(srv.closed[0].wait(), 2)  # closed by the timer
            assert not client._idle and client._open == 0
            assert await get(client) == (200, b"hello")
            assert srv.connections == 2
        finally:
            await client.close()


# ------------------------------------------------------------------ back pressure


async def test_slow_reader_pauses_the_socket() -> None:
    size = 4 * 1024 * 1024
    body = bytes(range(256)) * (size // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
            await writer.drain()

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            resp = await client.request("GET", "/", b"", b"")
            conn = resp._conn
            assert conn is not None
            await wait_for(lambda: resp._size > _HIGH_WATER)
            assert conn.paused
            buffered = resp._size
            assert buffered <= 2 * _HIGH_WATER  # at most one socket read past the mark
            await asyncio.sleep(0.05)
            assert resp._size == buffered  # nothing more read while paused
            first = await resp.read()
            assert len(first) == buffered and not conn.paused
            rest = await resp.read_all(size)
            assert first + rest == body
            assert await get(client, cap=size) == (200, body)
            assert srv.connections == 1
        finally:
            await client.close()


async def test_read_all_cap() -> None:
    responses = (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", b"HTTP/1.1 200 OK\r\n\r\nhello world")

    async with Serve(keep_alive(*responses)) as srv:
        client = Http1Client(srv.url)
        try:
            for _ in responses:
                resp = await client.request("GET", "/", b"", b"")
                with pytest.raises(BodyTooLarge):
                    await resp.read_all(5)
            # The first body had arrived whole, so its connection was fit for reuse;
            # the second (delimited by the close) was cut short.
            assert srv.connections == 1
            assert client._open == 0
        finally:
            await client.close()


# ------------------------------------------------------------------ pool limits and cancellation


async def test_pool_limit_and_fifo_waiting() -> None:
    async with Serve(keep_alive(OK, delay=0.01)) as srv:
        client = Http1Client(srv.url, max_connections=2)
        try:
            results = await asyncio.gather(*(get(client) for _ in range(5)))
            assert results == [(200, b"hello")] * 5
            assert srv.max_open <= 2 and srv.connections == 2
            assert client._open == 2 and not client._waiters
        finally:
            await client.close()
        assert client._open == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    async with Serve(keep_alive(OK)) as srv:
        client = Http1Client(srv.url, max_connections=1)
        try:
            first = await client.request("GET", "/", b"", b"")  # holds the only connection
            waiting = asyncio.create_task(get(client))
            await wait_for(lambda: len(client._waiters) == 1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert not client._waiters
            assert await first.read_all(10) == b"hello"
            assert await get(client) == (200, b"hello")

            # Cancelled just as the connection was handed over: it goes back to the pool.
            first = await client.request("GET", "/", b"", b"")
            waiting = asyncio.create_task(get(client))
            await wait_for(lambda: len(client._waiters) == 1)
            first.close()  # body complete: handed to the waiter
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert len(client._idle) == 1 and client._open == 1
            assert await get(client) == (200, b"hello")
            assert srv.connections == 1
        finally:
            await client.close()


async def test_cancelled_waiter_passes_on_a_free_slot() -> None:
    async with Serve(keep_alive(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")) as srv:
        client = Http1Client(srv.url, max_connections=1)
        try:
            first = await client.request("GET", "/", b"", b"")
            waiting = asyncio.create_task(get(client))
            await wait_for(lambda: len(client._waiters) == 1)
            first.close()  # Connection: close: the slot (not the connection) goes to the waiter
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert client._open == 0
            assert await get(client) == (200, b"hello")
        finally:
            await client.close()


async def test_cancel_mid_body_closes_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello" if n == 0 else OK)
        await writer.drain()
        await wait_eof(reader)

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            resp = await client.request("GET", "/", b"", b"")
            assert await resp.read() == b"hello"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.02):
                    await resp.read()
            await asyncio.wait_for(srv.closed[0].wait(), 2)
            assert client._open == 0 and not client._idle
            with pytest.raises(ConnectionCut):
                await resp.read()
            resp.close()
            assert await get(client) == (200, b"hello")
            assert srv.connections == 2
        finally:
            await client.close()


async def test_cancel_before_the_response_closes_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:
            await wait_eof(reader)  # never answers
        else:
            writer.write(OK)
            await wait_eof(reader)

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.02):
                    await client.request("GET", "/", b"", b"")
            await asyncio.wait_for(srv.closed[0].wait(), 2)
            assert client._open == 0
            assert await get(client) == (200, b"hello")
        finally:
            await client.close()


async def test_head_deadlines_share_one_timer_and_each_fires_on_time() -> None:
    """`timeout_s` bounds the wait for the response head: one timer per client serves
    every request in flight (the earliest deadline), re-armed as requests finish."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await read_request(reader)) is not None:
            if b"/slow" in request:
                await wait_eof(reader)  # never answers
                return
            if b"/late" in request:
                await release.wait()
            writer.write(OK)
            await writer.drain()

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url)
        loop = asyncio.get_running_loop()
        try:
            t0 = loop.time()
            slow_long = asyncio.create_task(client.request("GET", "/slow", b"", b"", timeout_s=0.6))
            await asyncio.sleep(0.01)
            slow_short = asyncio.create_task(client.request("GET", "/slow", b"", b"", timeout_s=0.1))
            late_ok = asyncio.create_task(client.request("GET", "/late", b"", b"", timeout_s=5))
            with pytest.raises(TimeoutError):
                await slow_short   # the shorter deadline re-armed the shared timer earlier
            assert loop.time() - t0 < 0.5 and not slow_long.done() and not late_ok.done()
            release.set()
            resp = await late_ok   # answered in time: its deadline never fires
            assert resp.status == 200 and await resp.read_all(1024) == b"hello"
            with pytest.raises(TimeoutError):
                await slow_long
            assert 0.55 <= loop.time() - t0 < 2
            await asyncio.sleep(0.05)
            assert await get(client) == (200, b"hello")   # the client still works
            assert client._open == 1   # both timed-out connections were closed
        finally:
            await client.close()


async def test_close_ends_idle_busy_and_waiting() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello" if n == 1 else OK)
            await writer.drain()

    async with RawServer(handler) as srv:
        client = Http1Client(srv.url, max_connections=2)
        complete = await client.request("GET", "/", b"", b"")  # connection 0, whole body unread
        busy = await client.request("GET", "/", b"", b"")  # connection 1, mid-body
        assert await busy.read() == b"hello"
        waiting = asyncio.create_task(get(client))
        await wait_for(lambda: len(client._waiters) == 1)

        await client.close()
        await asyncio.wait_for(asyncio.gather(srv.closed[0].wait(), srv.closed[1].wait()), 2)
        assert await complete.read_all(10) == b"hello"  # it had all arrived
        with pytest.raises(ConnectionCut):
            await busy.read()
        with pytest.raises(ConnectFailed):
            await waiting
        with pytest.raises(ConnectFailed):
            await get(client)
        assert client._open == 0 and not client._conns
        await client.close()  # idempotent

        client = Http1Client(srv.url)
        assert await get(client) == (200, b"hello")
        assert len(client._idle) == 1
        await client.close()
        await asyncio.wait_for(srv.closed[2].wait(), 2)
        assert client._open == 0 and not client._idle


# ------------------------------------------------------------------ TLS


async def test_tls(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    async with Serve(keep_alive(OK, chunked), ssl_context=server_ctx) as srv:
        client = Http1Client(srv.url, ssl_context=ssl.create_default_context(cafile=str(cert)))
        try:
            assert await get(client) == (200, b"hello")
            assert await get(client) == (200, b"abc")
            assert srv.connections == 1
            assert srv.requests[0].startswith(b"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % srv.port)
        finally:
            await client.close()
        await asyncio.wait_for(srv.closed[0].wait(), 2)

        untrusting = Http1Client(srv.url)  # the system trust store does not know this certificate
        try:
            with pytest.raises(ConnectFailed, match="TLS"):
                await get(untrusting)
            assert untrusting._open == 0
        finally:
            await untrusting.close()


# ------------------------------------------------------------------ connect=


class _CountingTransport:
    """Wraps a transport to count write() calls."""

    def __init__(self, inner: asyncio.Transport, writes: list[bytes]) -> None:
        self._inner = inner
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(data)
        self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Shim(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, writes: list[bytes]) -> None:
        self._inner = inner
        self._writes = writes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(_CountingTransport(transport, self._writes))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)


def shim_connector(server: web.Server, writes: list[Any]) -> Callable[
    [Callable[[], asyncio.Protocol]], Awaitable[tuple[asyncio.Transport, asyncio.Protocol]]
]:
    """A `connect=` to `server` over a socket pair, noting every write the client makes."""

    async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        await loop.connect_accepted_socket(server, theirs)
        inner = factory()
        transport, _ = await loop.create_connection(lambda: _Shim(inner, writes), sock=ours)
        return transport, inner

    return connect


async def test_connect_over_a_socketpair_to_aiohttp() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/v1/stream":
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b"a")
            await resp.write(b"b")
            await resp.write_eof()
            return resp
        return web.Response(body=b"echo:" + body, headers={"X-Host": request.host})

    server = web.Server(handler)
    writes: list[bytes] = []
    connects = 0
    to_server = shim_connector(server, writes)

    async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, asyncio.Protocol]:
        nonlocal connects
        connects += 1
        return await to_server(factory)

    client = Http1Client("http://upstream.test/v1", connect=connect)
    try:
        resp = await client.request("POST", "/v1/echo", b"Content-Type: text/plain\r\n", b"hi")
        assert resp.status == 200 and resp.headers["x-host"] == "upstream.test"
        assert await resp.read_all(100) == b"echo:hi"
        resp = await client.request("POST", "/v1/stream", b"", b"")
        assert resp.headers["transfer-encoding"] == "chunked"
        assert await resp.read_all(100) == b"ab"
        assert connects == 1
        assert writes == [
            b"POST /v1/echo HTTP/1.1\r\nHost: upstream.test\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
            b"POST /v1/stream HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 0\r\n\r\n",
        ]
    finally:
        await client.close()
        await server.shutdown(1)


async def test_requests_of_handlers_woken_together_are_written_after_all_ran() -> None:
    # Held writes (proxy/http1/outbox.py): requests made by handlers woken in one loop
    # turn go out once all of them were made; a body of HOLD_MAX or more goes to the
    # transport at once; a request made alone is written at once.
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b"%d" % len(await request.read()))

    server = web.Server(handler)
    loop = asyncio.get_running_loop()
    log: list[Any] = []  # the shim's writes (bytes) and our marks (str), in order
    client = Http1Client("http://upstream.test/v1", connect=shim_connector(server, log))

    async def call(mark: str, body: bytes) -> bytes:
        log.append(mark)
        resp = await client.request("POST", "/v1/x", b"", body)
        return await resp.read_all(100)

    async def woken_together(*calls: Awaitable[bytes]) -> list[bytes]:
        tasks = [asyncio.ensure_future(c) for c in calls]
        for _ in tasks:   # as the server's callbacks do for requests arriving together
            outbox_for(loop).arm()
        return await asyncio.gather(*tasks)

    def order() -> list[str]:
        return [x if isinstance(x, str) else "write" for x in log]

    try:
        assert await asyncio.gather(*(call("warm", b"") for _ in range(3))) == [b"0"] * 3  # three pooled
        log.clear()
        assert await call("alone", b"") == b"0"
        assert order() == ["alone", "write"]
        log.clear()
        assert await woken_together(call("a", b"1"), call("b", b"22"), call("c", b"333")) == [b"1", b"2", b"3"]
        assert order() == ["a", "b", "c", "write", "write", "write"]
        log.clear()
        big = b"x" * HOLD_MAX
        assert await woken_together(call("big", big), call("small", b"")) == [b"%d" % len(big), b"0"]
        assert order() == ["big", "write", "small", "write"]
    finally:
        await client.close()
        await server.shutdown(1)


# ------------------------------------------------------------------ uvloop

ON_UVLOOP: list[Callable[[], Awaitable[None]]] = [
    test_content_length_request_bytes_and_keep_alive_reuse,
    test_chunked_split_at_every_boundary,
    test_close_delimited_body,
    test_stale_pooled_connection_is_retried_once_on_a_new_one,
    test_slow_reader_pauses_the_socket,
    test_pool_limit_and_fifo_waiting,
    test_cancelled_waiter_does_not_leak_a_slot,
    test_cancel_mid_body_closes_the_connection,
    test_close_ends_idle_busy_and_waiting,
    test_connect_over_a_socketpair_to_aiohttp,
    test_requests_of_handlers_woken_together_are_written_after_all_ran,
    test_a_lost_connection_leaves_no_cycle,
]


def test_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        for scenario in ON_UVLOOP:
            await scenario()
        with tempfile.TemporaryDirectory() as tmp:
            await test_tls(Path(tmp))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# ------------------------------------------------------------------ response head bounds (issue 25 item 2)


def _endless_header_line(limit: int) -> Handler:
    """A head whose one header line never ends: sent in 64 KiB pieces, up to `limit` bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
        sent = 0
        while sent < limit:
            writer.write(b"a" * 65536)
            await writer.drain()
            sent += 65536
        await wait_eof(reader)

    return handler


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 " + b"O" * (MAX_LINE_SIZE + 1) + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * MAX_FIELD_SIZE + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(40_000)) + b"Content-Length: 0\r\n\r\n",
    ],
    ids=["status-line", "field", "head-bytes"],
)
async def test_response_heads_over_a_bound_are_protocol_violations(head: bytes) -> None:
    async with Serve(keep_alive(head)) as srv:
        client = Http1Client(srv.url)
        try:
            with pytest.raises(ProtocolViolation):
                await get(client)
            assert client._open == 0
        finally:
            await client.close()


async def test_an_endless_header_line_is_refused_after_the_head_bound_not_buffered() -> None:
    """The 300 MB header line: refused once MAX_HEAD_BYTES arrived (plus a read), and the
    server sees the connection closed long before it could send it all."""
    async with RawServer(_endless_header_line(64 * 1024 * 1024)) as srv:
        client = Http1Client(srv.url)
        try:
            with pytest.raises(ProtocolViolation, match="head larger"):
                await get(client)
            await asyncio.wait_for(srv.closed[0].wait(), 5)
        finally:
            await client.close()


async def test_many_repeated_header_lines_are_joined_once() -> None:
    """20,000 lines of one name (the audit's event-loop freeze when joined line by line):
    within the bounds, all kept, in order, joined with ', '."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-R: %d\r\n" % i for i in range(20_000)) + b"Content-Length: 2\r\n\r\nok"
    async with Serve(keep_alive(head)) as srv:
        client = Http1Client(srv.url)
        try:
            resp = await client.request("GET", "/", b"", b"")
            assert resp.headers["x-r"] == ", ".join(str(i) for i in range(20_000))
            assert resp.headers["content-length"] == "2" and await resp.read_all(10) == b"ok"
        finally:
            await client.close()


# ------------------------------------------------------------------ connection life cycle (issue 21 item 6)


async def test_connection_state_follows_the_life_cycle() -> None:
    """NEW (lent, nothing sent) -> ACTIVE (exchange) -> IDLE (pooled) -> ACTIVE (reused)
    -> CLOSED (torn down), and a connection not kept alive goes CLOSED, never IDLE."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with Serve(keep_alive(ok, ok, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")) as srv:
        client = Http1Client(srv.url)
        try:
            resp = await client.request("GET", "/", b"", b"")
            conn = resp._conn
            assert conn is not None and conn.state is ConnState.ACTIVE
            assert await resp.read_all(10) == b"ok"
            assert conn.state is ConnState.IDLE and list(client._idle) == [conn]
            again = await client.request("GET", "/", b"", b"")
            assert again._conn is conn and conn.state is ConnState.ACTIVE and not client._idle
            again.close()  # the body is in: back to the pool
            assert conn.state is ConnState.IDLE
            last = await client.request("GET", "/", b"", b"")
            assert await last.read_all(10) == b"ok"
            assert conn.state is ConnState.CLOSED and not client._idle and client._open == 0
            await wait_for(lambda: conn.lost)
            fresh, reused = await client._acquire(False)
            assert not reused and fresh.state is ConnState.NEW
            fresh.abort()
            assert fresh.state is ConnState.CLOSED
        finally:
            await client.close()
