"""When each key was last used, written to the store in batches, off the hot path.

`touch()` is one dict assignment per authenticated request; a background task writes the
keys seen since the last write every `interval_s` (one UPDATE per key in one transaction,
keeping the later time when another process wrote one too). So `last_used_at` in key
listings lags by up to `interval_s` (plus what another worker has not written yet), and
a key used a thousand times a second costs one row update per interval.

A failing store loses nothing but precision: the times stay in memory, merged with newer
ones, and are retried at the next tick; one warning is logged when writes start failing
and one line when they work again. The last times are written on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from proxy.store.base import Store, StoreError

log = logging.getLogger("llm_proxy.auth")

DEFAULT_INTERVAL_S = 10.0


class LastUsed:
    def __init__(self, store: Store, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._store = store
        self._interval = interval_s
        self._seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def touch(self, key_id: str, now: float) -> None:
        self._seen[key_id] = now

    async def flush(self) -> None:
        """Write what was seen since the last write (the tests call this to skip the wait)."""
        batch, self._seen = self._seen, {}
        if not batch:
            return
        try:
            await self._store.touch_keys(batch)
        except asyncio.CancelledError:
            self._keep(batch)  # close() writes them
            raise
        except (StoreError, OSError, TimeoutError) as exc:
            self._keep(batch)
            if not self._failing:
                self._failing = True
                log.warning("could not record when keys were last used (%s); retrying", type(exc).__name__)
            return
        if self._failing:
            self._failing = False
            log.info("recording when keys were last used again")

    def _keep(self, batch: dict[str, float]) -> None:
        for key_id, ts in batch.items():  # for the next write; the newest time wins
            if self._seen.get(key_id, 0.0) < ts:
                self._seen[key_id] = ts

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="last-used")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()
