"""UsageSink against fake stores: batching, spool, replay, bounds, shutdown (RELIABILITY §5 I7/I8)."""

from __future__ import annotations

import asyncio
import collections
import os
import stat
import time
from pathlib import Path
from typing import Callable, Sequence

import orjson
import pytest

from proxy.usage_sink import UsageSink
from proxy.config import ConfigError, parse_config
from proxy.metrics import Metrics
from proxy.store.base import StoreError, UsageRecord

pytestmark = pytest.mark.fast  # pure units: no sockets (see README, "Run the tests")


def rec(i: int | str, **kw: object) -> UsageRecord:
    base = dict(
        id=f"req_{i}", ts=time.time(), key_id="key_1", key_name="k", endpoint="chat.completions",
        model="m", upstream="up", upstream_model="m", stream=False, status=200,
        prompt_tokens=3, completion_tokens=5, cost_usd=0.001, duration_ms=1.0,
    )
    base.update(kw)
    return UsageRecord(**base)  # type: ignore[arg-type]


class FakeStore:
    """Only what the sink uses. Idempotent on id, like the real stores; counts every insert."""

    def __init__(self) -> None:
        self.rows: dict[str, UsageRecord] = {}
        self.inserts: collections.Counter[str] = collections.Counter()
        self.calls = 0
        self.batches: list[tuple[float, int]] = []
        self.fail = False
        self.fail_when: Callable[[Sequence[UsageRecord]], bool] | None = None
        self.gate: asyncio.Event | None = None   # when set, writes wait for it
        self.waiting = 0
        self.delay_s = 0.0                        # each write takes this long

    async def write_usage(self, records: Sequence[UsageRecord]) -> None:
        self.calls += 1
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail or (self.fail_when is not None and self.fail_when(records)):
            raise StoreError("fake store: down")
        for r in records:
            self.inserts[r.id] += 1
            self.rows.setdefault(r.id, r)
        self.batches.append((time.monotonic(), len(records)))


async def until(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def spool_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "usage.jsonl"


@pytest.fixture
async def make_sink(spool: Path):
    sinks: list[UsageSink] = []

    async def make(store: FakeStore, **kw: object) -> UsageSink:
        kw.setdefault("flush_interval_s", 0.05)
        sink = UsageSink(store, kw.pop("spool_path", spool), **kw)  # type: ignore[arg-type]
        await asyncio.wait_for(sink.start(), 5)
        sinks.append(sink)
        return sink

    yield make
    for s in sinks:
        store = s._store
        if isinstance(store, FakeStore) and store.gate is not None:
            store.gate.set()  # a test that failed half-way must not hang the teardown
        if s._task is not None and not s._task.done():
            try:
                await asyncio.wait_for(s.close(), 5)
            except TimeoutError:
                s._task.cancel()


# ---------------------------------------------------------------------- batching


async def test_batches_are_written_every_flush_interval(make_sink):
    store = FakeStore()
    sink = await make_sink(store, flush_interval_s=0.1)
    t0 = time.monotonic()
    for i in range(5):
        sink.record(rec(i))
    assert store.rows == {} and sink.depth == 5  # record() never writes inline
    await until(lambda: len(store.rows) == 5, timeout=1)
    assert time.monotonic() - t0 <= 0.9  # by the interval (0.1 s), not at shutdown; slack for a busy machine
    assert [n for _, n in store.batches] == [5]  # one batch, not one write per record
    for i in range(5, 8):
        sink.record(rec(i))
    await until(lambda: len(store.rows) == 8, timeout=1)
    assert [n for _, n in store.batches] == [5, 3]
    assert sink.written == 8 and sink.spooled == 0


async def test_records_completed_during_a_write_wait_for_the_next_flush(make_sink):
    """Under a steady trickle a flush writes what was queued when it began. Chasing the
    records that completed during its write made a commit (an fsync on a real store)
    per write duration, a few records each, instead of one per interval."""
    store = FakeStore()
    store.delay_s = 0.02
    sink = await make_sink(store, flush_interval_s=0.2)
    t0, n = time.monotonic(), 0
    while time.monotonic() - t0 < 1.0:
        sink.record(rec(n))
        n += 1
        await asyncio.sleep(0.002)
    await until(lambda: len(store.rows) == n, timeout=2)
    # ~5 intervals in that second; chasing made ~50 writes (one per 20 ms write).
    assert store.calls <= 10, [size for _, size in store.batches]
    assert sum(store.inserts.values()) == n


async def test_a_full_batch_is_written_without_waiting_for_the_interval(make_sink):
    store = FakeStore()
    sink = await make_sink(store, flush_interval_s=30, max_batch=10)
    for i in range(25):
        sink.record(rec(i))
    await until(lambda: len(store.rows) >= 20, timeout=1)
    assert all(n <= 10 for _, n in store.batches)


# ---------------------------------------------------------------------- failures → spool


async def test_store_error_spools_the_batch_fsynced_mode_0600(make_sink, spool, monkeypatch):
    store = FakeStore()
    store.fail = True
    sink = await make_sink(store)
    records = [rec(i) for i in range(3)]
    seen: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        # The batch is still in the queue while its bytes are being made durable.
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), sink.depth))

    monkeypatch.setattr(os, "fsync", fsync)
    for r in records:
        sink.record(r)
    await until(lambda: sink.depth == 0)
    monkeypatch.undo()
    assert store.calls >= 1 and store.rows == {}
    assert stat.S_IMODE(spool.stat().st_mode) == 0o600
    assert [UsageRecord(**d) for d in spool_lines(spool)] == records
    assert (str(spool), 3) in seen  # fsync'd while the records were still in memory
    assert sink.spooled == 3 and not sink.store_ok and sink.spool_bytes == spool.stat().st_size


async def test_records_stay_in_memory_until_the_store_commits(make_sink):
    store = FakeStore()
    store.gate = asyncio.Event()
    sink = await make_sink(store)
    for i in range(4):
        sink.record(rec(i))
    await until(lambda: store.waiting == 1)
    await asyncio.sleep(0.2)  # several flush intervals while the write hangs
    assert sink.depth == 4 and store.rows == {}
    store.gate.set()
    await until(lambda: sink.depth == 0)
    assert set(store.rows) == {f"req_{i}" for i in range(4)}


async def test_a_hung_store_write_is_abandoned_for_the_spool(make_sink, spool):
    store = FakeStore()
    store.gate = asyncio.Event()  # never opened: a network partition, not a refusal
    sink = await make_sink(store, write_timeout_s=0.2)
    sink.record(rec(1))
    await until(lambda: sink.depth == 0, timeout=2)
    assert [d["id"] for d in spool_lines(spool)] == ["req_1"]
    assert sink.store_errors >= 1


async def test_replay_on_recovery_writes_each_record_exactly_once(make_sink, spool):
    store = FakeStore()
    store.fail = True
    sink = await make_sink(store)
    for i in range(20):
        sink.record(rec(i))
        await asyncio.sleep(0.01)  # spread over several batches
    await until(lambda: sink.depth == 0)
    assert len(spool_lines(spool)) == 20
    calls_during_outage = store.calls
    assert calls_during_outage <= 6  # backoff: batches go straight to the spool meanwhile
    store.fail = False
    sink.record(rec("after"))
    # The replay's last steps (the count, then removing the claimed file) follow the
    # store's write: wait for the end state, not for the rows.
    await until(lambda: len(store.rows) == 21 and sink.replayed >= 20 and sink.spool_bytes == 0, timeout=5)
    assert set(store.inserts.values()) == {1}  # no record was inserted twice
    assert sink.replayed in (20, 21) and sink.spool_bytes == 0 and sink.store_ok


async def test_replay_that_fails_half_way_does_not_reinsert_the_committed_half(make_sink, spool):
    store = FakeStore()
    store.fail = True
    sink = await make_sink(store, max_batch=5)
    for i in range(12):
        sink.record(rec(i))
    await until(lambda: sink.depth == 0)
    store.fail = False
    broke = []

    def second_chunk_once(records: Sequence[UsageRecord]) -> bool:
        if records[0].id == "req_5" and not broke:
            broke.append(1)
            return True
        return False

    store.fail_when = second_chunk_once
    sink._retry_at = 0.0
    await until(lambda: len(store.rows) == 12 and not spool.exists(), timeout=5)
    assert broke and set(store.inserts.values()) == {1}


async def test_a_torn_last_line_is_skipped_and_later_appends_survive(make_sink, spool):
    spool.parent.mkdir(parents=True)
    torn = orjson.dumps(rec(99)._asdict())[:40]  # SIGKILL in the middle of an append
    spool.write_bytes(b"".join(orjson.dumps(rec(i)._asdict()) + b"\n" for i in range(3)) + torn)
    store = FakeStore()
    store.fail = True
    sink = await make_sink(store)  # start() claims that file but cannot replay it: the store is down
    # Another worker sharing the spool dies mid-append; this one appends after it.
    other = orjson.dumps(rec(3)._asdict()) + b"\n"
    spool.write_bytes(other + torn)
    sink.record(rec("new"))
    await until(lambda: sink.depth == 0)
    raw = spool.read_bytes()
    assert raw.startswith(other + torn + b"\n" + b'{"id":"req_new"')  # a line of its own
    store.fail = False
    sink._retry_at = 0.0
    await until(lambda: not sink._has_spool(), timeout=5)
    assert set(store.rows) == {"req_0", "req_1", "req_2", "req_3", "req_new"}
    assert list(spool.parent.iterdir()) == []


async def test_malformed_spool_lines_do_not_block_the_rest(make_sink, spool):
    spool.parent.mkdir(parents=True)
    lines = [
        orjson.dumps(rec(1)._asdict()),
        b'{"id": 5}',                                              # missing fields
        orjson.dumps({**orjson.loads(orjson.dumps(rec(2)._asdict())), "prompt_tokens": "7"}),  # wrong type
        b"[1,2,3]",
        orjson.dumps({**orjson.loads(orjson.dumps(rec(3)._asdict())), "future_field": 1}),  # newer writer
        b"\x00\x00garbage",
    ]
    spool.write_bytes(b"\n".join(lines) + b"\n")
    store = FakeStore()
    await make_sink(store)
    assert set(store.rows) == {"req_1", "req_3"} and not spool.exists()


async def test_a_replay_file_left_by_a_crashed_process_is_replayed_at_start(make_sink, spool):
    spool.parent.mkdir(parents=True)
    left = spool.with_name(spool.name + ".replaying.4242.deadbeef")
    left.write_bytes(orjson.dumps(rec("old")._asdict()) + b"\n")
    spool.write_bytes(orjson.dumps(rec("older")._asdict()) + b"\n")
    store = FakeStore()
    await make_sink(store)
    assert set(store.rows) == {"req_old", "req_older"}
    assert list(spool.parent.iterdir()) == []


async def test_two_workers_sharing_one_spool_lose_nothing(make_sink, spool):
    store = FakeStore()  # one database behind two worker processes, one spool path
    store.fail = True
    a = await make_sink(store)
    b = await make_sink(store)
    for i in range(10):
        a.record(rec(f"a{i}"))
        b.record(rec(f"b{i}"))
    await until(lambda: a.depth == b.depth == 0)
    store.fail = False
    a._retry_at = 0.0
    b._retry_at = time.monotonic() + 60  # b still backs off: it keeps appending while a replays
    for i in range(10, 30):
        b.record(rec(f"b{i}"))
        await asyncio.sleep(0.01)
    expected = {f"req_a{i}" for i in range(10)} | {f"req_b{i}" for i in range(30)}
    await until(lambda: set(store.rows) == expected and not any(spool.parent.iterdir()), timeout=5)
    assert set(store.rows) == expected
    assert set(store.inserts.values()) == {1}


async def test_a_large_spool_is_replayed_in_batches_with_fresh_records_in_between(make_sink, spool):
    spool.parent.mkdir(parents=True)
    spool.write_bytes(b"".join(orjson.dumps(rec(f"s{i}")._asdict()) + b"\n" for i in range(100)))
    store = FakeStore()
    sink: UsageSink | None = None

    def inject(records: Sequence[UsageRecord]) -> bool:
        if records[0].id == "req_s60" and sink is not None:
            sink.record(rec("fresh"))  # traffic while the replay goes on
        return False

    store.fail_when = inject
    sink = await make_sink(store, max_batch=5)
    assert len(store.rows) == 50  # start() replays a first slice, then serves
    await until(lambda: len(store.rows) == 101 and not sink._has_spool())
    order = [rid for rid in store.inserts]
    assert order.index("req_fresh") < order.index("req_s65")  # not held back until the replay ended
    assert all(n <= 5 for _, n in store.batches) and set(store.inserts.values()) == {1}


def test_an_append_waiting_for_the_lock_follows_a_claim_to_the_new_file(spool):
    """The replayer renames the spool under the lock; an appender that opened the old
    file before that must not write into the claimed (already read) file."""
    import fcntl
    import threading

    spool.parent.mkdir(parents=True)
    spool.write_bytes(orjson.dumps(rec("old")._asdict()) + b"\n")
    sink = UsageSink(FakeStore(), spool)  # type: ignore[arg-type]
    fd = os.open(spool, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # we are the replayer, mid-claim
    appender = threading.Thread(target=sink._append_spool, args=([rec("new")],))
    appender.start()
    time.sleep(0.2)  # the appender has opened the file and waits for the lock
    claimed = spool.with_name(spool.name + ".replaying.test")
    os.rename(spool, claimed)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    appender.join(5)
    assert not appender.is_alive()
    assert [d["id"] for d in spool_lines(claimed)] == ["req_old"]
    assert [d["id"] for d in spool_lines(spool)] == ["req_new"]


# ---------------------------------------------------------------------- shutdown


async def test_close_writes_everything_to_the_store(make_sink):
    store = FakeStore()
    sink = await make_sink(store, flush_interval_s=30)
    for i in range(7):
        sink.record(rec(i))
    await sink.close()
    assert len(store.rows) == 7 and sink.depth == 0


async def test_records_arriving_while_close_flushes_reach_the_store(make_sink, spool):
    store = FakeStore()
    store.gate = asyncio.Event()
    sink = await make_sink(store, flush_interval_s=30)
    sink.record(rec(1))
    closing = asyncio.create_task(sink.close())
    await until(lambda: store.waiting == 1)
    sink.record(rec(2))  # a handler finishing while the last batch is being written
    store.gate.set()
    await closing
    assert set(store.rows) == {"req_1", "req_2"} and not spool.exists()


async def test_close_flushes_even_if_the_flush_task_was_cancelled(make_sink, spool):
    store = FakeStore()
    sink = await make_sink(store, flush_interval_s=30)
    assert sink._task is not None
    sink._task.cancel()  # e.g. a careless cancel-all at loop shutdown (RELIABILITY E7)
    await asyncio.sleep(0)
    sink.record(rec(1))
    await sink.close()
    assert set(store.rows) == {"req_1"} and not spool.exists()


async def test_close_spools_when_the_store_is_down_and_later_records_too(make_sink, spool):
    store = FakeStore()
    store.fail = True
    sink = await make_sink(store, flush_interval_s=30)
    for i in range(7):
        sink.record(rec(i))
    await sink.close()
    assert sink.depth == 0 and len(spool_lines(spool)) == 7
    sink.record(rec("late"))  # a handler that finished after close(): straight to disk
    assert sink.depth == 0 and spool_lines(spool)[-1]["id"] == "req_late"
    # The next process replays all of it.
    store.fail = False
    again = await make_sink(FakeStore())
    assert len(again._store.rows) == 8  # type: ignore[attr-defined]


async def test_close_tries_the_store_once_more_despite_backoff(make_sink, spool):
    store = FakeStore()
    store.fail = True
    sink = await make_sink(store)
    sink.record(rec(1))
    await until(lambda: sink.depth == 0)
    store.fail = False
    sink._retry_at = time.monotonic() + 60
    sink.record(rec(2))
    await sink.close()
    assert "req_2" in store.rows


# ---------------------------------------------------------------------- concurrency, bounds


async def test_records_during_a_slow_write_are_not_lost(make_sink):
    store = FakeStore()
    store.gate = asyncio.Event()
    sink = await make_sink(store, max_batch=50)
    for i in range(10):
        sink.record(rec(i))
    await until(lambda: store.waiting == 1)

    async def producer(p: int) -> None:
        for i in range(50):
            sink.record(rec(f"{p}-{i}"))
            await asyncio.sleep(0)

    await asyncio.gather(*(producer(p) for p in range(4)))
    assert sink.depth == 210
    store.gate.set()
    await until(lambda: sink.depth == 0)
    assert len(store.rows) == 210 and set(store.inserts.values()) == {1}


async def test_a_cancelled_flush_keeps_its_batch(make_sink):
    store = FakeStore()
    store.gate = asyncio.Event()
    sink = await make_sink(store, flush_interval_s=30)
    for i in range(5):
        sink.record(rec(i))
    flush = asyncio.create_task(sink.flush())
    await until(lambda: store.waiting == 1)
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    assert sink.depth == 5
    store.gate.set()
    await sink.flush()
    assert len(store.rows) == 5 and sink.depth == 0


async def test_queue_beyond_queue_max_spills_to_the_spool(make_sink, spool):
    store = FakeStore()
    store.gate = asyncio.Event()  # slow, not failing: the queue grows
    sink = await make_sink(store, max_batch=4, queue_max=10)
    for i in range(4):
        sink.record(rec(i))
    await until(lambda: store.waiting == 1)  # req_0..3 are being written
    for i in range(4, 40):
        sink.record(rec(i))
        assert sink.depth <= 10
    spilled = {d["id"] for d in spool_lines(spool)}
    assert spilled and not spilled & {f"req_{i}" for i in range(4)}  # the batch in flight stayed put
    assert sink.spooled == len(spilled)
    store.gate.set()
    await until(lambda: len(store.rows) == 40 and not spool.exists(), timeout=5)
    assert set(store.inserts.values()) == {1}


# ---------------------------------------------------------------------- bounded spool (I8)


async def test_a_full_spool_stops_admission_until_its_replay_drains_it(make_sink, spool, caplog):
    store = FakeStore()
    store.fail = True
    line = len(orjson.dumps(rec(0)._asdict())) + 1
    sink = await make_sink(store, spool_max_bytes=3 * line)
    for i in range(2):
        sink.record(rec(i))
    await until(lambda: sink.spooled == 2)
    await asyncio.sleep(0.15)  # a few flush ticks: two records are under the cap
    assert sink.accepting
    for i in range(2, 4):
        sink.record(rec(i))
    await until(lambda: not sink.accepting)
    assert sink.spool_bytes >= 3 * line and sink.depth == 0
    assert "refusing billable requests" in caplog.text
    # Records still arriving (calls that were in flight) are kept, never dropped.
    sink.record(rec(4))
    await until(lambda: sink.spooled == 5)
    store.fail = False
    await until(lambda: sink.accepting and not spool.exists(), timeout=10)
    assert sorted(store.rows) == [f"req_{i}" for i in range(5)] and set(store.inserts.values()) == {1}
    assert sink.spool_bytes == 0 and "has room again" in caplog.text


async def test_records_the_disk_refuses_past_queue_max_stop_admission(make_sink, tmp_path):
    """The store is down and the spool cannot be written (its directory is a file here,
    a full disk in life): memory keeps every record, and billable calls stop until the
    store takes them."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = FakeStore()
    store.fail = True
    sink = await make_sink(store, spool_path=blocker / "spool.jsonl", queue_max=5, spool_max_bytes=1 << 20)
    for i in range(5):
        sink.record(rec(i))
    assert sink.accepting  # within queue_max: nothing to spill yet
    sink.record(rec(5))
    assert not sink.accepting and sink.depth == 6 and sink.spool_errors >= 1
    store.fail = False
    await until(lambda: sink.accepting, timeout=10)
    assert sorted(store.rows) == [f"req_{i}" for i in range(6)] and sink.depth == 0


def test_the_spool_cap_is_configured_in_megabytes_and_must_be_positive():
    assert parse_config("").storage.spool_max_mb == 1024
    assert parse_config("storage: {spool_max_mb: 0.5}").storage.spool_max_mb == 0.5
    for bad in ("0", "-1", ".inf", ".nan"):
        with pytest.raises(ConfigError, match=r"storage\.spool_max_mb (must be a positive number|\(line 1\): expected a finite number)"):
            parse_config(f"storage: {{spool_max_mb: {bad}}}")


async def test_a_failing_observer_costs_no_record(make_sink):
    store = FakeStore()

    def boom(_: UsageRecord) -> None:
        raise RuntimeError("observer bug")

    sink = await make_sink(store, on_record=boom)
    sink.record(rec(1))
    await until(lambda: "req_1" in store.rows)


async def test_metrics_read_the_sink(make_sink, spool):
    store = FakeStore()
    store.fail = True
    metrics = Metrics()
    sink = await make_sink(store, on_record=metrics.observe_record)
    sink.record(rec(1, estimated=True, cached_tokens=2, reasoning_tokens=1))
    await until(lambda: sink.depth == 0)

    class State:
        streams: list = []
        in_flight = 0

    state = State()
    state.sink = sink  # type: ignore[attr-defined]
    text = metrics.render(state)[0].decode()
    assert f"llm_proxy_usage_spool_bytes {float(spool.stat().st_size)}" in text
    assert "llm_proxy_usage_queue_depth 0.0" in text
    assert 'llm_proxy_usage_records_total{path="spooled"} 1.0' in text
    assert "llm_proxy_usage_store_ok 0.0" in text
    assert 'llm_proxy_tokens_total{kind="reasoning",model="m"} 1.0' in text
    assert 'llm_proxy_estimated_requests_total{model="m"} 1.0' in text


# ---------------------------------------------------------------------- in flight (I2, issue 25 item 4)


def _pend(sink: UsageSink, r: UsageRecord) -> None:
    sink.pending(r.id, lambda: r)


def journal_of(spool: Path) -> Path:
    return spool.with_name(f".{spool.name}.inflight.{os.getpid()}")


async def test_pending_records_are_journaled_only_while_their_attempt_is_open(make_sink, spool):
    store = FakeStore()
    sink = await make_sink(store)
    _pend(sink, rec("quick", outcome="shutdown", error="interrupted", estimated=True))
    sink.record(rec("quick"))  # ended within the flush interval: never journaled
    for i in range(3):
        _pend(sink, rec(f"long{i}", outcome="shutdown", error="interrupted", estimated=True))
    await sink.flush()
    assert [r["id"] for r in spool_lines(journal_of(spool))] == ["req_long0", "req_long1", "req_long2"]
    for i in range(3):
        sink.record(rec(f"long{i}"))
    await sink.flush()
    await sink.close()
    assert not journal_of(spool).exists()  # a clean close leaves nothing to recover
    assert all(not store.rows[f"req_{k}"].estimated for k in ("quick", "long0", "long1", "long2"))


async def test_the_journal_is_compacted_once_mostly_ended(make_sink, spool, monkeypatch):
    monkeypatch.setattr("proxy.usage_sink._JOURNAL_COMPACT_LINES", 10)
    sink = await make_sink(FakeStore())
    for i in range(12):
        _pend(sink, rec(i, estimated=True))
        await sink.flush()
        if i < 11:
            sink.record(rec(i))
        await sink.flush()
    _pend(sink, rec("last", estimated=True))
    await sink.flush()
    ids = [r["id"] for r in spool_lines(journal_of(spool))]
    # Rewritten once it was mostly ended attempts: 13 were journaled, a few lines are left,
    # and every attempt still open is among them.
    assert len(ids) <= 4 and {"req_11", "req_last"} <= set(ids), ids
    sink.record(rec(11))
    sink.record(rec("last"))


async def test_a_dead_process_journal_becomes_estimated_records_behind_its_spool(make_sink, spool, tmp_path):
    """The dead process had spooled the real record of one attempt and journaled three:
    the real one wins (store keeps the first row of an id), the other two are estimates."""
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.write_bytes(orjson.dumps(rec("a")._asdict()) + b"\n")
    dead = spool.with_name(f".{spool.name}.inflight.99999999")  # past pid_max: no such process
    dead.write_bytes(b"".join(
        orjson.dumps(rec(k, estimated=True, outcome="shutdown", error="interrupted", attempt=n)._asdict()) + b"\n"
        for n, k in enumerate(("a", "b", "c"))
    ) + b'{"torn')
    store = FakeStore()
    sink = await make_sink(store)
    await until(lambda: len(store.rows) == 3)
    assert not store.rows["req_a"].estimated
    assert store.rows["req_b"].estimated and store.rows["req_c"].error == "interrupted"
    assert (store.rows["req_b"].attempt, store.rows["req_c"].attempt) == (1, 2)  # which attempt each was
    assert not dead.exists() and sink.recovered == 3
