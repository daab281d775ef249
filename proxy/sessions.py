"""Dashboard sessions: who signed in to /ui/, for how long, and their CSRF token. No HTTP.

A session id is 256 random bits, handed to the browser once in an HttpOnly cookie. The
store keeps only its SHA-256 (a leaked database signs nobody in) and the session's kind:
- "master": the whole console. Bound to the master key in force when it was made (a MAC
  of the id under that key), so changing the master key ends every such session.
- "key": one gateway key's own usage, spend, budget and limits. It ends when the key is
  revoked or expires.
Sessions live in the store, not in process memory, so that every worker of
`serve --workers N` (and every node sharing PostgreSQL) knows them, and sign-out ends a
session everywhere at once.

The CSRF token is a MAC of the session id: the page learns it from the server, keeps it
in memory and sends it in a header on every call; a cross-site page cannot read the
cookie and so cannot compute it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from proxy.keys import digest_key, well_formed
from proxy.store.base import KeyRecord, SessionRecord, Store

MASTER = "master"
KEY = "key"
_ID_BYTES = 32
_CSRF_CONTEXT = b"llm-proxy dashboard csrf v1"


@dataclass(frozen=True)
class Session:
    """A live session, as the request handlers see it."""

    kind: str                    # MASTER | KEY
    key: KeyRecord | None        # the signed-in key (KEY sessions)
    csrf: str
    expires_at: float


def csrf_token(session_id: str) -> str:
    return hmac.new(session_id.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _binding(session_id: str, master_key: str) -> str:
    return hmac.new(master_key.encode(), session_id.encode(), hashlib.sha256).hexdigest()


def is_master_key(presented: str, master_key: str | None) -> bool:
    """Constant-time comparison; False when no master key is configured."""
    if not master_key:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), master_key.encode())


class Sessions:
    def __init__(self, store: Store, ttl_s: float) -> None:
        self._store = store
        self._ttl = ttl_s

    async def sign_in(self, presented: str, master_key: str | None) -> tuple[str, Session] | None:
        """A new session for the master key or an active gateway key; None for anything else."""
        if is_master_key(presented, master_key):
            assert master_key is not None
            return await self._start(MASTER, None, master_key)
        if not well_formed(presented):
            return None
        key = await self._store.key_by_digest(digest_key(presented))
        if key is None or not key.is_active(time.time()):
            return None
        return await self._start(KEY, key, "")

    async def _start(self, kind: str, key: KeyRecord | None, master_key: str) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(_ID_BYTES)
        now = time.time()
        binding = _binding(session_id, master_key) if kind == MASTER else ""
        record = SessionRecord(_digest(session_id), kind, key.id if key else None, binding, now, now + self._ttl)
        await self._store.create_session(record)
        return session_id, Session(kind, key, csrf_token(session_id), record.expires_at)

    async def find(self, session_id: str, master_key: str | None) -> Session | None:
        """The live session for a cookie's id, or None (unknown, expired, or its key or
        master key no longer valid)."""
        if not session_id or len(session_id) > 128:
            return None
        record = await self._store.get_session(_digest(session_id))
        now = time.time()
        if record is None or record.expires_at <= now:
            return None
        if record.kind == MASTER:
            if not master_key or not hmac.compare_digest(record.binding, _binding(session_id, master_key)):
                return None
            return Session(MASTER, None, csrf_token(session_id), record.expires_at)
        if record.kind == KEY and record.key_id:
            key = await self._store.get_key(record.key_id)
            if key is not None and key.id == record.key_id and key.is_active(now):
                return Session(KEY, key, csrf_token(session_id), record.expires_at)
        return None

    async def sign_out(self, session_id: str) -> None:
        await self._store.delete_session(_digest(session_id))
