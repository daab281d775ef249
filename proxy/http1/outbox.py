"""Writes held while the event loop runs what is ready, then sent together.

A write on a TCP socket does more than copy bytes: on loopback (a local TLS terminator
in front, a local model server behind, the benchmark) the kernel delivers the data at
once and wakes the reader, on a VM with an inter-processor interrupt. Writing each
response the moment its handler has it interleaves that work with every other
request's Python code, so both run from cold caches. Here a connection's writes are
appended to its own list and sent by one callback queued behind the callbacks already
ready: a busy loop sends its responses in one burst (one writev per connection), an
idle one right after the handler (the callback is next). Measured on the benchmark
(bench/RESULTS.md): -45 us of CPU per proxied request, a third of it in the kernel.

The price is latency under load: a write waits for the callbacks that were ready
before it and for one poll of the sockets (the handlers of other requests, not I/O).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["HOLD_MAX", "Held", "Outbox"]

# A connection holding this many bytes writes them at once: bulk data (large bodies, a
# stream relayed in one loop iteration) reaches the transport, whose flow control
# (pause_writing above its high-water mark, 64 KiB) is what stops a writer.
HOLD_MAX = 64 * 1024


class Held(Protocol):
    def flush(self) -> None: ...   # send what it holds (the Outbox calls it once per hold)


class Outbox:
    """The connections of one event loop that hold writes, flushed in one callback."""

    __slots__ = ("_loop", "_held")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[Held] = []

    def hold(self, conn: Held) -> None:
        """`conn` started holding writes: its `flush()` runs once the ready callbacks have.
        A connection that must write at once (before closing) flushes itself."""
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(conn)

    def _flush(self) -> None:
        held, self._held = self._held, []
        for conn in held:
            conn.flush()
