"""A lean pooled HTTP/1.1 client for upstream model calls: the pool.

aiohttp's ClientSession costs about 30 % of the gateway's CPU per request; this
client does only what the hot path needs: one pre-joined write per request, the
response parsed by httptools (llhttp, in C) straight from `data_received`, the
body handed over as the bytes objects the parser produced, and a small pool of
keep-alive connections per upstream. Timeouts cost no timer per request: the
connect timeout, the response head's (`request(timeout_s=)`: one timer per client for
the earliest deadline) and the body's quiet spells (`read_within`, `read_all(idle_s=)`:
one timer per response, armed only when a read has to wait).

Three parts, as in httpcore: this module is the pool (slots, idle connections, waiters,
deadlines); `connection.py` one connection and its parser, with its life as a state
(NEW / ACTIVE / IDLE / CLOSED); `response.py` one response and its body. `errors.py`
holds what they raise.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from proxy.http1.connection import (
    ACTIVE,
    CLOSED,
    IDLE,
    MAX_FIELD_SIZE,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    NEW,
    Connection,
    ConnState,
)
from proxy.http1.errors import BodyTooLarge, ConnectFailed, ConnectionCut, ProtocolViolation, UpstreamConnectionError
from proxy.http1.response import _HIGH_WATER, Http1Response

__all__ = [
    "MAX_FIELD_SIZE",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_LINE_SIZE",
    "BodyTooLarge",
    "ConnState",
    "ConnectFailed",
    "Connection",
    "ConnectionCut",
    "Http1Client",
    "Http1Response",
    "ProtocolViolation",
    "UpstreamConnectionError",
]

_Conn = Connection  # the name the tests (and older code) know it by
_ = (_HIGH_WATER, ACTIVE)  # re-exported for the tests

# close(): how long to wait for the transports to finish closing (TLS shutdown) before aborting them.
_CLOSE_WAIT_S = 1.0

ProtocolFactory = Callable[[], asyncio.Protocol]
ConnectFn = Callable[[ProtocolFactory], Awaitable[tuple[asyncio.Transport, asyncio.Protocol]]]


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
        self._idle: collections.deque[Connection] = collections.deque()  # oldest left, newest right
        self._conns: set[Connection] = set()  # every open connection, for close()
        self._open = 0  # slots taken: connections open or being opened
        # Requests waiting for a slot; resolved with an idle connection, or None: "open one".
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        # Response-head deadlines: one timer for the earliest, not one per request (a
        # uvloop timer made and cancelled per request was ~3 % of the gateway's CPU).
        self._heads: set[Connection] = set()  # connections sent a request with a deadline
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

    def _watch_head(self, loop: asyncio.AbstractEventLoop, conn: Connection, deadline: float) -> None:
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

    async def _acquire_by(self, fresh: bool, deadline: float | None) -> tuple[Connection, bool]:
        if deadline is None:
            return await self._acquire(fresh)
        async with asyncio.timeout_at(deadline):
            return await self._acquire(fresh)

    def _pooled(self, loop: asyncio.AbstractEventLoop | None) -> Connection | None:
        """The most recently used idle connection that is still usable, if any."""
        if loop is None:
            return None
        self._expire(loop.time())
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.state = NEW
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
            if conn.state is IDLE:
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
    async def _acquire(self, fresh: bool) -> tuple[Connection, bool]:
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

    async def _wait_turn(self, loop: asyncio.AbstractEventLoop) -> Connection | None:
        waiter: asyncio.Future[Connection | None] = loop.create_future()
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

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        """Open a connection in a slot already counted in `_open`."""
        made: list[Connection] = []

        def factory() -> Connection:
            conn = Connection(self)
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

    def _put(self, conn: Connection) -> None:
        """A connection done with its exchange: to the first waiter, else idle."""
        if self._closed:
            conn.close()
            return
        conn.state = NEW
        if self._hand_over(conn):
            return
        assert self._loop is not None
        conn.state = IDLE
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if self._timer is None:
            self._arm()

    def _free_slot(self) -> None:
        """A slot was given up: it passes to the first waiter, else it is free."""
        if not self._hand_over(None):
            self._open -= 1

    def _hand_over(self, got: Connection | None) -> bool:
        """Give a connection (or, None, a free slot) to the first waiter still waiting."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(got)
                return True
        return False

    def _discard(self, conn: Connection) -> None:
        """A connection is closing or gone (idempotent)."""
        if conn.state is IDLE:
            self._idle.remove(conn)
        conn.state = CLOSED
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
            conn.state = NEW
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
