"""A lean pooled HTTP/1.1 client for upstream model calls.

aiohttp's ClientSession costs about 30 % of the gateway's CPU per request; this
client does only what the hot path needs: one pre-joined write per request, the
response parsed by httptools (llhttp, in C) straight from `data_received`, the
body handed over as the bytes objects the parser produced, and a small pool of
keep-alive connections per upstream. Timeouts cost no timer per request: the
connect timeout, the response head's (`request(timeout_s=)`: one timer per client for
the earliest deadline) and the body's quiet spells (`read_within`, `read_all(idle_s=)`:
one timer per response, armed only when a read has to wait).

A response head is bounded like aiohttp bounds it: the status line and each header line
at `MAX_LINE_SIZE` / `MAX_FIELD_SIZE` bytes, at most `MAX_HEADERS` header lines, and the
whole head (1xx heads included) at `MAX_HEAD_BYTES`, counted as the bytes arrive, so a
hostile upstream's endless header line is refused after one read past the bound, never
buffered whole. Repeated fields are gathered and joined once, at the end of the head:
work per head grows with its bytes, never faster. A head over a bound is a
ProtocolViolation (the caller answers 502).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httptools

from proxy.http1.headers import HEADER_KEYS, Headers, header_key
from proxy.http1.outbox import HOLD_MAX, outbox_for

__all__ = [
    "BodyTooLarge",
    "ConnectFailed",
    "ConnectionCut",
    "Http1Client",
    "Http1Response",
    "ProtocolViolation",
    "UpstreamConnectionError",
]

# Unread body bytes above which the socket stops being read (back pressure to the upstream).
_HIGH_WATER = 256 * 1024
# close(): how long to wait for the transports to finish closing (TLS shutdown) before aborting them.
_CLOSE_WAIT_S = 1.0
# Response head bounds (aiohttp's client defaults for lines and count; a total for the head).
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 32768
MAX_HEAD_BYTES = 256 * 1024

ProtocolFactory = Callable[[], asyncio.Protocol]
ConnectFn = Callable[[ProtocolFactory], Awaitable[tuple[asyncio.Transport, asyncio.Protocol]]]


class UpstreamConnectionError(Exception):
    """Base: the upstream connection failed."""


class ConnectFailed(UpstreamConnectionError):
    """Could not connect (refused, DNS, TLS handshake, connect timeout)."""


class ConnectionCut(UpstreamConnectionError):
    """The connection closed or reset before the response (or its body) was complete."""


class ProtocolViolation(UpstreamConnectionError):
    """The upstream sent something that is not valid HTTP/1.1 (httptools error)."""


class BodyTooLarge(UpstreamConnectionError):
    """read_all(): the body is larger than the caller's cap."""


class Http1Response:
    """Status and headers of an upstream response; the body is read with `read()`.

    The caller must either read the body to its end (`read()` returning b"") or call
    `close()`; until then the connection stays busy and holds a pool slot.
    """

    __slots__ = (
        "status", "reason", "headers", "_conn", "_chunks", "_size", "_eof", "_exc", "_waiter",
        "_loop", "_arrived", "_quiet_s", "_timer", "_timed_out",
    )  # fmt: skip

    def __init__(self, conn: _Conn, status: int, reason: str, headers: Headers) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._conn: _Conn | None = conn  # None once handed back to the pool or closed
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0  # bytes in _chunks
        self._eof = False  # the whole body arrived
        self._exc: UpstreamConnectionError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # read_within(): one timer per response, re-armed only when it fires.
        loop = conn.client._loop
        assert loop is not None  # set by the request that made this response
        self._loop = loop
        self._arrived = loop.time()  # when body data last arrived (or a quiet spell ended)
        self._quiet_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call, b"" at the end of the body.

        Waits for data when none is buffered. Pieces that arrived while nobody was
        reading are returned joined (a single piece is returned as is, not copied).
        Raises ConnectionCut (or ProtocolViolation) once the buffered data is used up
        if the body ended early.
        """
        chunks = self._chunks
        while not chunks:
            if (exc := self._exc) is not None:
                # A fresh one each time: raising the kept one would give it a traceback
                # holding this frame, which holds this response, which holds it.
                raise type(exc)(*exc.args)
            if self._eof:
                self._release()
                return b""
            await self._wait()
        return self._take()

    async def _wait(self) -> None:
        """Until body data, the end of the body, a failure or a read_within timer."""
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        except asyncio.CancelledError:
            # The caller gave up mid-body: the connection is half-used, tear it down.
            self._abandon()
            raise
        finally:
            self._waiter = None

    def _take(self) -> bytes:
        """Everything buffered (at least one piece), handed over."""
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return data

    async def read_within(self, quiet_s: float) -> bytes | None:
        """Like `read()`, but None when no body data arrived for `quiet_s` seconds (since
        the last data or the last None); the response stays usable and loses nothing.

        For relaying streams with keep-alives and idle timeouts without creating a
        timeout per read: one timer per response, checked lazily when it fires.
        """
        if self._chunks:
            return self._take()  # the usual case mid-stream: no coroutine, no future
        if not self._eof and self._exc is None:
            self._quiet_s = quiet_s
            if self._timer is None:
                self._timer = self._loop.call_at(self._arrived + quiet_s, self._on_timer)
            await self._wait()
            if self._timed_out:
                self._timed_out = False
                self._arrived = self._loop.time()
                return None
            if self._chunks:
                return self._take()
        return await self.read()  # end of body or failure

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody is waiting; the next read_within() arms it again
        deadline = self._arrived + self._quiet_s
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)  # data came meanwhile
            return
        self._timed_out = True
        waiter.set_result(None)

    async def read_all(self, cap: int, idle_s: float | None = None) -> bytes:
        """The whole body; BodyTooLarge (and the connection closed) past `cap` bytes;
        TimeoutError when `idle_s` passes without body data (no timer when it is there)."""
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            self.close()
            raise BodyTooLarge(f"the upstream response body is larger than {cap} bytes")
        parts: list[bytes] = []
        size = 0
        data: bytes | None
        while True:
            if self._chunks:
                data = self._take()  # usually the whole body came with the head: no coroutine
            elif self._eof and self._exc is None:
                self._release()
                break
            else:
                data = await (self.read() if idle_s is None else self.read_within(idle_s))
                if data is None:
                    self.close()
                    raise TimeoutError("the upstream stopped sending the body")
                if not data:
                    break
            size += len(data)
            if size > cap:
                self.close()
                raise BodyTooLarge(f"the upstream response body is larger than {cap} bytes")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Done with this response (idempotent).

        If the whole body has arrived (read or not) and the connection may be kept
        alive, it goes back to the pool; otherwise it is torn down.
        """
        if self._eof and self._exc is None:
            self._release()
        else:
            self._abandon()
        self._chunks.clear()
        self._size = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- fed by the connection -------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._arrived = self._loop.time()
        self._chunks.append(data)
        self._size += len(data)
        conn = self._conn
        if self._size > _HIGH_WATER and conn is not None:
            conn.pause()
        self._wake()

    def _end(self) -> None:
        if self._exc is None:
            self._eof = True
            self._wake()

    def _fail(self, exc: UpstreamConnectionError) -> None:
        if not self._eof and self._exc is None:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish()

    def _abandon(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abort()
        if not self._eof and self._exc is None:
            self._exc = ConnectionCut("the response was closed before the end of its body")


class _Conn(asyncio.Protocol):
    """One upstream connection; its parser callbacks drive the response in flight."""

    __slots__ = (
        "client", "parser", "transport", "lost", "reusable", "paused", "holds_slot", "idle",
        "idle_since", "lost_waiter", "expecting", "got_bytes", "head_waiter", "head_deadline", "resp", "headers",
        "reason", "is_head", "until_close", "out", "outbox", "head_bytes", "nheaders", "repeated", "refused",
    )  # fmt: skip

    def __init__(self, client: Http1Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.lost = False  # connection_lost has run
        self.reusable = True  # may go back to the pool after this exchange
        self.paused = False
        self.holds_slot = True  # counts against max_connections until discarded
        self.idle = False  # in client._idle
        self.idle_since = 0.0
        self.lost_waiter: asyncio.Future[None] | None = None  # only made by Http1Client.close()
        # the exchange in flight
        self.expecting = False  # a response is due and not complete yet
        self.got_bytes = False  # any byte of the response arrived (no stale-connection retry then)
        self.head_waiter: asyncio.Future[Http1Response] | None = None
        self.head_deadline = 0.0  # loop time by which the head must be in (with a timeout)
        self.resp: Http1Response | None = None
        self.headers = Headers()
        self.reason = b""
        self.is_head = False
        self.until_close = False  # no framing: the body ends when the connection does
        # The response head being received: its bytes so far (None once it is complete),
        # its header lines, the values of repeated fields (joined at the end of the head),
        # and why it was refused (a bound it passed).
        self.head_bytes: int | None = None
        self.nheaders = 0
        self.repeated: dict[str, list[str]] | None = None
        self.refused = ""
        # A request held until the handlers woken with the one that made it have run (outbox.py).
        self.out: bytes | None = None
        assert client._loop is not None  # set before any connection is made
        self.outbox = outbox_for(client._loop)
        self.parser = httptools.HttpResponseParser(self)

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection: always a Transport

    def data_received(self, data: bytes) -> None:
        if not self.expecting:
            # Bytes no request asked for: the connection can no longer be trusted.
            self.reusable = False
            if self.resp is None:
                self.close()
            return
        self.got_bytes = True
        if self.head_bytes is not None:
            # httptools buffers a header line whole before on_header: the head is bounded
            # as the bytes arrive (checked after each read, so by at most one read over),
            # and no line can grow past it.
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._violation("unexpected protocol switch")
        except httptools.HttpParserError as exc:
            self._violation(self.refused or str(exc) or type(exc).__name__)
            return
        if self.head_bytes is not None and self.head_bytes > MAX_HEAD_BYTES:
            self._violation(f"response head larger than {MAX_HEAD_BYTES} bytes")
        # The reader these bytes woke (a relay, a handler) writes in its next step: the
        # flush goes behind it.
        self.outbox.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.client._discard(self)
        waiter = self.head_waiter
        if waiter is not None:
            self.head_waiter = None
            if not waiter.done():
                waiter.set_exception(ConnectionCut("the upstream closed the connection before responding"))
        resp = self.resp
        if resp is not None and not resp._eof:
            if self.until_close:
                resp._end()
            else:
                resp._fail(ConnectionCut("the upstream closed the connection before the end of the body"))
        if self.lost_waiter is not None and not self.lost_waiter.done():
            self.lost_waiter.set_result(None)
        # Break the cycles through this connection: its parser's callbacks are bound
        # methods of it, and a response refers back to it (one dropped unclosed, by a
        # task cancelled just as its head came in, would keep both): see
        # _Connection.connection_lost in proxy/http1/server.py.
        del self.parser
        self.resp = None

    # -- httptools callbacks -------------------------------------------------------
    def on_message_begin(self) -> None:
        if not self.expecting:
            self.reusable = False  # a second response to one request
        self.headers = Headers()
        self.reason = b""
        self.nheaders = 0
        self.repeated = None

    def on_status(self, status: bytes) -> None:
        self.reason += status  # llhttp may hand it over in pieces
        if len(self.reason) > MAX_LINE_SIZE:
            self._refuse(f"status line longer than {MAX_LINE_SIZE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.nheaders += 1
        if len(name) + len(value) > MAX_FIELD_SIZE or self.nheaders > MAX_HEADERS:
            self._refuse(f"a header line over {MAX_FIELD_SIZE} bytes or more than {MAX_HEADERS} of them")
        key = HEADER_KEYS.get(name)  # see _Connection.on_header in server.py
        if key is None:
            key = header_key(name)
        headers = self.headers
        if key in headers:
            # Joined once at the end of the head: joining here, per line, would copy the
            # value so far each time (quadratic in the lines of one name).
            repeated = self.repeated
            if repeated is None:
                repeated = self.repeated = {}
            values = repeated.get(key)
            if values is None:
                repeated[key] = [headers[key], value.decode("latin-1")]
            else:
                values.append(value.decode("latin-1"))
        else:
            headers[key] = value.decode("latin-1")

    def _refuse(self, why: str) -> None:
        # httptools turns a callback's exception into HttpParserCallbackError; keep the reason.
        self.refused = why
        raise ValueError(why)

    def on_headers_complete(self) -> None:
        if not self.expecting:
            return
        status = self.parser.get_status_code()
        if status < 200:
            return  # 1xx informational: the final response follows
        self.head_bytes = None
        headers = self.headers
        if self.repeated is not None:
            for key, values in self.repeated.items():
                headers[key] = ", ".join(values)
            self.repeated = None
        connection = headers.get("connection")
        if connection is not None and "close" in connection.lower():
            self.reusable = False
        resp = Http1Response(self, status, self.reason.decode("latin-1"), headers)
        self.resp = resp
        if self.is_head:
            # httptools cannot be told that a HEAD response has no body (its parser
            # would wait for Content-Length bytes): end it here, never reuse the connection.
            self.reusable = False
            self.expecting = False
            resp._end()
        elif (
            status != 204
            and status != 304
            and "content-length" not in headers
            and "chunked" not in (headers.get("transfer-encoding") or "").lower()
        ):
            self.until_close = True
            self.reusable = False
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is not None and self.expecting:
            resp._feed(body)

    def on_message_complete(self) -> None:
        if not self.expecting or self.parser.get_status_code() < 200:
            return
        self.expecting = False
        if not self.parser.should_keep_alive():
            self.reusable = False
        if self.resp is not None:
            self.resp._end()

    # -- used by the client and the response ---------------------------------------------
    def send(self, data: bytes, is_head: bool) -> asyncio.Future[Http1Response]:
        self.got_bytes = False
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            raise ConnectionCut("the upstream closed the connection before the request was sent")
        loop = self.client._loop
        assert loop is not None
        waiter: asyncio.Future[Http1Response] = loop.create_future()
        self.head_waiter = waiter
        self.expecting = True
        self.resp = None
        self.is_head = is_head
        self.until_close = False
        self.head_bytes = 0
        self.refused = ""
        if self.out is None and self.outbox.busy and len(data) < HOLD_MAX:
            self.out = data
            self.outbox.hold(self)
        else:
            if self.out is not None:
                self.flush()   # cannot happen (one request per exchange); kept in order all the same
            transport.write(data)   # big bodies at once: the transport's flow control sees them
        return waiter

    def flush(self) -> None:
        """Send the held writes (the Outbox calls this; so does a graceful close, first)."""
        out, self.out = self.out, None
        transport = self.transport
        if out is not None and not self.lost and transport is not None and not transport.is_closing():
            transport.write(out)

    def usable(self) -> bool:
        transport = self.transport
        return self.reusable and not self.lost and transport is not None and not transport.is_closing()

    def pause(self) -> None:
        if not self.paused and not self.lost and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.lost and self.transport is not None:
                self.transport.resume_reading()

    def finish(self) -> None:
        """The response is complete and its reader done with it: pool or close."""
        self.resp = None
        if not self.expecting and self.usable():
            self.resume()  # an idle connection must keep reading to notice the server closing it
            self.client._put(self)
        else:
            self.close()

    def close(self) -> None:
        """Graceful close (pending writes flushed, TLS shut down); frees the pool slot now."""
        self.reusable = False
        self.flush()
        if not self.lost and self.transport is not None:
            self.transport.close()
        self.client._discard(self)

    def abort(self) -> None:
        """Tear down now: an exchange was abandoned half-way."""
        self.reusable = False
        self.out = None
        if not self.lost and self.transport is not None:
            self.transport.abort()
        self.client._discard(self)

    def _violation(self, why: str) -> None:
        err = ProtocolViolation(f"invalid HTTP/1.1 response from the upstream: {why}")
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(err)
        elif self.resp is not None:
            self.resp._fail(err)
        self.abort()


class Http1Client:
    """A pool of keep-alive HTTP/1.1 connections to one upstream (scheme, host, port).

    At most `max_connections` are open (idle + busy + connecting); further requests
    wait FIFO for a slot. Idle connections are reused LIFO (the most recently used
    one is the least likely to have been closed by the server) and closed after
    `keepalive_s`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 100,
        connect_timeout_s: float = 10.0,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        connect: ConnectFn | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the upstream URL must be http:// or https:// with a host, not {scheme!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        default_port = 443 if scheme == "https" else 80
        self._host = parts.hostname
        self._port = parts.port or default_port
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header: bytes = (host if self._port == default_port else f"{host}:{self._port}").encode("idna")
        # Everything of the request head after the target that never changes.
        self._after_target = b" HTTP/1.1\r\nHost: " + self.host_header + b"\r\n"
        self._ssl = (ssl_context or ssl.create_default_context()) if scheme == "https" else None
        self._connect_fn = connect
        self._max = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: collections.deque[_Conn] = collections.deque()  # oldest left, newest right
        self._conns: set[_Conn] = set()  # every open connection, for close()
        self._open = 0  # slots taken: connections open or being opened
        # Requests waiting for a slot; resolved with an idle connection, or None: "open one".
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        # Response-head deadlines: one timer for the earliest, not one per request (a
        # uvloop timer made and cancelled per request was ~3 % of the gateway's CPU).
        self._heads: set[_Conn] = set()  # connections sent a request with a deadline
        self._heads_timer: asyncio.TimerHandle | None = None
        self._heads_at = 0.0
        self._closed = False

    async def request(
        self, method: str, target: str, head: bytes, body: bytes, timeout_s: float | None = None
    ) -> Http1Response:
        """Send one request; returns once the final response's status and headers are in.

        `timeout_s` bounds the whole wait (pool, connect, response head) and raises
        TimeoutError; with a pooled connection at hand it costs one timer, not an
        `asyncio.timeout` scope.
        """
        if " " in target or "\r" in target or "\n" in target:
            raise ValueError("the request target must be encoded (no spaces or line breaks)")
        data = b"".join((
            method.encode("ascii"), b" ", target.encode("ascii"), self._after_target, head,
            b"Content-Length: %d\r\n\r\n" % len(body), body,
        ))  # fmt: skip
        is_head = method == "HEAD"
        loop = self._loop
        if loop is None:  # (get_running_loop costs a getpid() syscall per call on 3.11)
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        if not self._closed and (conn := self._pooled(loop)) is not None:
            reused = True  # the usual case: no waiting, so no coroutine or timeout scope
        else:
            conn, reused = await self._acquire_by(False, deadline)
        waiter: asyncio.Future[Http1Response] | None = None
        while True:
            try:
                waiter = conn.send(data, is_head)
                if deadline is not None:
                    self._watch_head(loop, conn, deadline)
                return await waiter
            except ConnectionCut:
                conn.abort()
                if not reused or conn.got_bytes:
                    raise
            except BaseException:
                conn.abort()  # errors, timeouts and cancellation: never back to the pool half-used
                raise
            finally:
                # A failed waiter holds the exception raised from it, whose traceback
                # holds this frame: the frame must not hold the waiter too (a cycle).
                waiter = None
            # The server closed this pooled connection as we wrote to it (keep-alive
            # race) and nothing of a response arrived: once more, on a new connection.
            conn, reused = await self._acquire_by(True, deadline)

    def _watch_head(self, loop: asyncio.AbstractEventLoop, conn: _Conn, deadline: float) -> None:
        conn.head_deadline = deadline
        self._heads.add(conn)
        timer = self._heads_timer
        if timer is None or deadline < self._heads_at:
            if timer is not None:
                timer.cancel()
            self._heads_at = deadline
            self._heads_timer = loop.call_at(deadline, self._check_heads)

    def _check_heads(self) -> None:
        """Fail the requests whose head is overdue; re-arm for the earliest other deadline."""
        self._heads_timer = None
        assert self._loop is not None
        now = self._loop.time() + 0.001  # call_at may fire a clock tick early
        earliest: float | None = None
        for conn in list(self._heads):
            waiter = conn.head_waiter
            if waiter is None or waiter.done():
                self._heads.discard(conn)  # answered (or failed) since
            elif conn.head_deadline <= now:
                self._heads.discard(conn)
                waiter.set_exception(TimeoutError())
            elif earliest is None or conn.head_deadline < earliest:
                earliest = conn.head_deadline
        if earliest is not None:
            self._heads_at = earliest
            self._heads_timer = self._loop.call_at(earliest, self._check_heads)

    async def _acquire_by(self, fresh: bool, deadline: float | None) -> tuple[_Conn, bool]:
        if deadline is None:
            return await self._acquire(fresh)
        async with asyncio.timeout_at(deadline):
            return await self._acquire(fresh)

    def _pooled(self, loop: asyncio.AbstractEventLoop | None) -> _Conn | None:
        """The most recently used idle connection that is still usable, if any."""
        if loop is None:
            return None
        self._expire(loop.time())
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.idle = False
            if conn.usable():
                return conn
            conn.close()
        return None

    @property
    def in_use(self) -> int:
        """Requests holding or waiting for a connection (0: closing now cuts nothing)."""
        return self._open - len(self._idle) + len(self._waiters)

    async def close(self) -> None:
        """Close every connection; waiting and later requests raise ConnectFailed."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._timer, self._heads_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._heads_timer = None
        self._heads.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the upstream client is closed"))
        loop = asyncio.get_running_loop()
        conns = list(self._conns)
        pending: list[asyncio.Future[None]] = []
        for conn in conns:
            if not conn.lost and conn.transport is not None:
                conn.lost_waiter = loop.create_future()
                pending.append(conn.lost_waiter)
            if conn.idle:
                conn.close()
            else:
                conn.abort()
        if pending:
            _, late = await asyncio.wait(pending, timeout=_CLOSE_WAIT_S)
            if late:
                for conn in conns:
                    if not conn.lost and conn.transport is not None:
                        conn.transport.abort()

    # -- pool ----------------------------------------------------------------------
    async def _acquire(self, fresh: bool) -> tuple[_Conn, bool]:
        """A connection for one request and whether it was reused; `fresh`: a new one."""
        if self._closed:
            raise ConnectFailed("the upstream client is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if not fresh and (conn := self._pooled(loop)) is not None:
            return conn, True
        if self._open < self._max:
            self._open += 1
        else:
            got = await self._wait_turn(loop)
            if got is not None:
                if not fresh:
                    return got, True
                # A retry must not get another pooled connection: take over its slot.
                got.holds_slot = False
                got.close()
        return await self._connect(loop), False

    async def _wait_turn(self, loop: asyncio.AbstractEventLoop) -> _Conn | None:
        waiter: asyncio.Future[_Conn | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            elif waiter.exception() is None:
                # Handed a connection or a slot just as we were cancelled: pass it on.
                got = waiter.result()
                if got is None:
                    self._free_slot()
                elif got.usable():
                    self._put(got)
                else:
                    got.close()
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        """Open a connection in a slot already counted in `_open`."""
        made: list[_Conn] = []

        def factory() -> _Conn:
            conn = _Conn(self)
            made.append(conn)
            return conn

        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._connect_fn is not None:
                    await self._connect_fn(factory)
                else:
                    await loop.create_connection(
                        factory, self._host, self._port,
                        ssl=self._ssl, server_hostname=self._host if self._ssl is not None else None,
                    )  # fmt: skip
        except BaseException as exc:
            if made:
                made[0].abort()  # frees the slot
            else:
                self._free_slot()
            if isinstance(exc, TimeoutError):
                raise ConnectFailed("timed out connecting to the upstream") from None
            if isinstance(exc, OSError):
                raise ConnectFailed(f"could not connect to the upstream: {_describe(exc)}") from exc
            raise
        if not made:
            self._free_slot()
            raise ConnectFailed("the connect function did not use the protocol factory")
        conn = made[0]
        if self._closed:
            conn.abort()
            raise ConnectFailed("the upstream client is closed")
        self._conns.add(conn)
        return conn

    def _put(self, conn: _Conn) -> None:
        """A connection done with its exchange: to the first waiter, else idle."""
        if self._closed:
            conn.close()
            return
        if self._hand_over(conn):
            return
        assert self._loop is not None
        conn.idle = True
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if self._timer is None:
            self._arm()

    def _free_slot(self) -> None:
        """A slot was given up: it passes to the first waiter, else it is free."""
        if not self._hand_over(None):
            self._open -= 1

    def _hand_over(self, got: _Conn | None) -> bool:
        """Give a connection (or, None, a free slot) to the first waiter still waiting."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(got)
                return True
        return False

    def _discard(self, conn: _Conn) -> None:
        """A connection is closing or gone (idempotent)."""
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)
        self._conns.discard(conn)
        # A connection answered stays in _heads until the deadline timer next runs
        # (first_byte_s later): a closed one must not be kept that long.
        self._heads.discard(conn)
        if conn.holds_slot:
            conn.holds_slot = False
            self._free_slot()

    def _expire(self, now: float) -> None:
        idle = self._idle
        limit = now - self._keepalive_s
        while idle and idle[0].idle_since <= limit:
            conn = idle.popleft()
            conn.idle = False
            conn.close()

    def _arm(self) -> None:
        # One timer for the oldest idle connection, not one per request.
        if self._idle and self._timer is None and self._loop is not None:
            self._timer = self._loop.call_at(self._idle[0].idle_since + self._keepalive_s, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        assert self._loop is not None
        self._expire(self._loop.time() + 0.001)  # call_at may fire a clock tick early
        self._arm()


def _describe(exc: OSError) -> str:
    """The reason of a connect error, without addresses."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    if isinstance(exc, socket.gaierror):
        return f"DNS: {exc.strerror}"
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or type(exc).__name__
