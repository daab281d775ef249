"""The header mapping shared by the HTTP/1.1 server and client."""

from __future__ import annotations


class Headers(dict[str, str]):
    """Header names lower-cased (latin-1 decoded), repeated fields joined with ", ".

    A plain dict underneath, so lookups run at C speed: ask for names in lower case.
    Built once per message by the parsers' `on_header` callbacks (which merge repeated
    fields themselves: a call per header line is the hot path); never mutated by readers.
    """

    __slots__ = ()


# Header names as they arrive -> their lower-cased str key. Clients and upstreams send
# the same few dozen names on every message (an SDK request carries ~17 header lines, an
# OpenAI response ~20): a dict hit replaces two method calls per line. Bounded: once
# full, other names are converted on every use and never stored.
HEADER_KEYS: dict[bytes, str] = {}
_HEADER_KEYS_MAX = 512


def header_key(raw: bytes) -> str:
    """`raw` lower-cased and latin-1 decoded (bytes.lower() changes ASCII letters only,
    which is all a header name may hold). Callers try HEADER_KEYS.get(raw) first."""
    key = raw.lower().decode("latin-1")
    if len(HEADER_KEYS) < _HEADER_KEYS_MAX:
        HEADER_KEYS[raw] = key
    return key
