"""The usage sink: records leave the hot path through a bounded queue.

`record()` is synchronous and never awaits: the handler calls it from `finally`, also
while being cancelled. A background task writes batches every `flush_interval_s`.

Where a record is, at any moment (RELIABILITY §5 I7/I8):

* in memory, in the queue, until the store committed its batch or the batch was
  appended to the spool and fsync'd. A batch being written stays at the head of the
  queue; it is removed only after that, so a failed or cancelled write loses nothing.
* in the spool: a JSON-lines file (mode 0600), appended under an exclusive `flock`,
  fsync'd per batch (and its directory when the file is new). Replay first renames the
  spool to `<spool>.replaying.<pid>.<rand>` (new records go to a fresh spool), reads
  and writes it a batch at a time from a remembered offset, then deletes it. Writes are idempotent on the request id,
  so replaying a file twice (crash between commit and delete, two workers) never
  double-bills. A torn last line (crash mid-append) is skipped; the next append starts
  on a new line, so nothing after it is lost.
* in the store.

A store write that fails or takes longer than `write_timeout_s` sends its batch to the
spool, and the store is then given a rest (0.5 s doubling to 5 s) during which batches
go straight to the spool. The spool is replayed once the store answers again; a batch
whose write timed out may still commit later, which the idempotent write absorbs.

Bounded queue: when more than `queue_max` records wait (the store is slow, not down:
a failing store already sends every batch to the spool), every queued record that is
not part of the batch being written is appended to the spool synchronously, on the
event loop. That blocks the loop for one fsync, which is the price of the bound:
records are never dropped to keep memory bounded.

Bounded spool (I8): while the records waiting on disk reach `spool_max_bytes`, or the
disk refuses records that memory holds past `queue_max`, `accepting` is False and the
gateway refuses billable requests (503) rather than serve calls it cannot bill. Records
are still never dropped: calls already in flight are recorded, so the spool can pass its
cap by about one flush interval's records. The state is re-checked after every spool
append or failed spill and at every flush tick, so a replay (by this process or another
worker sharing the spool) lifts it within `flush_interval_s`.

On shutdown `close()` (after the handlers drained) makes one last store attempt, else
spools. A record that still arrives after `close()` goes straight to the spool.

Requests in flight (RELIABILITY §5 I2): before each upstream attempt the forwarder
hands the sink a *pending* record, the estimate to keep should the process die before
the attempt's own record is durable (prompt estimate, outcome `shutdown`, error
`interrupted`). Pending records are appended to this process's in-flight journal
(`.<spool name>.inflight.<pid>` beside the spool, flock'd while the process lives) at the
same flush ticks as the records, in one write and fsync; an attempt that ends (and whose
record becomes durable) within one flush interval never touches the disk for it. A
process that starts claims the journals of dead ones (the lock is free and the pid is
gone), and appends their pending records to the spool *after* everything the dead
process spooled: since store writes keep the first row of an id, an attempt whose real
record was committed or spooled keeps it, and one whose record died in memory gets the
estimate. The journal is compacted (rewritten with the attempts still open) once it is
mostly ended attempts.

Worst case on SIGKILL: the records still in memory, i.e. those completed during the
last `flush_interval_s` (default 0.25 s), plus those that arrived while a store write
was in progress (a write is abandoned for the spool after `write_timeout_s`), and never
more than about `queue_max` records; each of these is replaced on the next start by its
pending estimate when its attempt lasted past a flush tick. Attempts that started within
the last flush interval before the kill leave nothing. Everything committed or spooled
survives and is replayed on the next start.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from proxy.logs import Outage
from proxy.store.base import Store, UsageRecord

log = logging.getLogger("llm_proxy.usage")

_REPLAYING = ".replaying."
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 5.0
_START_REPLAY_STEPS = 10
_INFLIGHT = ".inflight."
# Rewrite the in-flight journal once it has this many lines and 4x the attempts still open.
_JOURNAL_COMPACT_LINES = 4096

# Spool lines are checked before they reach the store: one malformed line must not
# block the replay of every line after it.
_REQUIRED = frozenset(UsageRecord._fields) - UsageRecord._field_defaults.keys()
_NUMBER = (int, float)
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "ts": _NUMBER, "key_id": (str, type(None)), "key_name": (str, type(None)),
    "endpoint": (str,), "model": (str,), "upstream": (str,), "upstream_model": (str,),
    "stream": (bool,), "status": (int,), "prompt_tokens": (int,), "completion_tokens": (int,),
    "cached_tokens": (int,), "cache_creation_tokens": (int,), "reasoning_tokens": (int,),
    "cost_usd": _NUMBER, "estimated": (bool,), "ttft_ms": (int, float, type(None)),
    "duration_ms": _NUMBER, "error": (str, type(None)), "outcome": (str,),
    "client_dialect": (str, type(None)), "upstream_protocol": (str, type(None)),
    "attempt": (int, type(None)),
}


class UsageSink:
    def __init__(
        self,
        store: Store,
        spool_path: str | Path,
        *,
        flush_interval_s: float = 0.25,
        max_batch: int = 1000,
        queue_max: int = 100_000,
        write_timeout_s: float = 5.0,
        spool_max_bytes: int | None = None,
        on_record: Callable[[UsageRecord], None] | None = None,
    ) -> None:
        self._store = store
        self._spool = Path(spool_path)
        self._interval = flush_interval_s
        self._max_batch = max(1, max_batch)
        self._queue_max = max(1, queue_max)
        self._write_timeout = write_timeout_s
        self._spool_max = spool_max_bytes
        self._queue: collections.deque[UsageRecord] = collections.deque()
        self._on_record = on_record
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = False
        # How many records at the head of the queue are being written right now: the
        # overflow spill takes only what is behind them.
        self._inflight = 0
        # Flushes and spool replays never interleave (they share the store and counters).
        self._lock = asyncio.Lock()
        # Store health: while it fails, batches go straight to the spool until _retry_at.
        self._store_ok = True
        self._backoff = 0.0
        self._retry_at = 0.0
        self._outage = Outage(log, "usage store")
        # Spool files this process claimed for replay and has not finished yet.
        self._claimed: list[Path] = []
        self._replay_offset = 0        # in _claimed[0]: everything before it is committed
        self._replayed_in_file = 0
        self._spill_failed = False     # the last overflow spill could not reach the disk
        # False while usage cannot be kept durably (see "Bounded spool"): read by the
        # forwarder on every model call, so a plain attribute.
        self.accepting = True
        # Counters (exported by proxy.metrics).
        self.written = 0        # committed to the store from memory
        self.spooled = 0        # appended (fsync'd) to the spool
        self.replayed = 0       # committed to the store from the spool
        self.store_errors = 0   # failed or timed-out store writes
        self.spool_errors = 0   # failed spool appends (the records stayed in memory)
        self.recovered = 0      # pending records of dead processes turned into estimates
        # In flight (I2): id -> the pending record, until the attempt's own record is
        # durable; those not yet in the journal; the journal's file, fd (locked) and lines.
        self._open: dict[str, Callable[[], UsageRecord]] = {}  # id -> builds its pending record
        self._unjournaled: list[str] = []
        self._journal = self._spool.with_name(f".{self._spool.name}{_INFLIGHT}{os.getpid()}")
        self._journal_fd: int | None = None
        self._journal_lines = 0

    # ------------------------------------------------------------------ state

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def spool_bytes(self) -> int:
        """Bytes waiting on disk: the spool and what is left of the files claimed for replay."""
        total = -self._replay_offset if self._claimed else 0  # the replayed part of the first
        for path in itertools.chain((self._spool,), self._replay_files()):
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return max(0, total)

    @property
    def store_ok(self) -> bool:
        return self._store_ok

    # ------------------------------------------------------------------ hot path

    def record(self, rec: UsageRecord) -> None:
        """Queue one record. Synchronous, never raises for storage reasons."""
        if self._closed:
            # Nothing flushes memory any more: straight to disk, replayed on next start.
            if self._spill([rec]):
                self._open.pop(rec.id, None)
        else:
            self._queue.append(rec)
        if self._on_record is not None:
            try:
                self._on_record(rec)
            except Exception:  # metrics must never cost a record
                log.exception("usage record observer failed")
        n = len(self._queue)
        if n > self._queue_max:
            self._spill_overflow()
        elif n >= self._max_batch:
            self._wake.set()

    def _spill_overflow(self) -> None:
        behind = list(itertools.islice(self._queue, self._inflight, None))
        if behind:
            self._spill_failed = not self._spill(behind)
            if not self._spill_failed:
                for _ in behind:
                    self._queue.pop()
                self._durable(behind)
            self._check_room()
        self._wake.set()

    def _check_room(self) -> None:
        """Set `accepting`: False while the spool holds `spool_max_bytes` or more, or memory
        holds records past `queue_max` that the spool refused. Logged on each change."""
        if self._spill_failed and len(self._queue) <= self._queue_max:
            self._spill_failed = False  # flushed since: memory is within its bound again
        why = None
        if self._spill_failed:
            why = f"{len(self._queue)} records are held in memory and the spool refuses them"
        elif self._spool_max is not None and (waiting := self.spool_bytes) >= self._spool_max:
            why = f"the spool holds {waiting} bytes (cap {self._spool_max})"
        if (why is None) == self.accepting:
            return
        self.accepting = why is None
        if why is not None:
            log.critical("usage cannot be kept durably (%s): refusing billable requests with 503", why)
        else:
            log.warning("usage recording has room again: serving billable requests")

    def _spill(self, records: list[UsageRecord]) -> bool:
        try:
            self._append_spool(records)
        except OSError as exc:
            self.spool_errors += 1
            log.error("usage spool append failed (%s); %d records kept in memory", type(exc).__name__, len(records))
            return False
        self.spooled += len(records)
        return True

    # ------------------------------------------------------------------ in flight (I2)

    def pending(self, record_id: str, build: Callable[[], UsageRecord]) -> None:
        """An upstream attempt starts: `build()` makes the record to keep if this process
        dies before the attempt's own record (same id) is durable. Called only when the
        attempt is still open at a flush tick. Synchronous, like record()."""
        self._open[record_id] = build
        self._unjournaled.append(record_id)

    def ended(self, record_id: str, build: Callable[[], UsageRecord]) -> None:
        """The attempt's own record is queued: until it is durable, `build` makes its
        pending record instead of the builder given to `pending()`."""
        if record_id in self._open:
            self._open[record_id] = build

    def _durable(self, records: list[UsageRecord]) -> None:
        if self._open:
            for rec in records:
                self._open.pop(rec.id, None)

    async def _write_journal(self) -> None:
        """Append the pending records of attempts still open (one write, one fsync), or
        compact the journal once it is mostly ended attempts."""
        open_ = self._open
        new = [build() for rid in self._unjournaled if (build := open_.get(rid)) is not None]
        self._unjournaled.clear()
        lines = self._journal_lines + len(new)
        if lines > _JOURNAL_COMPACT_LINES and lines > 4 * len(open_):
            await asyncio.to_thread(self._rewrite_journal, [build() for build in open_.values()])
        elif new:
            await asyncio.to_thread(self._append_journal, new)

    def _append_journal(self, records: list[UsageRecord]) -> None:
        if self._journal_fd is None:
            self._journal_fd = self._open_journal(self._journal)
        _write_all(self._journal_fd, b"".join(orjson.dumps(r._asdict()) + b"\n" for r in records))
        os.fsync(self._journal_fd)
        self._journal_lines += len(records)

    def _rewrite_journal(self, records: list[UsageRecord]) -> None:
        tmp = self._journal.with_name(self._journal.name + ".new")
        fd = self._open_journal(tmp)
        _write_all(fd, b"".join(orjson.dumps(r._asdict()) + b"\n" for r in records))
        os.fsync(fd)
        os.rename(tmp, self._journal)
        _fsync_dir(self._journal.parent)
        old, self._journal_fd = self._journal_fd, fd
        if old is not None:
            os.close(old)
        self._journal_lines = len(records)

    def _open_journal(self, path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for the life of the process: "its owner lives"
        return fd

    def _drop_journal(self) -> None:
        """At a clean close, every record is durable: the journal has nothing to keep."""
        fd, self._journal_fd = self._journal_fd, None
        self._journal.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)

    def _recover_dead_journals(self) -> None:
        """Append the pending records of dead processes to the spool (behind what those
        processes spooled themselves), then remove their journals."""
        try:
            paths = sorted(self._spool.parent.glob(f".{self._spool.name}{_INFLIGHT}*"))
        except OSError:
            return
        for path in paths:
            owner = path.name.rsplit(".", 1)[-1]
            if not owner.isdigit() or (int(owner) != os.getpid() and _alive(int(owner))):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner lives (or another worker is recovering it)
                with os.fdopen(os.dup(fd), "rb") as f:
                    seen: dict[str, UsageRecord] = {}
                    for line in f:
                        rec = _parse_line(line) if line.strip() else None
                        if rec is not None:
                            seen.setdefault(rec.id, rec)
                if seen:
                    self._append_spool(list(seen.values()))
                    self.recovered += len(seen)
                    log.warning("%d requests were in flight when process %s ended: recorded as estimates", len(seen), owner)
                _unlink_durably(path)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._recover_dead_journals)
        except OSError as exc:
            log.error("cannot recover the in-flight journals of ended processes (%s)", type(exc).__name__)
        self._claimed = sorted(self._leftover_files())
        # A first slice before serving; a large spool goes on in the background.
        await self._replay_spool(max_steps=_START_REPLAY_STEPS)
        self._check_room()
        self._task = asyncio.create_task(self._run(), name="usage-sink")

    async def close(self) -> None:
        """Write everything still queued (store, else spool). Called after handlers drained."""
        self._closing = True
        self._retry_at = 0.0  # one last attempt at the store, whatever the backoff says
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:
                log.exception("usage sink task failed")
        try:
            await self._flush_all()
        except Exception:
            log.exception("final usage flush failed")
        finally:
            self._closed = True
        if self._queue and not self._spill(list(self._queue)):
            log.critical("%d usage records could be neither written nor spooled", len(self._queue))
        else:
            self._durable(list(self._queue))
            self._queue.clear()
        if not self._queue and not self._open:
            try:
                self._drop_journal()
            except OSError:
                log.exception("cannot remove the in-flight journal")

    async def flush(self) -> None:
        """Write what is queued now; replay the spool if the store is answering."""
        await self._flush_all()
        await self._write_journal()
        if self._has_spool() and self._store_available():
            await self._replay_spool()

    async def _run(self) -> None:
        while not self._closing:
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._flush_all()
                await self._write_journal()
                if self._has_spool() and self._store_available():
                    await self._replay_spool()
            except Exception:
                # Only the spool itself failing gets here (disk full, permissions); the
                # batch is still queued. Keep the task alive and try again.
                log.exception("usage flush failed; records stay queued")
                await asyncio.sleep(max(self._interval, _BACKOFF_FIRST_S))
            finally:
                self._check_room()

    # ------------------------------------------------------------------ flushing

    async def _flush_all(self) -> None:
        """Write the records queued when the flush begins, in batches. Records completed
        while it writes wait for the next flush: chasing them kept the writer committing
        (with an fsync each) every few milliseconds, a few records at a time, under
        steady load (measured at 500 req/s: ~200 commits/s instead of 4)."""
        async with self._lock:
            left = len(self._queue)
            while left and self._queue:
                k = min(self._max_batch, left, len(self._queue))
                batch = list(itertools.islice(self._queue, 0, k))
                self._inflight = k
                try:
                    await self._write_or_spool(batch)
                finally:
                    self._inflight = 0
                # Only now, after commit or fsync, do the records leave memory.
                for _ in range(k):
                    self._queue.popleft()
                self._durable(batch)
                left -= k

    async def _write_or_spool(self, batch: list[UsageRecord]) -> None:
        if self._store_available():
            try:
                await asyncio.wait_for(self._store.write_usage(batch), self._write_timeout)
            except Exception as exc:  # the store's failure must not lose records
                self._store_failed(exc)
            else:
                self._store_answered()
                self.written += len(batch)
                return
        try:
            await asyncio.to_thread(self._append_spool, batch)
        except OSError:
            self.spool_errors += 1
            raise
        self.spooled += len(batch)

    def _store_available(self) -> bool:
        return self._store_ok or time.monotonic() >= self._retry_at

    def _store_failed(self, exc: BaseException) -> None:
        self.store_errors += 1
        self._backoff = min(self._backoff * 2 or _BACKOFF_FIRST_S, _BACKOFF_MAX_S)
        self._retry_at = time.monotonic() + self._backoff
        self._outage.failed(exc, "usage records go to the spool until it answers")
        self._store_ok = False

    def _store_answered(self) -> None:
        self._outage.ended()
        self._store_ok = True
        self._backoff = 0.0

    # ------------------------------------------------------------------ spool files

    def _append_spool(self, batch: list[UsageRecord]) -> None:
        """Append and fsync. Runs in a worker thread (flushes) or on the loop (overflow)."""
        data = b"".join(orjson.dumps(r._asdict()) + b"\n" for r in batch)
        self._spool.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self._spool, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    current = os.stat(self._spool).st_ino == st.st_ino
                except FileNotFoundError:
                    current = False
                if not current:
                    continue  # claimed for replay while we waited for the lock: reopen
                prefix = b""
                if st.st_size == 0:
                    os.fchmod(fd, 0o600)  # whatever the umask says
                elif os.pread(fd, 1, st.st_size - 1) != b"\n":
                    prefix = b"\n"  # a torn line from a crash: do not glue onto it
                _write_all(fd, prefix + data)
                os.fsync(fd)
                if st.st_size == 0:
                    _fsync_dir(self._spool.parent)
                return
            finally:
                os.close(fd)  # releases the lock

    def _claim_spool(self, target: Path) -> bool:
        """Rename the spool to `target` for replay; new records then go to a fresh file."""
        try:
            fd = os.open(self._spool, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st = os.stat(self._spool)
            except FileNotFoundError:
                return False
            if st.st_ino != os.fstat(fd).st_ino:
                return False  # another process claimed it; the new file is for next time
            if st.st_size == 0:
                os.unlink(self._spool)
                return False
            os.rename(self._spool, target)
            _fsync_dir(self._spool.parent)
            return True
        finally:
            os.close(fd)

    def _replay_files(self) -> list[Path]:
        return list(self._claimed)

    def _leftover_files(self) -> list[Path]:
        """Files claimed for replay by a process that died before finishing."""
        try:
            return list(self._spool.parent.glob(self._spool.name + _REPLAYING + "*"))
        except OSError:
            return []

    def _has_spool(self) -> bool:
        return bool(self._claimed) or self._spool.exists()

    async def _replay_spool(self, max_steps: int | None = None) -> None:
        """Replay spooled records, one batch per step, until none is left or the store fails.

        The file is read a batch at a time from a remembered offset (a long outage can
        leave a large spool), and the queue is flushed between batches, so a replay never
        holds fresh records in memory for longer than one batch write.
        """
        steps = 0
        while not self._closing and (max_steps is None or steps < max_steps):
            async with self._lock:
                more = await self._replay_step()
            if not more:
                return
            self._check_room()  # a long replay lifts a full spool's refusal as it goes
            steps += 1
            if self._queue:
                await self._flush_all()

    async def _replay_step(self) -> bool:
        if not self._claimed:
            # Listed before the rename, so the records are never on disk unaccounted for.
            target = self._spool.with_name(f"{self._spool.name}{_REPLAYING}{os.getpid()}.{secrets.token_hex(4)}")
            self._claimed.append(target)
            try:
                claimed = await asyncio.to_thread(self._claim_spool, target)
            except OSError as exc:
                claimed = False
                log.error("cannot claim the usage spool for replay (%s)", type(exc).__name__)
            if not claimed:
                self._claimed.remove(target)
                return False
            self._replay_offset = 0
        path = self._claimed[0]
        try:
            records, offset, eof = await asyncio.to_thread(_read_chunk, path, self._replay_offset, self._max_batch)
        except OSError as exc:
            log.error("cannot read the usage spool %s (%s)", path.name, type(exc).__name__)
            return False
        if records:
            try:
                await asyncio.wait_for(self._store.write_usage(records), self._write_timeout)
            except Exception as exc:
                self._store_failed(exc)
                return False
            self._store_answered()
            self.replayed += len(records)
            self._replayed_in_file += len(records)
        # Only after the commit does the offset move past these records.
        self._replay_offset = offset
        if eof:
            # Writes are idempotent on the request id, so a crash between the commit and
            # this unlink only replays rows the store already has.
            try:
                await asyncio.to_thread(_unlink_durably, path)
            except OSError as exc:
                log.error("cannot remove the replayed usage spool (%s)", type(exc).__name__)
                return False
            self._claimed.pop(0)
            self._replay_offset = 0
            log.info("replayed %d spooled usage records from %s", self._replayed_in_file, path.name)
            self._replayed_in_file = 0
        return True


def _read_chunk(path: Path, offset: int, n: int) -> tuple[list[UsageRecord], int, bool]:
    """Up to `n` records (distinct ids) from `offset`: (records, next offset, at end of file).

    A claimed file is never appended to again, so a last line without its newline is a
    torn write from a crash: it is skipped, like any unreadable line, and nothing after
    it is lost (the next append to a spool always starts on a new line).
    """
    records: list[UsageRecord] = []
    ids: set[str] = set()
    bad = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return [], offset, True  # another process replayed and removed it
    with f:
        f.seek(offset)
        while len(records) < n:
            line = f.readline()
            if not line:
                break
            offset += len(line)
            if not line.strip():
                continue
            rec = _parse_line(line)
            if rec is None:
                bad += 1
            elif rec.id not in ids:
                ids.add(rec.id)
                records.append(rec)
        eof = not f.read(1)
    if bad:
        log.warning("skipped %d unreadable line(s) in the usage spool %s", bad, path.name)
    return records, offset, eof


def _parse_line(line: bytes) -> UsageRecord | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not _REQUIRED.issubset(obj):
        return None
    fields: dict[str, Any] = {}
    for name, value in obj.items():
        types = _TYPES.get(name)
        if types is None:
            continue  # a field from a newer version: keep what this one knows
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return None
        fields[name] = value
    try:
        return UsageRecord(**fields)
    except TypeError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_durably(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)
