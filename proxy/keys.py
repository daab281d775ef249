"""Virtual key material: generation, digest, shape check. No I/O."""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "sk-"
# "sk-" + 43 url-safe chars (32 random bytes). Anything not of this shape is rejected
# before any store lookup, so junk and SQL-shaped keys never cost a query.
_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9_-]{43}", re.ASCII)
DISPLAY_CHARS = 8


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest_key(key: str) -> str:
    """SHA-256 hex digest: keys carry 256 bits of entropy, so a plain hash is enough."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def well_formed(key: str) -> bool:
    # fullmatch, not match: `$` would also accept a trailing newline.
    return _KEY_SHAPE.fullmatch(key) is not None


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + DISPLAY_CHARS]
