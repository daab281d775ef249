"""Writes held while the event loop runs the handlers woken together, then sent at once.

A write on a TCP socket does more than copy bytes: on loopback (a local TLS terminator
in front, a local model server behind, the benchmark) the kernel delivers the data at
once and wakes the reader, on a VM with an inter-processor interrupt. A busy gateway
that writes each response the moment its handler has it interleaves that kernel work
with every other request's Python code, and both run from cold caches. So when several
handlers were woken together, their connections append their writes to their own lists,
and one flush callback sends them after the last of those handlers has run: one burst,
one write per connection, in the same loop iteration. On the benchmark that took 40-50
us of CPU off each proxied request at 64 busy connections, a third of it in the kernel
(bench/RESULTS.md, 2026-11-30, session 8).

A handler woken alone (an idle or lightly loaded gateway) writes at once, as before:
nothing to group its write with, and holding it would delay the response by the
handler's own bookkeeping after it (usage record, limits, log line): +48 and +81 us
p50 at 500 req/s in two first versions that always held.

How the flush follows the last woken handler: every I/O callback that makes a handler
ready (a request parsed, an upstream's bytes delivered) calls `arm`, which queues the
flush again behind the handler it just woke. A write held without an I/O callback
before it (a timer's, a second hop between tasks) gets a flush at the end of what is
ready now (`hold`), one iteration later.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Protocol

__all__ = ["HOLD_MAX", "Held", "Outbox", "outbox_for"]

# A connection holding this many bytes writes them at once: bulk data (large bodies, a
# stream relayed in one loop iteration) reaches the transport, whose flow control
# (pause_writing above its high-water mark, 64 KiB) is what stops a writer.
HOLD_MAX = 64 * 1024

_log = logging.getLogger("llm_proxy.http")


class Held(Protocol):
    def flush(self) -> None: ...   # send what it holds (the Outbox calls it once per hold)


class Outbox:
    """The connections of one event loop that hold writes, flushed in one callback."""

    __slots__ = ("_loop", "_held", "_due", "_woken", "busy")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[Held] = []
        self._due: asyncio.Handle | None = None   # the queued flush
        self._woken = 0    # handlers armed for since the last flush
        # Several handlers were woken together: connections hold their writes. With one,
        # they write at once (nothing to group them with, and its bookkeeping after the
        # response would otherwise delay it).
        self.busy = False

    def hold(self, conn: Held) -> None:
        """`conn` started holding writes: its `flush()` runs in the next flush (a connection
        that must write at once, before closing, flushes itself)."""
        if self._due is None:
            self._due = self._loop.call_soon(self._flush)
        self._held.append(conn)

    def arm(self) -> None:
        """From an I/O callback that just made a handler ready: flush after that handler."""
        due = self._due
        if due is not None:
            due.cancel()
        self._due = self._loop.call_soon(self._flush)
        self._woken += 1
        if self._woken > 1:
            self.busy = True

    def _flush(self) -> None:
        self._due = None
        self._woken = 0
        self.busy = False
        held = self._held
        if held:
            self._held = []
            for conn in held:
                try:
                    conn.flush()
                except Exception:   # one connection's failure must not strand the others' writes
                    _log.exception("a held write failed")


# One Outbox per event loop, shared by every server and client on it: a handler woken by
# an upstream's bytes (the client's callback arms) writes to its client (the server's
# connection holds), and both must be in the same flush.
_OUTBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()


def outbox_for(loop: asyncio.AbstractEventLoop) -> Outbox:
    outbox = _OUTBOXES.get(loop)
    if outbox is None:
        outbox = _OUTBOXES[loop] = Outbox(loop)
    return outbox
