"""Keys and the usage ledger. `open_store` picks the backend from the configured URL."""

from __future__ import annotations

from proxy.store.base import Store
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

__all__ = ["PostgresStore", "SQLiteStore", "open_store"]


def open_store(url: str) -> Store:
    """An unopened store for `url`; the caller awaits `open()`.

    sqlite:///data/llm-proxy.db  -> relative path data/llm-proxy.db
    sqlite:////var/lib/x.db      -> absolute path /var/lib/x.db
    sqlite:///:memory:           -> in-memory (tests)
    postgresql://… or postgres://… -> the DSN as given, passed to asyncpg

    Errors never quote the URL: it may carry a database password.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("store URL must start with sqlite://, postgresql:// or postgres://")
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError("sqlite store URL must be sqlite:///relative/path or sqlite:////absolute/path")
        return SQLiteStore(rest[1:])
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url)
    raise ValueError("unsupported store URL scheme (use sqlite, postgresql or postgres)")
