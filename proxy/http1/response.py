"""One upstream response: status and headers, and its body as the bytes arrive.

The connection (connection.py) feeds it from its parser callbacks (`_feed`, `_end`,
`_fail`); the caller reads (`read`, `read_within`, `read_all`) and closes. Reading
applies back pressure: past `_HIGH_WATER` unread bytes the connection stops reading the
socket. Done with, the response hands its connection back (`finish`: to the pool when
the body is complete and the connection may be kept, else it is torn down).
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from proxy.http1.errors import BodyTooLarge, ConnectionCut, UpstreamConnectionError
from proxy.http1.headers import Headers

if TYPE_CHECKING:
    from proxy.http1.connection import Connection

__all__ = ["Http1Response"]

# Unread body bytes above which the socket stops being read (back pressure to the upstream).
_HIGH_WATER = 256 * 1024


class Http1Response:
    """Status and headers of an upstream response; the body is read with `read()`.

    The caller must either read the body to its end (`read()` returning b"") or call
    `close()`; until then the connection stays busy and holds a pool slot.
    """

    __slots__ = (
        "status", "reason", "headers", "_conn", "_chunks", "_size", "_eof", "_exc", "_waiter",
        "_loop", "_arrived", "_quiet_s", "_timer", "_timed_out",
    )  # fmt: skip

    def __init__(self, conn: Connection, status: int, reason: str, headers: Headers) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._conn: Connection | None = conn  # None once handed back to the pool or closed
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
