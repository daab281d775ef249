"""A prototype of a lean upstream client, to measure what aiohttp's ClientSession costs
per request (bench/patches.py `client`). NOT production code: plain http:// only, no
pool limit, no proxy support; it exists to put a number on a proposal.

It replaces `proxy.forward.open_response` / `request_headers` with an asyncio.Protocol
per pooled keep-alive connection: the request head is one pre-joined bytes write with
the body, the response head is parsed with bytes.find/split, the body (Content-Length,
chunked or until close) is handed to the forwarder through the two methods it uses
(`content.readany()`, `content.read(n)`), with pause_reading/resume_reading as back
pressure. Failures raise the aiohttp exceptions the forwarder already handles.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Mapping
from urllib.parse import urlsplit

import aiohttp

_HIGH_WATER = 256 * 1024


class _Headers(dict):  # type: ignore[type-arg]
    """Response headers, lower-cased names (the forwarder only calls .get)."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)


class _Body:
    __slots__ = ("_chunks", "_size", "_eof", "_exc", "_waiter", "_conn")

    def __init__(self, conn: "_Conn") -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._size = 0
        self._conn.resume()
        return data

    async def read(self, n: int = -1) -> bytes:
        """The whole body (up to n bytes): unlike aiohttp's read(n), waits for EOF."""
        parts = []
        size = 0
        while True:
            block = await self.readany()
            if not block:
                break
            parts.append(block)
            size += len(block)
            if 0 <= n <= size:
                break
        data = b"".join(parts)
        return data if n < 0 else data[:n]


class _Response:
    __slots__ = ("status", "headers", "content", "_conn", "_done")

    def __init__(self, status: int, headers: _Headers, conn: "_Conn") -> None:
        self.status = status
        self.headers = headers
        self.content = _Body(conn)
        self._conn = conn
        self._done = False

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._conn.abandon()

    def release(self) -> None:
        self.close()


class _Conn(asyncio.Protocol):
    def __init__(self, pool: "_Pool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.head_waiter: asyncio.Future[_Response] | None = None
        self.resp: _Response | None = None
        self.remaining = -1          # Content-Length left; -1 chunked; -2 until close
        self.chunk_left = 0          # chunked: bytes left of the current chunk (+2 for CRLF)
        self.in_trailer = False
        self.reusable = True
        self.got_bytes = False
        self.paused = False

    # -- protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if self.head_waiter is not None and not self.head_waiter.done():
            err = aiohttp.ServerDisconnectedError() if not self.got_bytes else aiohttp.ClientOSError("connection lost")
            self.head_waiter.set_exception(err)
        if self.resp is not None and not self.resp.content._eof:
            if self.remaining == -2:
                self.resp.content.feed_eof()
            else:
                self.resp.content.fail(aiohttp.ClientPayloadError("upstream closed mid-body"))
        self.pool.forget(self)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.resp is None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.buf[:end], self.buf[end + 4 :]
            self.buf = b""
            self._start(head)
            if self.resp is None:
                return
        if data:
            self._body(data)

    # -- internals ---------------------------------------------------------------
    def _start(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self._bad("bad status line")
            return
        headers = _Headers()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        resp = _Response(status, headers, self)
        self.resp = resp
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.remaining, self.chunk_left, self.in_trailer = -1, 0, False
        elif (cl := headers.get("content-length")) is not None:
            self.remaining = int(cl)
        elif status in (204, 304) or 100 <= status < 200:
            self.remaining = 0
        else:
            self.remaining, self.reusable = -2, False
        waiter, self.head_waiter = self.head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)
        if self.remaining == 0:
            self._complete()

    def _bad(self, why: str) -> None:
        self.reusable = False
        err = aiohttp.ClientPayloadError(why)
        if self.head_waiter is not None and not self.head_waiter.done():
            self.head_waiter.set_exception(err)
        if self.resp is not None:
            self.resp.content.fail(err)
        if self.transport is not None:
            self.transport.abort()

    def _body(self, data: bytes) -> None:
        resp = self.resp
        assert resp is not None
        if self.remaining >= 0:
            if len(data) >= self.remaining:
                data = data[: self.remaining]
                self.remaining = 0
                if data:
                    resp.content.feed(data)
                self._complete()
                return
            self.remaining -= len(data)
            resp.content.feed(data)
            return
        if self.remaining == -2:
            resp.content.feed(data)
            return
        # chunked: chunk_left counts the data bytes left plus the CRLF after them
        buf = self.buf + data if self.buf else data
        self.buf = b""
        out = []
        pos = 0
        n = len(buf)
        while pos < n:
            if self.chunk_left > 2:
                take = min(self.chunk_left - 2, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                continue
            if self.chunk_left > 0:          # the CRLF after a chunk's data
                take = min(self.chunk_left, n - pos)
                pos += take
                self.chunk_left -= take
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                self.buf = buf[pos:]
                break
            line = buf[pos:eol]
            pos = eol + 2
            if self.in_trailer:
                if not line:                  # the blank line that ends the message
                    if out:
                        resp.content.feed(b"".join(out))
                    self._complete()
                    return
                continue                      # a trailer field: ignored
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                self._bad("bad chunk size")
                return
            if size == 0:
                self.in_trailer = True
                continue
            self.chunk_left = size + 2
        if out:
            resp.content.feed(b"".join(out) if len(out) > 1 else out[0])

    def _complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        resp.content.feed_eof()
        resp._done = True
        self.resp = None
        if self.reusable and self.transport is not None and not self.transport.is_closing():
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """The forwarder closed a response before its end: this connection is spent."""
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> asyncio.Future[_Response]:
        assert self.transport is not None
        self.head_waiter = asyncio.get_running_loop().create_future()
        self.got_bytes = False
        self.transport.write(data)
        return self.head_waiter


class _Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Conn] = []

    def release(self, conn: _Conn) -> None:
        self.idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    async def acquire(self, connect_s: float) -> tuple[_Conn, bool]:
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_s):
                _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise aiohttp.ClientConnectorError(None, OSError(str(exc))) from None  # type: ignore[arg-type]
        return conn, False


_POOLS: dict[tuple[str, int], _Pool] = {}
_STATIC: dict[int, bytes] = {}


def install() -> None:
    import proxy.forward as fwd
    import proxy.upstream as up
    from proxy.errors import UpstreamError, UpstreamTimeout

    original_open = up.open_response
    original_headers = up.request_headers
    forwarded = up.FORWARDED_REQUEST_HEADERS

    def request_headers(client_headers: Mapping[str, str], target: Any, request_id: str) -> Any:
        if not target.base_url.startswith("http://"):
            return original_headers(client_headers, target, request_id)
        static = _STATIC.get(id(target))
        if static is None:
            parts = [f"{k}: {v}\r\n" for k, v in target.headers.items()]
            static = _STATIC[id(target)] = (
                "Content-Type: application/json\r\nAccept-Encoding: identity\r\n" + "".join(parts)
            ).encode("latin-1")
        extra = "".join(f"{k}: {v}\r\n" for k, v in client_headers.items() if k.lower() in forwarded)
        return (static, (extra + f"X-Request-Id: {request_id}\r\n").encode("latin-1"))

    async def open_response(target: Any, url: str, body: bytes, headers: Any) -> Any:
        if not isinstance(headers, tuple):
            return await original_open(target, url, body, headers)
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        pool = _POOLS.get((host, port))
        if pool is None:
            pool = _POOLS[(host, port)] = _Pool(host, port)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        static, dynamic = headers
        data = b"".join((
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode("latin-1"), static, dynamic,
            b"Content-Length: %d\r\n\r\n" % len(body), body,
        ))
        timeouts = target.config.timeouts
        try:
            async with asyncio.timeout(timeouts.first_byte_s):
                for attempt in (0, 1):
                    conn, reused = await pool.acquire(timeouts.connect_s)
                    try:
                        return await conn.send(data)
                    except aiohttp.ServerDisconnectedError:
                        if not reused or attempt:
                            raise
                        # a pooled connection the upstream had closed: once more, fresh
        except TimeoutError:
            raise UpstreamTimeout("The upstream did not answer in time.") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"The upstream is unreachable ({type(exc).__name__}).") from None
        raise UpstreamError("The upstream is unreachable.")

    fwd.open_response = open_response  # type: ignore[assignment]
    fwd.request_headers = request_headers  # type: ignore[assignment]
