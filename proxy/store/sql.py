"""What the two SQL stores share: every operation that is one statement.

Key and session statements are written once here with `:name` parameters, like the
ledger's reads (`LedgerViews`), and run through the store's `_query`. What stays in each
backend is driver code: connecting, migrations, and the operations that need a
transaction or a batch (rotate_key, touch_keys, write_usage, create_session).
"""

from __future__ import annotations

import time
from typing import Any

from proxy.store.base import DuplicateName, KeyLimits, KeyRecord, SessionRecord, mint_key
from proxy.store.ledger import LedgerViews
from proxy.store.rows import Row, key_from_row, models_json

# The key an id or a name refers to: an id match wins (a key *named* like another key's id
# can never shadow it), then the live key of that name, then the newest revoked one.
KEY_REF = """SELECT id FROM keys WHERE id = :ref OR name = :ref
          ORDER BY id = :ref DESC, revoked_at IS NULL DESC, created_at DESC, id DESC LIMIT 1"""

_INSERT_KEY = """INSERT INTO keys (id, name, prefix, digest, models, rpm, tpm, max_parallel,
                                   budget_usd, budget_period, expires_at, revoked_at, created_at)
    VALUES (:id, :name, :prefix, :digest, :models, :rpm, :tpm, :max_parallel,
            :budget_usd, :budget_period, :expires_at, :revoked_at, :created_at)
    ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING
    RETURNING id"""
_UPDATE_KEY = f"""UPDATE keys SET models = :models, rpm = :rpm, tpm = :tpm, max_parallel = :max_parallel,
                       budget_usd = :budget_usd, budget_period = :budget_period, expires_at = :expires_at
    WHERE id = ({KEY_REF})
    RETURNING *"""
# COALESCE keeps the first revocation time: revoking twice changes nothing.
_REVOKE_KEY = f"UPDATE keys SET revoked_at = COALESCE(revoked_at, :now) WHERE id = ({KEY_REF}) RETURNING *"
_SESSION = "SELECT digest, kind, key_id, binding, created_at, expires_at FROM ui_sessions WHERE digest = :digest"


class SQLStore(LedgerViews):
    """Keys and sessions, one statement each, over the store's `_query` (a write commits
    on its own: neither store runs these inside a transaction)."""

    async def create_key(self, name: str, limits: KeyLimits) -> tuple[KeyRecord, str]:
        r, plaintext = mint_key(name, limits, time.time())
        params = {
            "id": r.id, "name": r.name, "prefix": r.prefix, "digest": r.digest, "models": models_json(r.models),
            "rpm": r.rpm, "tpm": r.tpm, "max_parallel": r.max_parallel, "budget_usd": r.budget_usd,
            "budget_period": r.budget_period, "expires_at": r.expires_at, "revoked_at": r.revoked_at,
            "created_at": r.created_at,
        }
        if not await self._query("create key", _INSERT_KEY, params):
            raise DuplicateName("a key with this name already exists")
        return r, plaintext

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        return await self._key("key lookup", "SELECT * FROM keys WHERE digest = :digest", {"digest": digest})

    async def get_key(self, id_or_name: str) -> KeyRecord | None:
        return await self._key("key lookup", f"SELECT * FROM keys WHERE id = ({KEY_REF})", {"ref": id_or_name})

    async def list_keys(self) -> list[KeyRecord]:
        return [key_from_row(row) for row in await self._query("list keys", "SELECT * FROM keys ORDER BY created_at, id", {})]

    async def update_key(self, id_or_name: str, limits: KeyLimits) -> KeyRecord | None:
        params = {
            "ref": id_or_name, "models": models_json(limits.models), "rpm": limits.rpm, "tpm": limits.tpm,
            "max_parallel": limits.max_parallel, "budget_usd": limits.budget_usd,
            "budget_period": limits.budget_period, "expires_at": limits.expires_at,
        }
        return await self._key("update key", _UPDATE_KEY, params)

    async def revoke_key(self, id_or_name: str) -> KeyRecord | None:
        return await self._key("revoke key", _REVOKE_KEY, {"ref": id_or_name, "now": time.time()})

    async def get_session(self, digest: str) -> SessionRecord | None:
        rows = await self._query("session lookup", _SESSION, {"digest": digest})
        return _session_from_row(rows[0]) if rows else None

    async def delete_session(self, digest: str) -> None:
        await self._query("delete session", "DELETE FROM ui_sessions WHERE digest = :digest", {"digest": digest})

    async def _key(self, what: str, sql: str, params: dict[str, Any]) -> KeyRecord | None:
        rows = await self._query(what, sql, params)
        return key_from_row(rows[0]) if rows else None


def _session_from_row(row: Row) -> SessionRecord:
    return SessionRecord(
        digest=row["digest"], kind=row["kind"], key_id=row["key_id"], binding=row["binding"],
        created_at=row["created_at"], expires_at=row["expires_at"],
    )
