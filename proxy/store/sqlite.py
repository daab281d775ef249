"""SQLite store: the single-node default backend.

sqlite3 blocks, so every call runs on one dedicated worker thread that creates and owns
the only connection; the event loop just awaits futures. A single thread also means this
process never contends with itself for the write lock; `busy_timeout` covers other
processes (the CLI creating a key while the server runs).

WAL lets readers (auth lookups) proceed while a usage batch is being written.
`synchronous=FULL` fsyncs every commit: writes arrive in batches, so the cost is small,
and a committed usage row must survive a power cut (RELIABILITY §5 I7/I8).

If a caller is cancelled while its call runs, the call still completes on the worker
thread. That is safe: usage writes are idempotent on the request id.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from proxy.store import ledger
from proxy.store.base import (
    KeyRecord,
    KeyRevoked,
    SessionRecord,
    StoreError,
    UsageRecord,
    new_secret,
)
from proxy.store.ledger import ERRORS_SQL, LEVELS, SQLITE, rollup_upsert
from proxy.store.rows import USAGE_COLUMNS, Row, key_from_row
from proxy.store.sql import KEY_REF, SQLStore

T = TypeVar("T")

BUSY_TIMEOUT_S = 5.0
MEMORY = ":memory:"
_MIN_SQLITE = (3, 35, 0)  # RETURNING (3.35) and upsert (3.24)
_TYPES = {"int": "INTEGER", "float": "REAL", "text": "TEXT"}

# Step i takes the schema from version i to i + 1. Append only: never edit a released step
# (nor what it is built from: ledger.ROLLUP_COLUMNS, rollup_table and rollup_upsert).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE keys (
            id            TEXT PRIMARY KEY,
            name          TEXT NOT NULL UNIQUE,
            prefix        TEXT NOT NULL,
            digest        TEXT NOT NULL UNIQUE,
            models        TEXT NOT NULL DEFAULT '[]',
            rpm           INTEGER,
            tpm           INTEGER,
            max_parallel  INTEGER,
            budget_usd    REAL,
            budget_period TEXT,
            expires_at    REAL,
            revoked_at    REAL,
            created_at    REAL NOT NULL
        )""",
        # No foreign key to keys: the ledger must keep every row whatever happens to keys.
        """CREATE TABLE usage (
            id                    TEXT PRIMARY KEY,
            ts                    REAL NOT NULL,
            key_id                TEXT,
            key_name              TEXT,
            endpoint              TEXT NOT NULL,
            model                 TEXT NOT NULL,
            upstream              TEXT NOT NULL,
            upstream_model        TEXT NOT NULL,
            stream                INTEGER NOT NULL,
            status                INTEGER NOT NULL,
            prompt_tokens         INTEGER NOT NULL,
            completion_tokens     INTEGER NOT NULL,
            cached_tokens         INTEGER NOT NULL,
            cache_creation_tokens INTEGER NOT NULL,
            reasoning_tokens      INTEGER NOT NULL,
            cost_usd              REAL NOT NULL,
            estimated             INTEGER NOT NULL,
            ttft_ms               REAL,
            duration_ms           REAL NOT NULL,
            error                 TEXT,
            outcome               TEXT NOT NULL
        )""",
        "CREATE INDEX usage_ts ON usage (ts)",
        "CREATE INDEX usage_key_ts ON usage (key_id, ts)",
    ),
    (
        """CREATE TABLE ui_sessions (
            digest     TEXT PRIMARY KEY,
            kind       TEXT NOT NULL,
            key_id     TEXT,
            binding    TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at)",
    ),
    (
        # Names are unique among live keys only, so a revoked key's name can be reused.
        # SQLite cannot drop a column's UNIQUE: the table is rebuilt (same columns, plus
        # last_used_at), which also drops the implicit unique index on name.
        """CREATE TABLE keys_v2 (
            id            TEXT PRIMARY KEY,
            name          TEXT NOT NULL,
            prefix        TEXT NOT NULL,
            digest        TEXT NOT NULL UNIQUE,
            models        TEXT NOT NULL DEFAULT '[]',
            rpm           INTEGER,
            tpm           INTEGER,
            max_parallel  INTEGER,
            budget_usd    REAL,
            budget_period TEXT,
            expires_at    REAL,
            revoked_at    REAL,
            created_at    REAL NOT NULL,
            last_used_at  REAL
        )""",
        """INSERT INTO keys_v2 (id, name, prefix, digest, models, rpm, tpm, max_parallel, budget_usd,
                                budget_period, expires_at, revoked_at, created_at)
           SELECT id, name, prefix, digest, models, rpm, tpm, max_parallel, budget_usd,
                  budget_period, expires_at, revoked_at, created_at FROM keys""",
        "DROP TABLE keys",
        "ALTER TABLE keys_v2 RENAME TO keys",
        "CREATE UNIQUE INDEX keys_live_name ON keys (name) WHERE revoked_at IS NULL",
        # The explorer's filters: by model, and errors only (few rows, so a small index).
        "CREATE INDEX usage_model_ts ON usage (model, ts)",
        f"CREATE INDEX usage_errors_ts ON usage (ts) WHERE {ERRORS_SQL}",
        # Roll-ups for the aggregates (see proxy/store/ledger.py); WITHOUT ROWID: the
        # primary key is the table, so a range of buckets is one contiguous read.
        ledger.rollup_table("usage_hourly", _TYPES) + " WITHOUT ROWID",
        ledger.rollup_table("usage_daily", _TYPES) + " WITHOUT ROWID",
        "CREATE TRIGGER usage_rollup AFTER INSERT ON usage BEGIN "
        + "; ".join(rollup_upsert(SQLITE, table, size, "NEW") for table, size in LEVELS)
        + "; END",
        # The records written before this version.
        *(rollup_upsert(SQLITE, table, size, "usage") for table, size in LEVELS),
    ),
    (
        # Which dialect the client spoke and which protocol the upstream did (translation).
        "ALTER TABLE usage ADD COLUMN client_dialect TEXT",
        "ALTER TABLE usage ADD COLUMN upstream_protocol TEXT",
    ),
    (
        # Which attempt of its request a record is (0 first; the id's `.n` suffix). Rows
        # from before keep NULL: their ids need not follow the gateway's own format.
        "ALTER TABLE usage ADD COLUMN attempt INTEGER",
    ),
)

class SQLiteStore(SQLStore):
    # SQLStore holds every single-statement operation (key lookups, the ledger's reads...)
    # over `_query`; this class runs them on the worker thread and does the rest.
    _flavour = SQLITE

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise StoreError("sqlite store: SQLite 3.35 or newer is required")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            await self._submit("open", self._open_sync)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        # Refuse new calls first; calls already queued run before the close (FIFO).
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, _guarded, "close", self._close_sync, ())
        finally:
            # The queue is drained by now; wait=False keeps the loop from ever blocking
            # here, even if this coroutine was cancelled while the close ran.
            executor.shutdown(wait=False)

    async def ping(self) -> None:
        await self._call("ping", _ping)

    # -- keys (the single statements are SQLStore's) ----------------------------------

    async def rotate_key(self, id_or_name: str) -> tuple[KeyRecord, str] | None:
        plaintext, prefix, digest = new_secret()
        record = await self._call("rotate key", _rotate_key, id_or_name, prefix, digest)
        return None if record is None else (record, plaintext)

    async def touch_keys(self, last_used: Mapping[str, float]) -> None:
        if last_used:
            await self._call("touch keys", _touch_keys, sorted(last_used.items()))

    # -- usage -----------------------------------------------------------------------

    async def write_usage(self, records: Sequence[UsageRecord]) -> None:
        if records:
            await self._call("write usage", _write_usage, list(records))

    async def _query(self, what: str, sql: str, params: dict[str, Any]) -> list[Row]:
        return await self._call(what, _fetch, sql, params)

    # -- dashboard sessions ----------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        await self._call("create session", _create_session, record)

    # -- worker thread ---------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(connection, *args)` on the worker thread."""
        return await self._submit(what, self._with_conn, fn, *args)

    async def _submit(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor
        if executor is None:
            raise StoreError("sqlite store is not open")
        return await asyncio.get_running_loop().run_in_executor(executor, _guarded, what, fn, args)

    def _with_conn(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            raise StoreError("sqlite store is not open")
        return fn(self._conn, *args)

    def _open_sync(self) -> None:
        if self.path != MEMORY:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"sqlite store: cannot create the data directory ({type(exc).__name__})") from None
        # isolation_level=None: no implicit transactions; writes open their own below.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            _use_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # the last connection checkpoints the WAL into the main file


# -- statements (all run on the worker thread) -------------------------------------------


def _guarded(what: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    try:
        return fn(*args)
    except sqlite3.Error as exc:
        # The error name (e.g. SQLITE_BUSY) is enough to act on; driver text may quote
        # SQL or paths, so it is not carried over.
        code = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        raise StoreError(f"sqlite store: {what} failed ({code})") from None


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the database file to WAL (a no-op once it is). While another connection is
    switching the same new file, SQLite answers SQLITE_BUSY at once, without the busy
    handler (waiting there could deadlock), so processes starting together retry here
    for up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", None) != "SQLITE_BUSY" or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)  # on the store's own thread


@contextmanager
def _write_txn(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so a
    # transaction never fails half-way on a read-to-write lock upgrade.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.commit()
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    # One write transaction: processes opening the same file at once apply each step once.
    with _write_txn(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        if current > len(MIGRATIONS):
            raise StoreError("sqlite store: the database schema is newer than this build")
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time())
            )


def _ping(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT MAX(version) FROM schema_version").fetchall()  # reads a page, not just the parser


def _get_key(conn: sqlite3.Connection, ref: str) -> KeyRecord | None:
    rows = conn.execute(f"SELECT * FROM keys WHERE id = ({KEY_REF})", {"ref": ref}).fetchall()
    return _one_key(rows)


def _rotate_key(conn: sqlite3.Connection, ref: str, prefix: str, digest: str) -> KeyRecord | None:
    # One transaction: the check for revocation and the new digest cannot interleave with
    # a revoke from another process.
    with _write_txn(conn):
        found = _get_key(conn, ref)
        if found is None:
            return None
        if found.revoked_at is not None:
            raise KeyRevoked("a revoked key cannot be rotated")
        rows = conn.execute(
            "UPDATE keys SET prefix = ?, digest = ? WHERE id = ? AND revoked_at IS NULL RETURNING *",
            (prefix, digest, found.id),
        ).fetchall()
    return _one_key(rows)


def _touch_keys(conn: sqlite3.Connection, last_used: list[tuple[str, float]]) -> None:
    # Sorted by id by the caller; MAX keeps a later time written by another process.
    with _write_txn(conn):
        conn.executemany(
            "UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
            [(ts, key_id) for key_id, ts in last_used],
        )


def _fetch(conn: sqlite3.Connection, sql: str, params: dict[str, Any]) -> list[Row]:
    # Outside a transaction (isolation_level=None), so a write (UPDATE ... RETURNING) commits
    # once fetchall() has stepped it to completion.
    rows: list[Row] = conn.execute(sql, params).fetchall()  # sqlite3.Row indexes by column name
    return rows


# bool is not an exact int, so the sqlite3 module looks for an adapter for every bool it
# binds, and each failed lookup raises (and drops) two AttributeErrors: about 5,000
# instructions per usage row (two bool columns). A registered adapter is a dict hit; the
# registration is process-wide, made once here, and binds the same 0/1 as before.
sqlite3.register_adapter(bool, int)

_USAGE_ROW = "(" + ", ".join("?" * len(UsageRecord._fields)) + ")"
# A batch goes out as INSERTs of a few fixed row counts (130 rows: 64 + 64 + 2), so each
# count's statement is prepared once and then found in the sqlite3 module's statement
# cache. One statement sized to the batch (up to 500 rows x 21 parameters) meant
# preparing a new one for nearly every batch and kept up to 128 of them cached: 19 us of
# CPU per row against 10 us (measured on random batch sizes of 1-300 rows).
_PIECES = (64, 32, 16, 8, 4, 2, 1)
_INSERT = {
    n: f"INSERT INTO usage ({USAGE_COLUMNS}) VALUES {', '.join([_USAGE_ROW] * n)} ON CONFLICT (id) DO NOTHING"
    for n in _PIECES
}


def _write_usage(conn: sqlite3.Connection, rows: list[UsageRecord]) -> None:
    # One transaction per batch; a replayed id is skipped (first write wins), so retries
    # and spool replays never double-bill (RELIABILITY §5 I1).
    # Multi-row INSERTs, not executemany: the sqlite3 module releases and re-takes the
    # GIL around every statement step, and each re-take competes with the event loop
    # thread; one step per up to 64 rows keeps this thread out of the loop's way.
    with _write_txn(conn):
        start = 0
        for size in _PIECES:
            while len(rows) - start >= size:
                # the rows' values in one list, at C speed
                conn.execute(_INSERT[size], list(chain.from_iterable(rows[start : start + size])))
                start += size


def _create_session(conn: sqlite3.Connection, r: SessionRecord) -> None:
    with _write_txn(conn):
        conn.execute("DELETE FROM ui_sessions WHERE expires_at <= ?", (r.created_at,))
        conn.execute(
            "INSERT INTO ui_sessions (digest, kind, key_id, binding, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            (r.digest, r.kind, r.key_id, r.binding, r.created_at, r.expires_at),
        )


def _one_key(rows: list[sqlite3.Row]) -> KeyRecord | None:
    return key_from_row(dict(rows[0])) if rows else None
