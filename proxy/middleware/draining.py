"""Shutdown state, and the stage that refuses new work while the process drains.

`StreamRegistry` holds the handler tasks that are streaming and the two shutdown flags:
`stopping` (a stop signal came: keyed routes get 503, /readyz turns 503, the requests in
flight may finish) and `ending` (the grace period is over: cancellations are the
server's, and each stream writes a shutdown error event before it records itself).
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.errors import ShuttingDown
from proxy.pipeline import Call


class StreamRegistry:
    """The handler tasks currently streaming, and whether the process is stopping."""

    def __init__(self) -> None:
        self._active: set[asyncio.Task[Any]] = set()
        self.stopping = False   # draining: no new requests, /readyz 503
        self.ending = False     # grace period over: cancellations are the server's, not clients'

    def add(self, task: asyncio.Task[Any]) -> None:
        self._active.add(task)

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._active.discard(task)

    def __len__(self) -> int:
        return len(self._active)

    def end_all(self) -> None:
        """At the end of the grace period: cancel every stream's handler. Each one writes
        a shutdown error event while its connection is still open, and records itself."""
        self.stopping = self.ending = True
        for task in list(self._active):
            task.cancel()


class RefuseWhileDraining:
    """A step (pipeline.Before): keyed routes get 503 `server_shutting_down` once the
    process is stopping; other workers (SO_REUSEPORT) or the restarted process take the
    new work."""

    def __init__(self, streams: StreamRegistry) -> None:
        self._streams = streams

    def __call__(self, call: Call) -> None:
        if self._streams.stopping:
            raise ShuttingDown()
