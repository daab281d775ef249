"""A lean HTTP/1.1 server: one asyncio.Protocol per connection, httptools for parsing.

The gateway's hot path runs here instead of aiohttp's server, whose per-request CPU
is several times nginx's. Generic HTTP/1.1 only: the app gives one async handler per
request and one error renderer; this module knows nothing of LLMs, keys or dialects.

Per connection:
- Requests are handled one at a time, in order. The connection keeps being read while
  a handler runs, so a client that goes away (RST or FIN) is seen at once and the
  handler's task is cancelled. Pipelined requests that arrive meanwhile are parsed and
  queued; past ~1 MiB of queued data reading pauses until the current response ends.
- When several handlers were woken together, their writes are held and sent in one
  burst after the last of them has run (outbox.py); a handler woken alone writes at once.
- One timer, re-armed only when it fires, enforces the keep-alive idle limit, the
  request-head deadline and the body gap limit (slowloris defence).
- Nothing here logs header values or bodies: they may carry API keys.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools

from .headers import HEADER_KEYS, Headers, header_key
from .outbox import HOLD_MAX, outbox_for

__all__ = [
    "ErrorRenderer",
    "Exchange",
    "Handler",
    "HeadCheck",
    "Http1Server",
    "Refusal",
    "Request",
    "ServerLimits",
]

_log = logging.getLogger("llm_proxy.http")

SHUTDOWN_MESSAGE = "The gateway is shutting down."
_MALFORMED = "Malformed HTTP request."
_INTERNAL = "Internal server error."

# Queued pipelined data (bodies plus a per-request allowance) above which reading
# pauses while a response is in flight.
_PIPELINE_BYTES = 1 << 20
_QUEUED_OVERHEAD = 1024

# Framing and hop-by-hop headers are this module's business; a handler that forwards
# an upstream's headers must not duplicate or contradict them.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
# The spellings a handler may use for them, checked without lower-casing every name.
_OWN_NAMES = frozenset(v for n in _OWN_HEADERS for v in (n, n.title(), n.upper()))

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


@dataclass(frozen=True)
class ServerLimits:
    max_line_size: int = 8190  # request target bytes -> 414
    max_field_size: int = 8190  # one header's name + value -> 431
    max_headers: int = 100  # header count -> 431
    max_body_bytes: int = 32 * 1024 * 1024  # -> 413 (by Content-Length before reading)
    keepalive_s: float = 60.0  # idle keep-alive connection closed after this
    head_timeout_s: float = 10.0  # head within this of its first byte; no body gap longer -> 408
    write_stall_s: float = 60.0  # a client not reading for this long (during a write) is dropped
    body_timeout_s: float = 60.0  # a whole body within this of its head (after any head check) -> 408
    max_connections: int = 0  # open connections at once; the excess gets 503 and a close (0: no cap)
    max_connections_per_client: int = 0  # the same per peer address, trusted proxies excepted (0: no cap)


@dataclass(slots=True)
class Request:
    method: str
    path: str  # raw (not percent-decoded), without the query
    query_string: str  # without "?"
    headers: Headers
    body: bytes
    remote: str  # peer IP, or ""
    http_version: str  # "1.1" or "1.0"
    keep_alive: bool
    started: float  # loop.time() when the request's first byte arrived
    # What the server's head check (HeadCheck) left for the handler, e.g. who is calling.
    admitted: Any = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A head check's answer to a request it refuses before its body is read."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


# Called once a request's head is parsed, before its body is read: None when there is
# nothing to check, else an awaitable of None (read the body, then serve the request)
# or a Refusal (answered at once, the body left unread, the connection closed). Reading
# pauses while it runs, so a caller the app would refuse cannot make the server hold its
# body, and `Expect: 100-continue` is answered only after it.
HeadCheck = Callable[["Request"], "Awaitable[Refusal | None] | None"]

Handler = Callable[["Exchange"], Coroutine[Any, Any, None]]
# (status, message, the request if its head was parsed) -> (headers, body)
ErrorRenderer = Callable[[int, str, "Request | None"], tuple[list[tuple[str, str]], bytes]]

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 200 <= status <= 999:
            # 1xx would need protocol switching or more responses to follow.
            raise ValueError(f"unsupported response status {status}")
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
    return line


class _DateLine:
    """`Date:` (RFC 9110 6.6.1: origin servers with a clock send it), formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._line = f"Date: {formatdate(second, usegmt=True)}\r\n".encode("latin-1")
        return self._line


_date_line = _DateLine()


def _encode_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """Status line and the handler's header lines (without the final blank line)."""
    kept = [f"{name}: {value}\r\n" for name, value in headers if name not in _OWN_NAMES]
    text = "".join(kept)
    # One CR and one LF per line, else a name or value carried its own: response
    # splitting. Counted over the joined text (C speed), not tested per header.
    if text.count("\n") != len(kept) or text.count("\r") != len(kept):
        bad = next(n for n, v in headers if "\r" in n or "\n" in n or "\r" in v or "\n" in v)
        # The value itself is not echoed (it may be a secret).
        raise ValueError(f"CR or LF in response header {bad!r}")
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    return _status_line(status) + _date_line() + raw


def _split_target(url: bytes) -> tuple[str, str]:
    """(path, query) of a request target; absolute-form keeps only its path."""
    text = url.decode("latin-1")
    if "#" in text:
        text = text.split("#", 1)[0]
    if not text.startswith("/") and "://" in text:
        rest = text.split("://", 1)[1]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        text = rest[cut:]
        if not text.startswith("/"):
            text = "/" + text
    path, _, query = text.partition("?")
    return path, query


class _StopParsing(Exception):
    """Raised from a parser callback: the request is refused with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Failure:
    """A refused request queued behind the one in flight; the connection closes after it."""

    status: int
    message: str
    request: Request | None


class Exchange:
    """The response side of one request, handed to the handler."""

    __slots__ = (
        "request", "head_sent", "client_gone", "status", "bytes_sent",
        "_conn", "_task", "_chunked", "_no_body", "_close", "_linger", "_ended", "_done",
    )

    def __init__(self, conn: _Connection, request: Request) -> None:
        self.request = request
        self.head_sent = False
        self.client_gone = False  # the connection was lost before the response ended
        self.status = 0
        self.bytes_sent = 0
        self._conn = conn
        self._task: asyncio.Task[None] | None = None
        self._chunked = False
        self._no_body = False
        self._close = False
        self._linger = False  # close with a lingering half-close (request not fully read)
        self._ended = False
        self._done = False

    def _head(self, status: int, headers: list[tuple[str, str]], lines: bytes) -> tuple[bytes, bool, bool]:
        """The encoded head, whether the response has no body, whether the connection closes after it."""
        if self.head_sent:
            raise RuntimeError("response already started")
        no_body = self.request.method == "HEAD" or status in (204, 304)
        head = _encode_head(status, headers)
        return head + lines if lines else head, no_body, self._conn._must_close(self.request)

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes, lines: bytes = b"") -> None:
        """The whole response in one write; the connection is then ready for the next request.

        `lines`: more header lines, already encoded ("Name: value\\r\\n" each) by a caller
        that vouches for them (no CR or LF inside); they are sent as they are.
        """
        conn = self._conn
        head, no_body, close = self._head(status, headers, lines)
        parts = [head]
        if status not in (204, 304):
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(_CLOSE if close else _KEEP_ALIVE if self.request.http_version == "1.0" else b"")
        parts.append(b"\r\n")
        if not no_body:
            parts.append(body)
            self.bytes_sent = len(body)
        self.head_sent = True
        self.status = status
        self._close = close
        conn._send(b"".join(parts))
        conn._response_ended(self)

    def start(self, status: int, headers: list[tuple[str, str]], lines: bytes = b"") -> None:
        """Send the head of a streamed response: chunked on HTTP/1.1, close-delimited on 1.0.
        `lines` as in respond()."""
        conn = self._conn
        head, no_body, close = self._head(status, headers, lines)
        framing = b""
        if not no_body:
            if self.request.http_version == "1.1":
                framing = _CHUNKED
                self._chunked = True
            else:
                close = True  # only the close can mark the end of the body
        self.head_sent = True
        self.status = status
        self._no_body = no_body
        self._close = close
        keep = _KEEP_ALIVE if self.request.http_version == "1.0" else b""
        conn._send(b"".join((head, framing, _CLOSE if close else keep, b"\r\n")))

    async def write(self, data: bytes) -> None:
        """Send one body chunk; waits only while the transport's buffer is over its high-water mark."""
        if self.send(data):
            await self.drain()

    def send(self, data: bytes) -> bool:
        """`write` without the wait, for relay loops (no coroutine per chunk): True when
        the client is behind and the caller must `await drain()` before sending more."""
        if self.client_gone:
            raise ConnectionResetError("client disconnected")
        conn = self._conn
        if not self.head_sent or self._ended:
            raise RuntimeError("write() needs start() and no end()")
        if not data or self._no_body:
            return False
        size = len(data)
        conn._send(b"".join((b"%x\r\n" % size, data, b"\r\n")) if self._chunked else data)
        self.bytes_sent += size
        return conn._write_paused

    async def drain(self) -> None:
        """Until the client has read enough of what was sent (ConnectionResetError if it left)."""
        if self._conn._write_paused:
            await self._conn._writable()

    def end(self) -> None:
        """Finish a streamed response (terminating chunk, or close when close-delimited)."""
        if self._ended:
            return
        if not self.head_sent:
            raise RuntimeError("end() before start()")
        if self._chunked:
            self._conn._send(_LAST_CHUNK)
        self._conn._response_ended(self)

    def _finish(self) -> None:
        """Report the request once (access log); a failing callback never reaches the protocol."""
        if self._done:
            return
        self._done = True
        on_done = self._conn._server._on_done
        if on_done is not None:
            try:
                on_done(self)
            except Exception:
                _log.exception("on_done callback failed")

    def _respond_error(self, status: int, message: str) -> None:
        headers, body = self._conn._render(status, message, self.request)
        try:
            self.respond(status, headers, body)
        except ValueError:
            _log.exception("render_error returned an unusable response")
            self.respond(status, [("Content-Type", "text/plain; charset=utf-8")], message.encode())


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_server", "_loop", "_limits", "_max_field", "_max_headers", "_transport", "_parser", "_remote", "_now",
        "_url", "_headers", "_nheaders", "_body", "_body_len", "_started", "_in_head", "_head_bytes",
        "_req", "_raw_left", "_continue_pending", "_failure",
        "_queue", "_queued_bytes", "_exchange", "_dead", "_closing", "_gone",
        "_read_paused", "_write_paused", "_drain_waiter", "_out", "_out_size", "_outbox",
        "_timer", "_idle_since", "_recv_mark", "_close_by",
        "_checking", "_checked", "_held", "_expect_continue", "_body_by", "_peer_counted",
    )

    def __init__(self, server: Http1Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._limits = server._limits
        self._max_field = self._limits.max_field_size  # (read per header line)
        self._max_headers = self._limits.max_headers
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._remote = ""
        self._now = 0.0  # loop time of the current data_received
        # The request being parsed.
        self._url = b""
        self._headers = Headers()
        self._nheaders = 0  # header lines (Headers merges repeated names)
        self._body: list[bytes] = []
        self._body_len = 0
        self._started = 0.0
        self._in_head = False
        self._head_bytes = 0
        self._req: Request | None = None  # set once its head is parsed, until its body is complete
        self._raw_left = 0  # body bytes read past the parser (upgrade requests)
        self._continue_pending = False
        self._failure: _StopParsing | None = None
        # Requests waiting for the one in flight.
        self._queue: collections.deque[Request | _Failure] = collections.deque()
        self._queued_bytes = 0
        self._exchange: Exchange | None = None  # in flight: its response has not ended
        self._dead = False  # the parser is done with (error, upgrade): later bytes are dropped
        self._closing = False
        self._gone = False
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # Writes held until the handlers made ready with this one have run (outbox.py).
        self._out: list[bytes] | None = None
        self._out_size = 0
        self._outbox = outbox_for(self._loop)
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._recv_mark = 0.0  # head: its first byte; body: the last bytes received
        self._close_by = 0.0  # a closing connection is aborted after this
        # The head check (HeadCheck) of the request being received, while it runs.
        self._checking: asyncio.Future[Refusal | None] | None = None
        self._checked: Request | None = None  # the request it is about
        self._held: Request | None = None  # that request, complete before the check ended
        self._expect_continue = False  # it asked for 100-continue
        self._body_by = 0.0  # the body being received must be complete by this (loop time)
        self._peer_counted = False  # counted in the server's per-address table

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._idle_since = self._loop.time()
        if not self._server._admit_connection(self):
            self._refuse_connection()
            return
        self._server._conns.add(self)
        self._timer = self._loop.call_at(self._idle_since + self._server._tick, self._on_timer)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._now = self._loop.time()
        if self._raw_left:
            data = self._take_raw(data)
        if self._dead:
            return  # refused or upgraded: nothing more is parsed, but EOF still tells us of a departure
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # Upgrades (h2c, websocket, CONNECT) are not supported: the request is
            # answered as plain HTTP/1.1 and the connection closes after it.
            self._dead = True
            if self._raw_left:
                self._take_raw(data[upgrade.args[0]:])
            return
        except httptools.HttpParserError as exc:
            failure, self._failure = self._failure, None
            if failure is not None:
                self._fail(failure.status, failure.message)
            elif isinstance(exc.__context__, Exception):
                _log.error("HTTP request parsing failed", exc_info=exc.__context__)
                self._fail(500, _INTERNAL)
            else:
                self._fail(400, _MALFORMED)
            return
        if self._in_head:
            # httptools buffers a header line whole before calling on_header; bound the
            # head's size here (over-counted by at most one read) so one huge line
            # cannot grow that buffer.
            self._head_bytes += len(data)
            if self._head_bytes > self._server._max_head_bytes:
                self._fail(431, "Request headers too large.")
                return
        elif self._req is not None:
            self._recv_mark = self._now
        if self._read_paused or self._transport is None:
            return
        if self._checking is not None and self._req is not None:
            # A body that a head check has yet to admit is not read (nor one behind it).
            self._transport.pause_reading()
            self._read_paused = True
        elif (
            (self._exchange is not None or self._checking is not None)
            and self._queued_bytes + self._body_len > _PIPELINE_BYTES
        ):
            self._transport.pause_reading()
            self._read_paused = True

    def _refuse_connection(self) -> None:
        """Over a connection cap: one fixed 503, then close, before anything is parsed."""
        self._dead = self._closing = True
        headers, body = self._render(503, "Too many connections; try again later.", None)
        headers = [*headers, ("Retry-After", "1")]
        try:
            head = _encode_head(503, headers)
        except ValueError:
            head, body = _encode_head(503, []), b""
        assert self._transport is not None
        self._transport.write(b"".join((head, b"Content-Length: %d\r\n" % len(body), _CLOSE, b"\r\n", body)))
        self._transport.close()

    def eof_received(self) -> bool:
        # A FIN from a client with a request pending or in flight means it gave up (nginx
        # and aiohttp treat it so too); idle, it is just a close. Either way the
        # transport closes (False) and connection_lost follows.
        self._client_gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_gone()
        self._transport = None
        self._out = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server._conns.discard(self)
        if self._peer_counted:
            self._peer_counted = False
            self._server._release_peer(self._remote)
        # The parser holds bound methods of this connection: a reference cycle only the
        # cyclic collector frees, and a connection that lived a while sits in its oldest
        # generation, which proxy/server.py's thresholds collect rarely (2,000 cut streams
        # kept ~26 MB and slowed every later request by ~9 %). Without the parser, the
        # connection and all it holds go with their last reference. The loop never calls
        # connection_lost from inside feed_data, and nothing is parsed after it.
        self._dead = True
        del self._parser

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._started = self._recv_mark = self._now
        self._url = b""
        self._headers = Headers()
        self._nheaders = 0
        self._body = []
        self._body_len = 0
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url  # usually a single piece
        if len(self._url) > self._limits.max_line_size:
            self._stop(414, "Request URL too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        # One call per header line: the limits are plain attributes here, and the key
        # comes from the cache of names already seen.
        self._nheaders += 1
        if len(name) + len(value) > self._max_field or self._nheaders > self._max_headers:
            self._stop(431, "Request headers too large.")
        key = HEADER_KEYS.get(name)
        if key is None:
            key = header_key(name)
        headers = self._headers
        if key in headers:
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}"
        else:
            headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        self._recv_mark = self._now
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._stop(505, "HTTP version not supported.")
        headers = self._headers
        path, query = _split_target(self._url)
        # Positional, in field order: the keyword form costs three times as much, per request.
        req = self._req = Request(
            parser.get_method().decode("ascii", "replace"),  # method
            path,
            query,
            headers,
            b"",  # body, once complete
            self._remote,
            version,
            parser.should_keep_alive(),
            self._started,
        )
        te = headers.get("transfer-encoding")
        length = headers.get("content-length")
        host = headers.get("host")
        if host is None:
            if version == "1.1":
                self._stop(400, "Missing Host header.")  # RFC 9112 3.2, as h11 and nginx answer
        elif "," in host:
            self._stop(400, _MALFORMED)  # two Host headers: requests smuggled past a front proxy
        if te is not None:
            if version == "1.0":
                self._stop(400, _MALFORMED)  # HTTP/1.0 has no chunked framing (RFC 9112 6.1)
            # llhttp already refuses most of these; this keeps the rule in one place.
            if length is not None:
                self._stop(400, _MALFORMED)
            if te.strip().lower() != "chunked":
                self._stop(400, "Unsupported Transfer-Encoding.")
        size = int(length) if length else 0
        if size > self._limits.max_body_bytes:
            self._stop(413, "Request body too large.")
        if parser.should_upgrade():
            # httptools stops before an upgrade request's body; read it raw (see data_received).
            req.keep_alive = False
            if te is not None:
                self._stop(400, "Upgrade with a chunked body is not supported.")
            self._raw_left = size
        self._body_by = self._now + self._limits.body_timeout_s
        expect = headers.get("expect")
        continue_expected = expect is not None and version == "1.1" and expect.lower() == "100-continue"
        check = self._server._head_check
        if check is not None and self._exchange is None and not self._queue and self._checking is None:
            pending = check(req)
            if pending is not None:
                self._start_check(req, pending, continue_expected)
                return
        if continue_expected:
            if self._exchange is None and not self._queue and self._checking is None:
                self._send(_CONTINUE)
            else:
                self._continue_pending = True  # sent when the responses before it are done

    # head check

    def _start_check(self, req: Request, pending: Awaitable[Refusal | None], continue_expected: bool) -> None:
        """Run the app's head check. Reading pauses at the end of the current read while
        the body is incomplete (data_received): at most that read is buffered until the
        check answers. A request already complete keeps the connection read, so a client
        that leaves meanwhile is seen before its request is served."""
        self._checked = req
        self._expect_continue = continue_expected
        self._checking = fut = asyncio.ensure_future(pending)
        fut.add_done_callback(self._check_done)

    def _check_done(self, fut: asyncio.Future[Refusal | None]) -> None:
        self._checking = None
        req, self._checked = self._checked, None
        held, self._held = self._held, None
        refusal: Refusal | None = None
        failed = False
        if fut.cancelled():
            return  # the client left (connection_lost cancels it)
        exc = fut.exception()
        if exc is not None:
            _log.error("head check failed", exc_info=exc)
            failed = True
        else:
            refusal = fut.result()
        if self._transport is None or self._gone or self._closing or req is None:
            return
        if failed or refusal is not None:
            self._refuse(req, held, refusal)
            return
        now = self._loop.time()
        # The body's deadlines run from here: the check's time was the app's.
        self._recv_mark = now
        self._body_by = now + self._limits.body_timeout_s
        if self._read_paused and self._exchange is None:
            self._read_paused = False
            self._transport.resume_reading()
        if held is not None:
            self._queue.appendleft(held)
            self._queued_bytes += len(held.body) + _QUEUED_OVERHEAD
        elif self._expect_continue and self._req is req:
            self._send(_CONTINUE)
        self._expect_continue = False
        if self._exchange is None and self._queue:
            item = self._queue.popleft()
            if isinstance(item, Request):
                self._queued_bytes -= len(item.body) + _QUEUED_OVERHEAD
            self._dispatch(item)
            self._outbox.arm()

    def _refuse(self, req: Request, held: Request | None, refusal: Refusal | None) -> None:
        """Answer a request its head check refused; the body is not read (when it was
        not all here yet, the rest is dropped while the connection lingers closed)."""
        body_unread = held is None
        self._req = None
        self._in_head = False
        self._raw_left = 0
        self._body = []
        self._body_len = 0
        self._dead = True
        self._queue.clear()
        self._queued_bytes = 0
        self._continue_pending = self._expect_continue = False
        req.keep_alive = False
        ex = Exchange(self, req)
        ex._linger = body_unread
        self._exchange = ex
        if refusal is None:
            ex._respond_error(500, _INTERNAL)
            return
        try:
            ex.respond(refusal.status, refusal.headers, refusal.body)
        except ValueError:
            _log.exception("head check returned an unusable refusal")
            ex._respond_error(500, _INTERNAL)

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self._limits.max_body_bytes:
            self._stop(413, "Request body too large.")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._raw_left:
            self._complete()

    # request intake

    def _stop(self, status: int, message: str) -> None:
        # httptools turns a callback's exception into HttpParserCallbackError; keep ours aside.
        self._failure = _StopParsing(status, message)
        raise self._failure

    def _take_raw(self, data: bytes) -> bytes:
        """Feed an upgrade request's body past the parser; returns what is left over."""
        n = min(len(data), self._raw_left)
        if n:
            self._body.append(data[:n])
            self._body_len += n
            self._raw_left -= n
            self._recv_mark = self._now
            if not self._raw_left:
                self._complete()
        return data[n:]

    def _complete(self) -> None:
        req = self._req
        if req is None:
            return
        body = self._body
        req.body = body[0] if len(body) == 1 else b"".join(body)
        self._req = None
        self._body = []
        self._body_len = 0
        if req is self._checked:
            self._held = req  # served once its head check admits it
            return
        self._enqueue(req)

    def _fail(self, status: int, message: str) -> None:
        """Refuse the request being received; the connection closes after the answer."""
        req = self._req
        self._req = None
        self._in_head = False
        self._raw_left = 0
        self._body = []
        self._body_len = 0
        self._dead = True
        self._enqueue(_Failure(status, message, req))

    def _enqueue(self, item: Request | _Failure) -> None:
        if self._closing:
            return
        if self._exchange is None and not self._queue and self._checking is None:
            self._dispatch(item)
            # From the parser, in an I/O callback: what the handler writes in its first
            # step is flushed right after it. (Not for a pipelined request dispatched by its
            # predecessor's response: arming from there would keep moving the flush behind
            # this connection's next request while other connections' answers wait.)
            self._outbox.arm()
        else:
            self._queue.append(item)
            if isinstance(item, Request):
                self._queued_bytes += len(item.body) + _QUEUED_OVERHEAD

    def _dispatch(self, item: Request | _Failure) -> None:
        if isinstance(item, _Failure):
            if item.request is None:
                headers, body = self._render(item.status, item.message, None)
                try:
                    head = _encode_head(item.status, headers)
                except ValueError:
                    _log.exception("render_error returned an unusable response")
                    head = _encode_head(item.status, [("Content-Type", "text/plain; charset=utf-8")])
                    body = item.message.encode()
                self._send(b"".join((head, b"Content-Length: %d\r\n" % len(body), _CLOSE, b"\r\n", body)))
                self._close(linger=True)
                return
            ex = Exchange(self, item.request)
            ex._linger = True
            self._exchange = ex
            item.request.keep_alive = False
            ex._respond_error(item.status, item.message)
            return
        ex = Exchange(self, item)
        self._exchange = ex
        if self._server._draining:
            item.keep_alive = False
            ex._respond_error(503, SHUTDOWN_MESSAGE)
            return
        server = self._server
        # A Task of our own naming: loop.create_task() names each one "Task-<n>" with
        # PyUnicode_FromFormat, which was ~0.4 % of the instructions per request.
        task = asyncio.Task(server._handler(ex), loop=self._loop, name="llm-proxy-request")
        ex._task = task
        server.tasks.add(task)
        # A done callback, not code at the end of the task: it also runs for a task
        # cancelled before its first step (the client left in the same loop iteration).
        task.add_done_callback(lambda t: self._handler_done(ex, t))

    # response side

    def _must_close(self, req: Request) -> bool:
        return not req.keep_alive or self._server._draining

    def _send(self, data: bytes) -> None:
        # Once closing, the answer that closes was already written; a write after
        # write_eof() would raise.
        if self._transport is not None and not self._gone and not self._closing:
            out = self._out
            if out is not None:
                out.append(data)
                self._out_size += len(data)
                if self._out_size >= HOLD_MAX:
                    self.flush()  # the transport's flow control (pause_writing) sees big writes at once
            elif self._outbox.busy and len(data) < HOLD_MAX:
                self._out = [data]
                self._out_size = len(data)
                self._outbox.hold(self)
            else:
                self._transport.write(data)

    def flush(self) -> None:
        """Send the held writes (the Outbox calls this; so does a close, first)."""
        out, self._out = self._out, None
        if out and self._transport is not None and not self._gone:
            if len(out) == 1:
                self._transport.write(out[0])
            else:
                self._transport.writelines(out)

    async def _writable(self) -> None:
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self._loop.create_future()
        # A client that stops reading must not hold its stream (and the upstream behind
        # it) forever: past write_stall_s without draining, the connection is dropped and
        # the handler sees the client gone (RELIABILITY 2.1: 60 s per drain, then abort).
        stall = self._loop.call_later(self._limits.write_stall_s, self._stalled, waiter)
        try:
            await waiter
        finally:
            stall.cancel()

    def _stalled(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() or self._transport is None:
            return
        _log.info("client stopped reading for %gs; connection dropped", self._limits.write_stall_s)
        self._transport.abort()  # connection_lost fails the waiter: write() raises ConnectionResetError

    def _render(self, status: int, message: str, req: Request | None) -> tuple[list[tuple[str, str]], bytes]:
        try:
            return self._server._render_error(status, message, req)
        except Exception:
            _log.exception("render_error failed")
            return [("Content-Type", "text/plain; charset=utf-8")], message.encode()

    def _response_ended(self, ex: Exchange) -> None:
        ex._ended = True
        if self._exchange is ex:
            self._exchange = None
        ex._finish()
        if self._transport is None or self._gone or self._closing:
            return
        if ex._close:
            self._close(linger=ex._linger)
            return
        self._idle_since = self._recv_mark = self._loop.time()
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        if self._queue:
            item = self._queue.popleft()
            if isinstance(item, Request):
                self._queued_bytes -= len(item.body) + _QUEUED_OVERHEAD
            self._dispatch(item)
        elif self._continue_pending:
            self._continue_pending = False
            if self._req is not None:
                self._send(_CONTINUE)
        elif self._server._draining and self._req is None and not self._in_head and self._checking is None:
            self._close(linger=False)

    def _handler_done(self, ex: Exchange, task: asyncio.Task[None]) -> None:
        self._server.tasks.discard(task)
        # A cancelled task keeps its CancelledError, whose traceback holds the handler's
        # frames, which hold this exchange: without this reference the task and all of
        # that are freed by reference counting, not left to the cyclic collector.
        ex._task = None
        req = ex.request
        cancelled = task.cancelled()
        exc = None if cancelled else task.exception()
        if exc is not None:
            # Method and path only: headers and the query string may carry keys.
            _log.error("handler failed: %s %s", req.method, req.path, exc_info=exc)
        if ex._ended:
            return
        if self._gone or self._transport is None or self._closing:
            ex._ended = True
            if self._exchange is ex:
                self._exchange = None
            ex._finish()
            return
        if not ex.head_sent:
            if exc is None and not cancelled:
                _log.error("handler returned without a response: %s %s", req.method, req.path)
            if cancelled and self._server._draining:
                ex._respond_error(503, SHUTDOWN_MESSAGE)
            else:
                ex._respond_error(500, _INTERNAL)
            return
        # The head is out, so the client can only learn the body is incomplete from the close.
        ex._ended = True
        self._exchange = None
        ex._finish()
        self._close(linger=False)

    # lifecycle

    def _client_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        self._queue.clear()
        if self._checking is not None:
            self._checking.cancel()
        ex = self._exchange
        if ex is not None:
            ex.client_gone = True
            if ex._task is not None and not ex._task.done():
                ex._task.cancel()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))

    def _close(self, *, linger: bool) -> None:
        """Close after the buffered output is sent, aborting if that takes over keepalive_s.

        With linger, only our side is shut (FIN) and the rest of the request is read and
        dropped until the client closes: closing with unread input would send a RST that
        can destroy the error response before the client reads it.
        """
        transport = self._transport
        if transport is None or self._closing:
            return
        self.flush()
        self._closing = True
        self._close_by = self._loop.time() + self._limits.keepalive_s
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if linger and transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def _drain(self) -> None:
        """Server shutdown: close now if idle, otherwise after the current response."""
        if (
            self._exchange is None and not self._queue and self._req is None and not self._in_head
            and self._checking is None
        ):
            self._close(linger=False)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _on_timer(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        now = self._loop.time()
        limits = self._limits
        deadline: float | None
        if self._closing:
            deadline = self._close_by
        elif self._exchange is not None or self._queue or self._checking is not None:
            deadline = None  # a handler or head check at work: its time is the app's business
        elif self._in_head:
            deadline = self._recv_mark + limits.head_timeout_s
        elif self._req is not None:
            # No gap longer than head_timeout_s, and the whole body within body_timeout_s.
            deadline = min(self._recv_mark + limits.head_timeout_s, self._body_by)
        else:
            deadline = self._idle_since + limits.keepalive_s
        if deadline is not None and now >= deadline:
            if self._closing:
                transport.abort()
            elif self._in_head or self._req is not None:
                self._fail(408, "Request timed out.")
            else:
                self._close(linger=False)
            if self._transport is None:
                return
        # Re-armed here only: state changes never touch the timer, and since the tick is
        # no longer than any limit, each phase is seen before its deadline passes.
        when = now + self._server._tick
        if deadline is not None and now < deadline < when:
            when = deadline
        self._timer = self._loop.call_at(when, self._on_timer)


class Http1Server:
    def __init__(
        self,
        handler: Handler,
        *,
        limits: ServerLimits,
        render_error: ErrorRenderer,
        on_done: Callable[[Exchange], None] | None = None,
        head_check: HeadCheck | None = None,
        uncapped_peer: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        """`uncapped_peer(ip)`: peers the per-address cap does not apply to (trusted
        reverse proxies, whose connections carry many clients)."""
        self._handler = handler
        self._limits = limits
        self._render_error = render_error
        self._on_done = on_done
        self._head_check = head_check
        self._uncapped_peer = uncapped_peer
        self._draining = False
        self._conns: set[_Connection] = set()
        self._per_peer: dict[str, int] = {}
        self.refused_connections = 0
        self._tick = max(0.01, min(limits.keepalive_s, limits.head_timeout_s))
        # A head cannot legitimately exceed its line plus every header at full size.
        self._max_head_bytes = limits.max_line_size + limits.max_headers * (limits.max_field_size + 4) + 1024
        self.tasks: set[asyncio.Task[None]] = set()

    def _admit_connection(self, conn: _Connection) -> bool:
        limits = self._limits
        if limits.max_connections and len(self._conns) >= limits.max_connections:
            self.refused_connections += 1
            return False
        cap = limits.max_connections_per_client
        if cap and conn._remote and not self._uncapped_peer(conn._remote):
            n = self._per_peer.get(conn._remote, 0)
            if n >= cap:
                self.refused_connections += 1
                return False
            self._per_peer[conn._remote] = n + 1
            conn._peer_counted = True
        return True

    def _release_peer(self, peer: str) -> None:
        n = self._per_peer.get(peer, 0) - 1
        if n > 0:
            self._per_peer[peer] = n
        else:
            self._per_peer.pop(peer, None)

    def protocol(self) -> asyncio.Protocol:
        """Protocol factory for loop.create_server."""
        return _Connection(self)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def shutdown(self) -> None:
        """Start draining: idle connections close now, busy ones after their current response;
        requests still arriving are answered 503."""
        self._draining = True
        for conn in list(self._conns):
            conn._drain()

    def abort_all(self) -> None:
        """Close every connection at once (the end of a shutdown)."""
        for conn in list(self._conns):
            conn._abort()
