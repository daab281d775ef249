"""The limiter's Redis client (proxy/limits/resp.py): the RESP2 reply parser, a real
redis-server (AUTH, SELECT, pipelining, NOSCRIPT), and scripted fake servers on
127.0.0.1 for what a real one will not do on demand (silence, garbage, dropped
connections, replies in pieces)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from _redis import RedisServer, _free_port
from _tls import make_cert
from proxy.config import ConfigError, load_config
from proxy.limits.resp import (
    MAX_DEPTH,
    MAX_REPLY_BYTES,
    ConnectionFailed,
    RedisAddress,
    RedisClient,
    ReplyError,
    Script,
    TimedOut,
    _Incomplete,
    bulks,
    pack,
    parse_reply,
)

T = TypeVar("T")
STEP_TIMEOUT_S = 10.0


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, STEP_TIMEOUT_S)


# --- the parser ---------------------------------------------------------------------------

REPLIES = [
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$3\r\nabc\r\n", b"abc"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),          # a bulk string may hold CRLF
    (b"+PONG\r\n", b"PONG"),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*7\r\n:1\r\n$0\r\n\r\n$1\r\n0\r\n:3\r\n$5\r\n59999\r\n$2\r\n10\r\n$1\r\n0\r\n",
     [1, b"", b"0", 3, b"59999", b"10", b"0"]),  # the admission script's answer
    (b"*2\r\n*1\r\n:1\r\n$-1\r\n", [[1], None]),
]


@pytest.mark.fast
@pytest.mark.parametrize("wire,value", REPLIES)
def test_parse_reply_whole_and_in_every_split(wire: bytes, value: object) -> None:
    assert parse_reply(wire + b":9\r\n", 0) == (value, len(wire))
    for cut in range(len(wire)):
        with pytest.raises(_Incomplete):
            parse_reply(wire[:cut], 0)


@pytest.mark.fast
def test_parse_reply_errors_are_values_and_garbage_is_refused() -> None:
    err, end = parse_reply(b"-NOSCRIPT No matching script.\r\n", 0)
    assert isinstance(err, ReplyError) and err.code == "NOSCRIPT" and end == 31
    for garbage in (b"HTTP/1.1 200 OK\r\n", b":x\r\n", b"$3\r\nabcd\r\n"):
        with pytest.raises(ValueError):
            parse_reply(garbage, 0)


@pytest.mark.fast
def test_pack_and_script_commands() -> None:
    assert pack("SET", b"k", 12) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    with pytest.raises(TypeError):
        pack("SET", "k", 1.5)   # type: ignore[arg-type]
    s = Script("return 1")
    assert s.evalsha(bulks(["k"]), 1, bulks([1]), 1) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$40\r\n" + s.sha + b"\r\n$1\r\n1\r\n$1\r\nk\r\n$1\r\n1\r\n"
    )
    assert s.eval(b"", 0, b"", 0) == b"*3\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n$1\r\n0\r\n"


@pytest.mark.fast
def test_address_from_url_and_config_checks(tmp_path: Path) -> None:
    a = RedisAddress.parse("rediss://us%40er:p%3Aw@cache.internal:6380/4")
    assert (a.host, a.port, a.db, a.username, a.password, a.tls) == ("cache.internal", 6380, 4, "us@er", "p:w", True)
    assert "p:w" not in repr(a)
    assert RedisAddress.parse("redis://:pw@h") == RedisAddress("h", 6379, 0, None, "pw", False)
    for url, problem in [
        ("redis://:s3cret@h:6379/0?ssl_cert_reqs=none", "takes no options"),
        ("redis://:s3cret@h:99999/0", "port"),
        ("redis://:s3cret@h:6379/zero", "database number"),
        ("redis://:s3cret@:6379/0", "no host"),
    ]:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f'limits: {{url: "{url}"}}\n')
        with pytest.raises(ConfigError) as err:
            load_config(str(cfg))
        assert problem in str(err.value) and "s3cret" not in str(err.value)


# --- a real redis-server ----------------------------------------------------------------------

@pytest.fixture
def locked_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path, args=("--requirepass", "s3cret-pw"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_auth_select_and_wrong_password(locked_redis: RedisServer) -> None:
    port = locked_redis.port
    client = RedisClient(RedisAddress.parse(f"redis://:s3cret-pw@127.0.0.1:{port}/3"))
    try:
        assert await bounded(client.execute(pack("SET", "k", "on-db-3"))) == b"OK"
    finally:
        await client.close()
    check = Redis(host="127.0.0.1", port=port, password="s3cret-pw", db=3)
    try:
        assert await check.get("k") == b"on-db-3"
        await check.execute_command("ACL", "SETUSER", "limiter", "on", ">user-pw", "~*", "+@all")
    finally:
        await check.aclose()
    client = RedisClient(RedisAddress.parse(f"redis://limiter:user-pw@127.0.0.1:{port}/3"))
    try:
        assert await bounded(client.execute(pack("GET", "k"))) == b"on-db-3"
    finally:
        await client.close()
    client = RedisClient(RedisAddress.parse(f"redis://:wrong-pw@127.0.0.1:{port}/0"))
    try:
        with pytest.raises(ConnectionFailed) as err:
            await bounded(client.execute(pack("PING")))
        assert "setup (WRONGPASS)" in str(err.value) and "pw" not in str(err.value)
    finally:
        await client.close()
    client = RedisClient(RedisAddress.parse(f"redis://127.0.0.1:{port}/0"))
    try:
        with pytest.raises(ReplyError) as reply:
            await bounded(client.execute(pack("PING")))
        assert reply.value.code == "NOAUTH"
    finally:
        await client.close()


async def test_rediss_verifies_the_server(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    tls_port = _free_port()
    server = RedisServer(tmp_path, args=(
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
    ))
    server.start()
    try:
        address = RedisAddress.parse(f"rediss://127.0.0.1:{tls_port}/2")
        trusting = RedisClient(address, ssl_context=ssl.create_default_context(cafile=str(cert)))
        try:
            assert await bounded(trusting.execute(pack("SET", "k", "over-tls"))) == b"OK"
            assert await bounded(trusting.execute(pack("GET", "k"))) == b"over-tls"
        finally:
            await trusting.close()
        untrusting = RedisClient(address)     # the system's CAs do not know this certificate
        try:
            with pytest.raises(ConnectionFailed, match="SSLCertVerificationError"):
                await bounded(untrusting.execute(pack("PING")))
        finally:
            await untrusting.close()
    finally:
        server.kill()


async def test_pipelined_callers_get_their_own_answers(redis_url: str) -> None:
    client = RedisClient(RedisAddress.parse(redis_url))
    echo = Script("return {ARGV[1], tonumber(ARGV[2]) * 2}")
    try:
        answers = await bounded(asyncio.gather(*(
            client.run(echo, b"", 0, bulks([f"caller-{i}", i]), 2) for i in range(2000)
        )))
        assert answers == [[f"caller-{i}".encode(), 2 * i] for i in range(2000)]
    finally:
        await client.close()


async def test_noscript_falls_back_to_eval_once(redis_url: str) -> None:
    client = RedisClient(RedisAddress.parse(redis_url))
    script = Script("return 'ran ' .. KEYS[1]")
    try:
        await bounded(client.execute(pack("SCRIPT", "FLUSH")))
        assert await bounded(client.run(script, bulks(["a"]), 1, b"", 0)) == b"ran a"
        # EVAL cached it: EVALSHA alone works now.
        assert await bounded(client.execute(script.evalsha(bulks(["b"]), 1, b"", 0))) == b"ran b"
        with pytest.raises(ReplyError) as err:
            await bounded(client.run(Script("return redis.call('NOPE')"), b"", 0, b"", 0))
        assert err.value.code == "ERR"
    finally:
        await client.close()


# --- scripted fake servers ------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@asynccontextmanager
async def fake_redis(handler: Handler) -> AsyncIterator[tuple[RedisAddress, list[int]]]:
    """A server on 127.0.0.1 that runs `handler(reader, writer, n)` for its n-th connection."""
    seen: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen))
        try:
            await handler(reader, writer, seen[-1])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield RedisAddress("127.0.0.1", server.sockets[0].getsockname()[1]), seen
    finally:
        server.close()
        await server.wait_closed()


async def read_command(reader: asyncio.StreamReader) -> list[bytes]:
    n = int((await reader.readline())[1:])
    args = []
    for _ in range(n):
        size = int((await reader.readline())[1:])
        args.append((await reader.readexactly(size + 2))[:-2])
    return args


async def test_a_reply_in_single_bytes() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            args = await read_command(reader)
            for i in range(len(REPLIES[9][0])):
                writer.write(REPLIES[9][0][i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
            writer.write(b":%d\r\n" % len(args))

    async with fake_redis(handler) as (address, _):
        client = RedisClient(address)
        try:
            assert await bounded(client.execute(pack("X"))) == REPLIES[9][1]
            assert await bounded(client.execute(pack("X", "Y"))) == REPLIES[9][1]   # the ":1" was the first's tail
        finally:
            await client.close()


async def test_silence_times_out_every_waiting_command_then_reconnects() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_command(reader)
            if n > 0:                      # the first connection never answers
                writer.write(b"+PONG\r\n")

    async with fake_redis(handler) as (address, seen):
        client = RedisClient(address, timeout_s=0.3)
        try:
            started = asyncio.get_running_loop().time()
            results = await bounded(asyncio.gather(*(client.execute(pack("PING")) for _ in range(5)), return_exceptions=True))
            assert all(isinstance(r, TimedOut) for r in results)
            assert asyncio.get_running_loop().time() - started < 1.5
            assert await bounded(client.execute(pack("PING"))) == b"PONG"    # not retried: a new connection
            assert len(seen) == 2
        finally:
            await client.close()


async def test_garbage_and_oversized_replies_close_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_command(reader)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" if n == 0 else b"$%d\r\n" % (2 * MAX_REPLY_BYTES) + b"x" * (MAX_REPLY_BYTES + 10))
        await writer.drain()
        await reader.read()

    async with fake_redis(handler) as (address, seen):
        client = RedisClient(address)
        try:
            for _ in range(2):
                with pytest.raises(ConnectionFailed) as err:
                    await bounded(client.execute(pack("PING")))
                assert not isinstance(err.value, TimedOut)
            assert len(seen) == 2
        finally:
            await client.close()


async def test_an_unasked_reply_is_never_taken_for_an_answer() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_command(reader)
            writer.write(b"+A\r\n+STALE\r\n" if n == 0 else b"+B\r\n")

    async with fake_redis(handler) as (address, seen):
        client = RedisClient(address)
        try:
            assert await bounded(client.execute(pack("PING"))) == b"A"
            for _ in range(3):
                assert await bounded(client.execute(pack("PING"))) == b"B"
            assert len(seen) == 2
        finally:
            await client.close()


async def test_a_lost_connection_is_replaced_once_when_it_had_served() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_command(reader)
        if n == 0:
            writer.write(b"+PONG\r\n")      # serves one command ...
            await read_command(reader)      # ... then drops the next: a restarted Redis
            return
        if n == 1:
            writer.write(b":1\r\n")          # the re-sent command, on a new connection
            await writer.drain()
            await read_command(reader)      # drops the one after that, fresh: not retried
            return

    async with fake_redis(handler) as (address, seen):
        client = RedisClient(address)
        try:
            assert await bounded(client.execute(pack("PING"))) == b"PONG"
            assert await bounded(client.execute(pack("INCR", "x"))) == 1
            assert len(seen) == 2
            with pytest.raises(ConnectionFailed):
                await bounded(client.execute(pack("INCR", "x")))
        finally:
            await client.close()


async def test_refused_connection_fails_fast_for_everyone_waiting() -> None:
    async with fake_redis(lambda r, w, n: asyncio.sleep(0)) as (address, _):
        pass   # closed: nothing listens on that port now
    client = RedisClient(address)
    try:
        results = await bounded(asyncio.gather(*(client.execute(pack("PING")) for _ in range(20)), return_exceptions=True))
        assert all(isinstance(r, ConnectionFailed) and "127.0.0.1" not in str(r) for r in results)
    finally:
        await client.close()
    with pytest.raises(ConnectionFailed):
        await client.execute(pack("PING"))        # closed for good


async def test_a_cancelled_caller_leaves_the_order_intact() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            args = await read_command(reader)
            await asyncio.sleep(0.05)
            writer.write(_bulk_reply(args[-1]))

    async with fake_redis(handler) as (address, seen):
        client = RedisClient(address)
        try:
            first = asyncio.ensure_future(client.execute(pack("ECHO", "first")))
            await asyncio.sleep(0.01)
            second = asyncio.ensure_future(client.execute(pack("ECHO", "second")))
            await asyncio.sleep(0.01)
            first.cancel()
            assert await bounded(second) == b"second"
            assert await bounded(client.execute(pack("ECHO", "third"))) == b"third"
            assert len(seen) == 1      # all on the first connection
        finally:
            await client.close()


def _bulk_reply(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@pytest.mark.fast
def test_parse_reply_bounds_nesting_depth() -> None:
    """Issue 25 item 8: a hostile reply nested past MAX_DEPTH is a clean ValueError, never
    a RecursionError (1 MiB of `*1\\r\\n` is 256 Ki levels)."""
    nested = b"*1\r\n" * MAX_DEPTH + b":1\r\n"
    value, _ = parse_reply(nested, 0)
    for _ in range(MAX_DEPTH):
        assert isinstance(value, list)
        value = value[0]
    assert value == 1
    for deep in (b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n", b"*1\r\n" * (MAX_REPLY_BYTES // 4)):
        with pytest.raises(ValueError, match="nested"):
            parse_reply(deep, 0)


async def test_a_deeply_nested_reply_closes_the_connection_cleanly() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_command(reader)
        writer.write(b"*1\r\n" * 100_000 + b":1\r\n" if n == 0 else b"+PONG\r\n")
        await writer.drain()
        await reader.read()

    async with fake_redis(handler) as (address, seen):
        client = RedisClient(address)
        try:
            with pytest.raises(ConnectionFailed, match="not RESP2"):
                await bounded(client.execute(pack("PING")))
            assert await bounded(client.execute(pack("PING"))) == b"PONG"
        finally:
            await client.close()
