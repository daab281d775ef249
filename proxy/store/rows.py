"""Column mapping shared by the SQL stores: both keep the same schema and columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from proxy.store.base import KeyRecord, UsageRecord

Row = Mapping[str, Any]   # sqlite3.Row and asyncpg.Record both index by column name


def models_json(models: Sequence[str]) -> str:
    return orjson.dumps(list(models)).decode()


def key_from_row(row: Row) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        name=row["name"],
        prefix=row["prefix"],
        digest=row["digest"],
        models=tuple(orjson.loads(row["models"])),
        rpm=row["rpm"],
        tpm=row["tpm"],
        max_parallel=row["max_parallel"],
        budget_usd=row["budget_usd"],
        budget_period=row["budget_period"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )


# The record's fields are the table's columns, in order: a record is its own INSERT row.
USAGE_COLUMNS = ", ".join(UsageRecord._fields)


def usage_from_row(row: Row) -> UsageRecord:
    return UsageRecord(
        id=row["id"],
        ts=row["ts"],
        key_id=row["key_id"],
        key_name=row["key_name"],
        endpoint=row["endpoint"],
        model=row["model"],
        upstream=row["upstream"],
        upstream_model=row["upstream_model"],
        stream=bool(row["stream"]),        # SQLite has no boolean type: stored as 0/1
        status=row["status"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        cached_tokens=row["cached_tokens"],
        cache_creation_tokens=row["cache_creation_tokens"],
        reasoning_tokens=row["reasoning_tokens"],
        cost_usd=row["cost_usd"],
        estimated=bool(row["estimated"]),
        ttft_ms=row["ttft_ms"],
        duration_ms=row["duration_ms"],
        error=row["error"],
        outcome=row["outcome"],
        client_dialect=row["client_dialect"],
        upstream_protocol=row["upstream_protocol"],
        attempt=row["attempt"],
    )
