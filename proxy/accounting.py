"""The usage sink: records leave the hot path through a bounded queue.

`record()` is synchronous and never blocks: the handler calls it from `finally`, also
while being cancelled. A background task writes batches every `flush_interval_s`.
A batch leaves memory only after the store committed it; when the store fails the
batch is appended to an fsync'd spool file (JSON lines) and replayed, idempotently
(unique request id), once the store answers again. On shutdown `close()` writes what
is left (store, else spool). Worst case on SIGKILL: the records of the last flush
interval that were still in memory (≤ `flush_interval_s` of traffic).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

import orjson

from proxy.store.base import Store, UsageRecord

log = logging.getLogger("llm_proxy.usage")


class UsageSink:
    def __init__(
        self,
        store: Store,
        spool_path: str | Path,
        *,
        flush_interval_s: float = 0.25,
        max_batch: int = 1000,
        on_record: Callable[[UsageRecord], None] | None = None,
    ) -> None:
        self._store = store
        self._spool = Path(spool_path)
        self._interval = flush_interval_s
        self._max_batch = max_batch
        self._queue: collections.deque[UsageRecord] = collections.deque()
        self._on_record = on_record
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        # Flushes and spool replays never interleave: a replay unlinks the spool file.
        self._lock = asyncio.Lock()
        self.written = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def spool_bytes(self) -> int:
        try:
            return self._spool.stat().st_size
        except OSError:
            return 0

    def record(self, rec: UsageRecord) -> None:
        self._queue.append(rec)
        if self._on_record is not None:
            self._on_record(rec)
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    async def start(self) -> None:
        await self._replay_spool()
        self._task = asyncio.create_task(self._run(), name="usage-sink")

    async def close(self) -> None:
        """Write everything still queued (store, else spool). Called after handlers drained."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        await self._flush_all()

    async def flush(self) -> None:
        await self._flush_all()

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._flush_all()
            if self.spool_bytes and not self._queue:
                await self._replay_spool()

    async def _flush_all(self) -> None:
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        while self._queue:
            batch = [self._queue[i] for i in range(min(self._max_batch, len(self._queue)))]
            try:
                await self._store.write_usage(batch)
            except Exception as exc:  # the store's failure must not lose records
                log.warning("usage store write failed (%s); spooling %d records", type(exc).__name__, len(batch))
                await asyncio.to_thread(self._append_spool, batch)
            # Only now, after commit or fsync, do the records leave memory.
            for _ in batch:
                self._queue.popleft()
            self.written += len(batch)

    def _append_spool(self, batch: list[UsageRecord]) -> None:
        self._spool.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(orjson.dumps(dataclasses.asdict(r)) + b"\n" for r in batch)
        fd = os.open(self._spool, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_spool(self) -> list[UsageRecord]:
        try:
            lines = self._spool.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(UsageRecord(**orjson.loads(line)))
            except (orjson.JSONDecodeError, TypeError):
                # A torn last line from a crash mid-append; the rest is intact.
                log.warning("skipping an unreadable spool line")
        return out

    async def _replay_spool(self) -> None:
        async with self._lock:
            await self._replay_locked()

    async def _replay_locked(self) -> None:
        records = await asyncio.to_thread(self._read_spool)
        if not records:
            return
        try:
            for i in range(0, len(records), self._max_batch):
                await self._store.write_usage(records[i : i + self._max_batch])
        except Exception as exc:
            log.warning("usage spool replay deferred (%s)", type(exc).__name__)
            return
        # Writes are idempotent on the request id, so a crash between commit and
        # unlink only replays rows the store already has.
        self._spool.unlink(missing_ok=True)
        log.info("replayed %d spooled usage records", len(records))
