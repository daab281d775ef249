"""The store interface: virtual keys and the usage ledger (DESIGN §4–5).

A store knows records and keys and nothing of HTTP. Implementations: `sqlite.py`
(default, runs its blocking calls in a thread) and `postgres.py` (asyncpg pool).
Every query is parameterised; nothing is ever built from request text.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from proxy.keys import digest_key, display_prefix, generate_key

Outcome = Literal["ok", "client_abort", "upstream_error", "timeout", "shutdown"]
GroupBy = Literal["key", "model", "day"]
# Groupings of the usage ledger for operators: `GroupBy` plus key x model and upstream route.
Grouping = Literal["key", "model", "day", "key_model", "upstream", "served"]
Bucket = Literal["hour", "day"]
# The outcomes that count as errors in error rates: the upstream failed or timed out (its
# own 4xx/5xx included). A client that went away or a shutdown is not the upstream's error.
ERROR_OUTCOMES: tuple[str, ...] = ("upstream_error", "timeout")
# An `outcome` filter value that matches every error outcome at once.
ANY_ERROR = "error"


class StoreError(Exception):
    """The store could not answer (unreachable, locked, broken). Never carries secrets."""


class DuplicateName(StoreError):
    """A live (not revoked) key with that name already exists."""


class KeyRevoked(StoreError):
    """The key is revoked: it cannot be rotated (revocation is final)."""


@dataclass(frozen=True)
class KeyRecord:
    id: str                      # opaque, e.g. "key_" + 16 hex chars
    name: str                    # unique
    prefix: str                  # display prefix, e.g. "sk-AbCd1234" (never enough to use)
    digest: str                  # hex SHA-256 of the full key; the key itself is never stored
    models: tuple[str, ...]      # allowlist; empty = every model
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_usd: float | None
    budget_period: str | None    # None (lifetime) | "day" | "month"
    expires_at: float | None     # unix seconds
    revoked_at: float | None
    created_at: float
    last_used_at: float | None = None   # updated in batches (proxy/middleware/last_used.py)

    def is_active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class KeyLimits:
    """The mutable limit fields of a key (admin update / keys create)."""

    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_usd: float | None = None
    budget_period: str | None = None
    expires_at: float | None = None


class UsageRecord(NamedTuple):
    """One upstream attempt, as billed. A NamedTuple: immutable, built once per request
    at a fifth of a frozen dataclass's cost (24 fields, each set through
    `object.__setattr__` there), and already the row the SQL stores insert (the fields
    are in the order of `rows.USAGE_COLUMNS`)."""

    id: str                      # the request id; unique, writes are idempotent on it
    ts: float                    # unix seconds, when the request started
    key_id: str | None
    key_name: str | None
    endpoint: str                # e.g. "chat.completions", "messages", "generateContent"
    model: str                   # what the client asked for
    upstream: str
    upstream_model: str
    stream: bool
    status: int                  # HTTP status the client got (200 also for cut streams)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0       # cache reads (OpenAI cached_tokens, Anthropic cache_read)
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    estimated: bool = False
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    error: str | None = None     # stable error code, never upstream text
    outcome: Outcome = "ok"
    # The caller's API family and the upstream's protocol: they differ on translated
    # calls (DESIGN §7). None on records written before they were kept.
    client_dialect: str | None = None
    upstream_protocol: str | None = None
    # Which upstream attempt of its request this is: 0 for the first, n for the record
    # whose id is `<request id>.<n>` (failover, retries). None on records written before
    # it was kept (their id suffix still says).
    attempt: int | None = None


@dataclass(frozen=True)
class SessionRecord:
    """A dashboard session (proxy/sessions.py). The session id lives only in the browser's
    cookie; the store keeps its SHA-256, so a leaked database signs nobody in."""

    digest: str                  # hex SHA-256 of the session id
    kind: str                    # "master" (the whole console) | "key" (one key's own usage)
    key_id: str | None           # the signed-in key, for "key" sessions
    binding: str                 # master sessions: a MAC of the id under the master key then in force
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class UsageFilter:
    """Which usage records a listing or an aggregate covers: `since <= ts < until`."""

    since: float = 0.0
    until: float | None = None
    key_id: str | None = None
    model: str | None = None
    outcome: str | None = None     # an Outcome, or ANY_ERROR for every outcome in ERROR_OUTCOMES
    # How calls were served: the client's dialect, the upstream's protocol. The roll-ups
    # do not keep them: aggregates that filter on them read the raw ledger (ledger.py).
    client_dialect: str | None = None
    upstream_protocol: str | None = None

    @property
    def by_served(self) -> bool:
        return self.client_dialect is not None or self.upstream_protocol is not None


# A position in a newest-first listing: the (ts, id) of the last record already shown.
Cursor = tuple[float, str]


class Store(Protocol):
    async def open(self) -> None: ...          # connect and migrate the schema
    async def close(self) -> None: ...
    async def ping(self) -> None: ...          # raises StoreError when unreachable

    # keys
    async def create_key(self, name: str, limits: KeyLimits) -> tuple[KeyRecord, str]: ...
    async def key_by_digest(self, digest: str) -> KeyRecord | None: ...
    async def get_key(self, id_or_name: str) -> KeyRecord | None: ...
    async def list_keys(self) -> list[KeyRecord]: ...
    async def update_key(self, id_or_name: str, limits: KeyLimits) -> KeyRecord | None: ...
    async def revoke_key(self, id_or_name: str) -> KeyRecord | None: ...
    async def rotate_key(self, id_or_name: str) -> tuple[KeyRecord, str] | None: ...   # KeyRevoked
    async def touch_keys(self, last_used: Mapping[str, float]) -> None: ...   # key id -> unix seconds

    # usage
    async def write_usage(self, records: Sequence[UsageRecord]) -> None: ...
    async def list_usage(self, since: float, key_id: str | None = None, limit: int = 10_000) -> list[UsageRecord]: ...
    async def summarize_usage(self, since: float, by: GroupBy, key_id: str | None = None) -> list[dict[str, object]]: ...
    async def spend_usd(self, key_id: str, since: float) -> float: ...

    # dashboard sessions
    async def create_session(self, record: SessionRecord) -> None: ...   # also drops expired ones
    async def get_session(self, digest: str) -> SessionRecord | None: ...
    async def delete_session(self, digest: str) -> None: ...

    # usage for operators (newest first, paginated; aggregates over hourly roll-ups)
    async def page_usage(self, f: UsageFilter, limit: int, after: Cursor | None = None) -> list[UsageRecord]: ...
    async def usage_series(self, f: UsageFilter, bucket: Bucket) -> list[dict[str, Any]]: ...
    async def usage_groups(self, f: UsageFilter, by: Grouping) -> list[dict[str, Any]]: ...
    async def usage_sample(self, f: UsageFilter, n: int) -> list[tuple[str, str, float | None, float]]: ...


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def new_secret() -> tuple[str, str, str]:
    """A fresh key: (plaintext, display prefix, digest). Only the last two are stored."""
    key = generate_key()
    return key, display_prefix(key), digest_key(key)


def mint_key(name: str, limits: KeyLimits, now: float) -> tuple[KeyRecord, str]:
    """A new key record and its plaintext, for a store's `create_key`.

    The record holds only the digest and a display prefix; the plaintext goes back to
    the caller once and is never persisted, so a leaked database grants no access.
    """
    key, prefix, digest = new_secret()
    record = KeyRecord(
        id=new_key_id(),
        name=name,
        prefix=prefix,
        digest=digest,
        models=tuple(limits.models),
        rpm=limits.rpm,
        tpm=limits.tpm,
        max_parallel=limits.max_parallel,
        budget_usd=limits.budget_usd,
        budget_period=limits.budget_period,
        expires_at=limits.expires_at,
        revoked_at=None,
        created_at=now,
    )
    return record, key
