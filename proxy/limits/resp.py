"""A small asyncio Redis client for the limiter: RESP2 over one pipelined connection.

Why not redis-py: the limiter sends two script calls per request, and through redis-py's
asyncio client each cost ~190-210 µs of the gateway's CPU (bench/RESULTS.md): a
connection taken from a pool and given back, two dozen arguments encoded one call
each, the reply read line by line, a retry wrapper. That was three times the rest of
the request. The limiter needs five commands (EVALSHA, EVAL, PING, AUTH, SELECT) and
nothing of a general client, so this one does only that, the way the gateway's HTTP
client does it: bytes packed once, written at once, parsed in the protocol callback.

One connection per client, pipelined: Redis answers a connection's commands in order,
so a call appends its future to a FIFO and `data_received` resolves them in turn. That
is also what Redis serves fastest, and no caller waits for a pooled connection.

Failure is fast and whole: a lost connection, a reply that is not RESP, or a command
unanswered for `timeout_s` closes the connection and fails every command on it (their
replies could no longer be told apart); the next call connects again. Errors never
carry the URL, host or password.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union
from urllib.parse import unquote, urlsplit

__all__ = [
    "ConnectionFailed", "RedisAddress", "RedisClient", "RedisError", "Reply", "ReplyError", "Script", "TimedOut",
    "bulks", "pack", "parse_reply",
]

# Union, not |: a runtime alias with forward references (the | operator cannot take strings).
Reply = Union[int, bytes, None, list["Reply"], "ReplyError"]
Arg = bytes | str | int

DEFAULT_PORT = 6379
# The limiter's replies are a few dozen bytes; a peer sending more is not a Redis we know
# (and a partial reply is joined to each read: this bounds that copying too).
MAX_REPLY_BYTES = 1024 * 1024
# The limiter's replies nest two deep; a hostile peer's `*1\r\n*1\r\n...` must be a clean
# ValueError, not a RecursionError (a 1 MiB reply is 256 Ki levels of 4 bytes).
MAX_DEPTH = 16


class RedisError(Exception):
    """Anything that kept a command from getting its answer."""


class ReplyError(RedisError):
    """An error reply (`-ERR ...`): the server's own message, which names no secret."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class ConnectionFailed(RedisError):
    """No connection, or it was lost before the answer came (the command may have run)."""


class TimedOut(ConnectionFailed):
    """No answer within the timeout; the connection was closed."""


@dataclass(frozen=True)
class RedisAddress:
    """`redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS (verified
    against the system's CAs)."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """The configuration checked the URL's form (config.py); ValueError if it is not one."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query:
            raise ValueError("not a redis:// or rediss:// URL without options")
        return cls(
            host=parts.hostname,
            port=parts.port or DEFAULT_PORT,
            db=int(parts.path.strip("/") or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=parts.scheme == "rediss",
        )


def _bulk(value: Arg) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int):
        data = b"%d" % value
    else:  # a float's text would be whatever repr() says: the caller decides the format
        raise TypeError(f"Redis arguments are bytes, str or int, not {type(value).__name__}")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack(*args: Arg) -> bytes:
    """One command in RESP: an array of bulk strings."""
    return b"*%d\r\n%s" % (len(args), b"".join(map(_bulk, args)))


class Script:
    """A Lua script, sent by its SHA-1 and by its source when the server lacks it
    (NOSCRIPT: a restarted or flushed Redis), which also caches it there again."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()

    def evalsha(self, keys: bytes, nkeys: int, args: bytes, nargs: int) -> bytes:
        """`keys` and `args`: bulk strings packed by the caller (packed keys repeat per key)."""
        return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s%s%s" % (
            3 + nkeys + nargs, self.sha, _bulk(nkeys), keys, args,
        )

    def eval(self, keys: bytes, nkeys: int, args: bytes, nargs: int) -> bytes:
        return b"*%d\r\n$4\r\nEVAL\r\n%s%s%s%s" % (3 + nkeys + nargs, _bulk(self.source), _bulk(nkeys), keys, args)


def bulks(args: Iterable[Arg]) -> bytes:
    """Arguments as packed bulk strings, for Script.evalsha / eval."""
    return b"".join(map(_bulk, args))


class _Incomplete(Exception):
    """The buffer ends inside a reply (rare: replies are small). Raised fresh each time: a
    shared instance would carry every raise's traceback, and with it the buffers."""


def parse_reply(buf: bytes, pos: int, depth: int = 0) -> tuple[Reply, int]:
    """One reply from `buf` at `pos`: (value, position after it). Raises _Incomplete
    when `buf` ends first, ValueError when it is not RESP2 or nests arrays deeper than
    MAX_DEPTH. An error reply is returned as a ReplyError value (the caller raises it
    when it is the whole answer)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 58:                                # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 36:                                # '$' bulk string
        n = int(buf[pos + 1 : end])
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            raise _Incomplete
        if buf[stop : stop + 2] != b"\r\n":
            raise ValueError("bulk string without its CRLF")
        return buf[end + 2 : stop], stop + 2
    if kind == 42:                                # '*' array
        n = int(buf[pos + 1 : end])
        if n < 0:
            return None, end + 2
        if depth >= MAX_DEPTH:
            raise ValueError("a reply nested deeper than the limit")
        pos = end + 2
        items: list[Reply] = []
        for _ in range(n):
            item, pos = parse_reply(buf, pos, depth + 1)
            items.append(item)
        return items, pos
    if kind == 43:                                # '+' simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:                                # '-' error
        return ReplyError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise ValueError("not a RESP2 reply")


class _Connection(asyncio.Protocol):
    """One Redis connection: commands written in order, replies matched in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[tuple[asyncio.Future[Reply], float]] = deque()  # (answer, sent at)
        self._rest = b""            # the start of a reply not yet complete
        self._watch: asyncio.TimerHandle | None = None
        self._out: list[bytes] | None = None   # commands not written yet (see send)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream connection: always a Transport

    def send(self, command: bytes) -> asyncio.Future[Reply]:
        if self.closed or self._transport is None:
            raise ConnectionFailed("the connection is closed")
        answer: asyncio.Future[Reply] = self._loop.create_future()
        now = self._loop.time()
        self._waiting.append((answer, now))
        if self._out is None:
            # The first command of this turn of the loop: the others that callers send
            # before its end go out with it, in one write (one syscall, one wake-up of Redis).
            self._out = [command]
            self._loop.call_soon(self._flush)
        else:
            self._out.append(command)
        if self._watch is None:
            self._watch = self._loop.call_at(now + self._timeout_s, self._check)
        return answer

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out and self._transport is not None and not self.closed:
            self._transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buf = self._rest + data if self._rest else data
        pos, size, waiting = 0, len(buf), self._waiting
        try:
            while pos < size:
                value, pos = parse_reply(buf, pos)
                if not waiting:
                    raise ValueError("a reply nobody asked for")
                answer = waiting.popleft()[0]
                if answer.done():     # its caller was cancelled; the reply still had to be read
                    continue
                if isinstance(value, ReplyError):
                    answer.set_exception(value)
                else:
                    answer.set_result(value)
        except _Incomplete:
            if size - pos > MAX_REPLY_BYTES:
                self.fail(ConnectionFailed("a reply larger than the limit"))
                return
            self._rest = buf[pos:]
            return
        except ValueError:
            self.fail(ConnectionFailed("the server's reply is not RESP2"))
            return
        self._rest = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.fail(ConnectionFailed("the connection was lost"))

    def _check(self) -> None:
        """The oldest command's deadline (replies come in order: it is the first due)."""
        self._watch = None
        if not self._waiting:
            return
        due = self._waiting[0][1] + self._timeout_s
        if self._loop.time() >= due:
            self.fail(TimedOut(f"no reply within {self._timeout_s:g} s"))
        else:
            self._watch = self._loop.call_at(due, self._check)

    def fail(self, error: ConnectionFailed) -> None:
        """Close, and fail every command still waiting (their replies are lost with it)."""
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._transport is not None:
            self._transport.close()
        waiting, self._waiting = self._waiting, deque()
        for answer, _ in waiting:
            if not answer.done():
                answer.set_exception(error)


class RedisClient:
    """Commands over one connection, made on first use and again after a failure."""

    def __init__(
        self,
        address: RedisAddress,
        timeout_s: float = 1.0,
        connect_timeout_s: float = 0.5,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context`: for rediss:// (default: the system's CAs, hostname checked)."""
        self._address = address
        self._ssl = (ssl_context or ssl.create_default_context()) if address.tls else None
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    async def execute(self, command: bytes) -> Reply:
        """Send a packed command (see `pack`); its reply, or an error reply raised.

        A command sent on a connection that was then lost is sent once more on a new one
        when that connection had served earlier commands (a Redis restart leaves a stale
        one behind); callers send only commands that may run twice (the limiter's scripts
        are idempotent per request id). A timeout is never retried."""
        conn = self._conn
        reused = conn is not None and not conn.closed
        if not reused:
            conn = await self._connection()
        assert conn is not None
        try:
            return await conn.send(command)
        except TimedOut:
            raise
        except ConnectionFailed:
            if not reused or self._closed:
                raise
        return await (await self._connection()).send(command)

    async def run(self, script: Script, keys: bytes, nkeys: int, args: bytes, nargs: int) -> Reply:
        """EVALSHA, and EVAL when the server does not have the script (NOSCRIPT)."""
        try:
            return await self.execute(script.evalsha(keys, nkeys, args, nargs))
        except ReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        return await self.execute(script.eval(keys, nkeys, args, nargs))

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(ConnectionFailed("the client was closed"))

    async def _connection(self) -> _Connection:
        if self._closed:
            raise ConnectionFailed("the client is closed")
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            # One attempt shared by every caller that finds the connection down.
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        a = self._address
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop, self._timeout_s), a.host, a.port,
                    ssl=self._ssl, server_hostname=a.host if self._ssl else None,
                ),
                self._connect_timeout_s,
            )
        except (TimeoutError, OSError) as exc:
            raise ConnectionFailed(f"cannot connect ({type(exc).__name__})") from None
        # AUTH and SELECT first, pipelined; the connection is handed out only once both passed.
        setup = []
        if a.password is not None:
            auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
            setup.append(conn.send(pack(*auth)))
        if a.db:
            setup.append(conn.send(pack("SELECT", a.db)))
        try:
            for answer in setup:
                await answer
        except ReplyError as exc:
            conn.fail(ConnectionFailed(f"the server refused the connection's setup ({exc.code})"))
            raise ConnectionFailed(f"the server refused the connection's setup ({exc.code})") from None
        if self._closed:
            conn.fail(ConnectionFailed("the client was closed"))
            raise ConnectionFailed("the client is closed")
        self._conn = conn
        return conn
