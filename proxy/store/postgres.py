"""PostgreSQL store: the scaled-out backend (several proxy processes, one database).

An asyncpg pool, same schema semantics as the SQLite store. Migrations run in one
transaction under a transaction-scoped advisory lock, so processes starting together
apply each step exactly once and nobody sees a half-migrated schema.

Driver errors become `StoreError` with a generic message: asyncpg's own text can carry
host names, SQL or (for a malformed DSN) parts of the DSN, and none of that may reach a
log line or a client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from proxy.store import ledger
from proxy.store.base import (
    KeyRecord,
    KeyRevoked,
    SessionRecord,
    StoreError,
    UsageRecord,
    new_secret,
)
from proxy.store.ledger import ERRORS_SQL, LEVELS, POSTGRES, ROLLUP_COLUMNS, ROLLUP_KEYS, rollup_upsert
from proxy.store.rows import USAGE_COLUMNS, key_from_row
from proxy.store.sql import KEY_REF, SQLStore

POOL_MIN = 1
POOL_MAX = 10
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 10.0
# Any fixed bigint shared by every process of this app: ASCII "llmproxy".
MIGRATION_LOCK = 0x6C6C6D70726F7879
USAGE_WRITE_LOCK = MIGRATION_LOCK + 1
_INSERT_USAGE = (
    f"INSERT INTO usage ({USAGE_COLUMNS}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(UsageRecord._fields)))}) ON CONFLICT (id) DO NOTHING"
)
# What the driver and the network can raise; anything else is a bug and stays visible.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)

_TYPES = {"int": "BIGINT", "float": "DOUBLE PRECISION", "text": "TEXT"}


def _backfill(table: str, size: int) -> str:
    return f"""INSERT INTO {table} ({ROLLUP_COLUMNS})
        SELECT t, key_id, MAX(key_name), model, upstream, upstream_model, outcome,
               SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),
               SUM(reasoning_tokens), SUM(cost_usd), SUM(estimated), SUM(ttft_sum), SUM(ttft_count),
               SUM(duration_sum), MAX(last_ts),
               (array_agg(last_error ORDER BY last_error_ts DESC NULLS LAST))[1], MAX(last_error_ts)
        FROM (SELECT {ledger.rollup_values(POSTGRES, "usage", size)} FROM usage) AS u
        GROUP BY {", ".join(ROLLUP_KEYS)}"""


# Step i takes the schema from version i to i + 1. Append only: never edit a released step
# (nor what it is built from: ledger.ROLLUP_COLUMNS, rollup_table, rollup_upsert, _backfill).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE keys (
            id            TEXT PRIMARY KEY,
            name          TEXT NOT NULL UNIQUE,
            prefix        TEXT NOT NULL,
            digest        TEXT NOT NULL UNIQUE,
            models        TEXT NOT NULL DEFAULT '[]',
            rpm           BIGINT,
            tpm           BIGINT,
            max_parallel  BIGINT,
            budget_usd    DOUBLE PRECISION,
            budget_period TEXT,
            expires_at    DOUBLE PRECISION,
            revoked_at    DOUBLE PRECISION,
            created_at    DOUBLE PRECISION NOT NULL
        )""",
        # No foreign key to keys: the ledger must keep every row whatever happens to keys.
        """CREATE TABLE usage (
            id                    TEXT PRIMARY KEY,
            ts                    DOUBLE PRECISION NOT NULL,
            key_id                TEXT,
            key_name              TEXT,
            endpoint              TEXT NOT NULL,
            model                 TEXT NOT NULL,
            upstream              TEXT NOT NULL,
            upstream_model        TEXT NOT NULL,
            stream                BOOLEAN NOT NULL,
            status                INTEGER NOT NULL,
            prompt_tokens         BIGINT NOT NULL,
            completion_tokens     BIGINT NOT NULL,
            cached_tokens         BIGINT NOT NULL,
            cache_creation_tokens BIGINT NOT NULL,
            reasoning_tokens      BIGINT NOT NULL,
            cost_usd              DOUBLE PRECISION NOT NULL,
            estimated             BOOLEAN NOT NULL,
            ttft_ms               DOUBLE PRECISION,
            duration_ms           DOUBLE PRECISION NOT NULL,
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
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at)",
    ),
    (
        # Names are unique among live keys only, so a revoked key's name can be reused.
        "ALTER TABLE keys DROP CONSTRAINT IF EXISTS keys_name_key",
        "CREATE UNIQUE INDEX keys_live_name ON keys (name) WHERE revoked_at IS NULL",
        "ALTER TABLE keys ADD COLUMN last_used_at DOUBLE PRECISION",
        # The explorer's filters: by model, and errors only (few rows, so a small index).
        "CREATE INDEX usage_model_ts ON usage (model, ts)",
        f"CREATE INDEX usage_errors_ts ON usage (ts) WHERE {ERRORS_SQL}",
        # Roll-ups for the aggregates (see proxy/store/ledger.py).
        ledger.rollup_table("usage_hourly", _TYPES),
        ledger.rollup_table("usage_daily", _TYPES),
        f"""CREATE FUNCTION usage_rollup() RETURNS trigger LANGUAGE plpgsql AS $fn$
            BEGIN
                {"; ".join(rollup_upsert(POSTGRES, table, size, "NEW") for table, size in LEVELS)};
                RETURN NULL;
            END
        $fn$""",
        "CREATE TRIGGER usage_rollup AFTER INSERT ON usage FOR EACH ROW EXECUTE FUNCTION usage_rollup()",
        # The records written before this version, one roll-up row per bucket (an upsert
        # may not touch a row twice in one statement here).
        *(_backfill(table, size) for table, size in LEVELS),
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


class PostgresStore(SQLStore):
    # SQLStore holds every single-statement operation (key lookups, the ledger's reads...)
    # over `_query`; this class runs them on the pool and does the rest.
    _flavour = POSTGRES

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn  # holds the password: never logged, never put into an error
        self._pool: asyncpg.Pool | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=POOL_MIN,
                max_size=POOL_MAX,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
            )
        except Exception as exc:  # DSN parsing raises plain ValueErrors too; all mean "cannot connect"
            raise StoreError(f"postgres store: cannot connect ({type(exc).__name__})") from None
        self._pool = pool
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
        except asyncio.CancelledError:
            pool.terminate()
            raise
        except _DRIVER_ERRORS:
            pool.terminate()  # a stuck or broken connection must neither hang nor fail shutdown

    async def ping(self) -> None:
        async with self._conn("ping") as conn:
            await conn.fetchval("SELECT MAX(version) FROM schema_version")

    async def _migrate(self) -> None:
        async with self._conn("migrate") as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_version (
                       version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"""
            )
            current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            if current > len(MIGRATIONS):
                raise StoreError("postgres store: the database schema is newer than this build")
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1]:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)", version, time.time()
                )

    @asynccontextmanager
    async def _conn(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        pool = self._pool
        if pool is None:
            raise StoreError("postgres store is not open")
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                yield conn
        except _DRIVER_ERRORS as exc:
            # The class name (e.g. ConnectionRefusedError, UniqueViolationError) is enough
            # to act on; the driver's message is not carried over.
            raise StoreError(f"postgres store: {what} failed ({type(exc).__name__})") from None

    # -- keys (the single statements are SQLStore's) ----------------------------------

    async def rotate_key(self, id_or_name: str) -> tuple[KeyRecord, str] | None:
        plaintext, prefix, digest = new_secret()
        async with self._conn("rotate key") as conn, conn.transaction():
            # FOR UPDATE: a revoke from another process waits, or is seen here.
            sql, args = ledger.numbered(f"SELECT * FROM keys WHERE id = ({KEY_REF}) FOR UPDATE", {"ref": id_or_name})
            found = await conn.fetchrow(sql, *args)
            if found is None:
                return None
            if found["revoked_at"] is not None:
                raise KeyRevoked("a revoked key cannot be rotated")
            row = await conn.fetchrow(
                "UPDATE keys SET prefix = $2, digest = $3 WHERE id = $1 RETURNING *", found["id"], prefix, digest
            )
        return key_from_row(row), plaintext

    async def touch_keys(self, last_used: Mapping[str, float]) -> None:
        if not last_used:
            return
        # Sorted by id: concurrent flushes from several processes lock rows in one order.
        async with self._conn("touch keys") as conn, conn.transaction():
            await conn.executemany(
                "UPDATE keys SET last_used_at = GREATEST(COALESCE(last_used_at, 0), $2) WHERE id = $1",
                sorted(last_used.items()),
            )

    # -- usage -----------------------------------------------------------------------

    async def write_usage(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        # One transaction per batch; a replayed id is skipped (first write wins), so retries
        # and spool replays never double-bill (RELIABILITY §5 I1).
        # Each insert locks its id and (through the roll-up trigger) its usage_hourly row
        # until commit; two processes' batches sharing ids or roll-up rows would take
        # those locks in different orders and deadlock. One transaction-scoped advisory
        # lock makes usage batches take turns instead (each is a few milliseconds).
        async with self._conn("write usage") as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", USAGE_WRITE_LOCK)
            await conn.executemany(_INSERT_USAGE, records)

    async def _query(self, what: str, sql: str, params: dict[str, Any]) -> list[asyncpg.Record]:
        text, args = ledger.numbered(sql, params)
        async with self._conn(what) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(text, *args)
        return rows

    # -- dashboard sessions ----------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        async with self._conn("create session") as conn, conn.transaction():
            await conn.execute("DELETE FROM ui_sessions WHERE expires_at <= $1", record.created_at)
            await conn.execute(
                """INSERT INTO ui_sessions (digest, kind, key_id, binding, created_at, expires_at)
                   VALUES ($1, $2, $3, $4, $5, $6)""",
                record.digest, record.kind, record.key_id, record.binding, record.created_at, record.expires_at,
            )
