"""One upstream connection: an asyncio protocol whose httptools parser drives the
response in flight (response.py); the pool (client.py) opens, lends and closes them.

Its life is a `ConnState`, as in httpcore's `_async/http11.py`: NEW (open, lent to a
request, nothing sent yet), ACTIVE (an exchange: request sent, response not yet handed
back), IDLE (in the pool's idle list), CLOSED (closed or being closed: never used again).
What is not life cycle stays a plain fact: whether the exchange may end with the
connection kept (`reusable`), whether reading is paused, whether it counts against the
pool's slots, and the response due and its framing.

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
import enum
from typing import TYPE_CHECKING

import httptools

from proxy.http1.errors import ConnectionCut, ProtocolViolation
from proxy.http1.headers import HEADER_KEYS, Headers, header_key
from proxy.http1.outbox import HOLD_MAX, outbox_for
from proxy.http1.response import Http1Response

if TYPE_CHECKING:
    from proxy.http1.client import Http1Client

__all__ = ["MAX_FIELD_SIZE", "MAX_HEADERS", "MAX_HEAD_BYTES", "MAX_LINE_SIZE", "ConnState", "Connection"]

# Response head bounds (aiohttp's client defaults for lines and count; a total for the head).
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 32768
MAX_HEAD_BYTES = 256 * 1024


class ConnState(enum.Enum):
    NEW = "new"        # open (or opening), lent to a request, nothing sent on it yet
    ACTIVE = "active"  # an exchange is under way: request sent, response not handed back
    IDLE = "idle"      # in the pool's idle list
    CLOSED = "closed"  # closed or closing: never used again


# Module constants: compared on the hot path without an attribute lookup on the class.
NEW, ACTIVE, IDLE, CLOSED = ConnState.NEW, ConnState.ACTIVE, ConnState.IDLE, ConnState.CLOSED


class Connection(asyncio.Protocol):
    """One upstream connection; its parser callbacks drive the response in flight."""

    __slots__ = (
        "client", "parser", "transport", "state", "reusable", "paused", "holds_slot",
        "idle_since", "lost_waiter", "expecting", "got_bytes", "head_waiter", "head_deadline", "resp", "headers",
        "reason", "is_head", "until_close", "out", "outbox", "head_bytes", "nheaders", "repeated", "refused",
    )  # fmt: skip

    def __init__(self, client: Http1Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.state = NEW
        self.reusable = True  # may go back to the pool after this exchange
        self.paused = False
        self.holds_slot = True  # counts against max_connections until discarded
        self.idle_since = 0.0  # when it last became IDLE
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

    @property
    def lost(self) -> bool:
        """connection_lost has run: the socket is gone."""
        return self.state is CLOSED and self.transport is None

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
        self.transport = None
        self.client._discard(self)  # CLOSED
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
        if self.state is CLOSED or transport is None or transport.is_closing():
            raise ConnectionCut("the upstream closed the connection before the request was sent")
        self.state = ACTIVE
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
        if out is not None and transport is not None and not transport.is_closing():
            transport.write(out)

    def usable(self) -> bool:
        transport = self.transport
        return self.reusable and self.state is not CLOSED and transport is not None and not transport.is_closing()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None:
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
        if self.transport is not None:
            self.transport.close()
        self.client._discard(self)  # CLOSED

    def abort(self) -> None:
        """Tear down now: an exchange was abandoned half-way."""
        self.reusable = False
        self.out = None
        if self.transport is not None:
            self.transport.abort()
        self.client._discard(self)  # CLOSED

    def _violation(self, why: str) -> None:
        err = ProtocolViolation(f"invalid HTTP/1.1 response from the upstream: {why}")
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(err)
        elif self.resp is not None:
            self.resp._fail(err)
        self.abort()
