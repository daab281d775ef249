"""Upstream connections: one pooled HTTP/1.1 client per upstream, made at start-up."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.config import UpstreamConfig
from proxy.dialects import Dialect, upstream_dialect
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.http1.client import Http1Client, Http1Response, UpstreamConnectionError

# Request headers a client may send that are meaningful to providers and safe to pass on.
# Everything else (its credentials, hop-by-hop headers, Host, cookies, forwarding
# headers, accept-encoding) is dropped: only operator config decides where a call goes.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "anthropic-version",
        "anthropic-beta",
        "openai-beta",
        "user-agent",
        "x-goog-api-client",
        "idempotency-key",
    }
)


@dataclass(frozen=True)
class UpstreamTarget:
    """An upstream as the forwarder uses it: where to send and what to add."""

    config: UpstreamConfig
    dialect: Dialect
    base_path: str               # the path part of the upstream's base URL ("/v1", "")
    head: bytes                  # fixed request header lines: content type, credential, operator headers
    head_names: frozenset[str]   # their names, lower-cased: a client header of the same name is not passed
    client: Http1Client
    secret: str | None           # the credential, only to scrub it from upstream bodies
    forwarded: tuple[str, ...]   # the client headers passed on: FORWARDED_REQUEST_HEADERS not in head_names

    @property
    def name(self) -> str:
        return self.config.name


def encode_head(headers: Mapping[str, str]) -> bytes:
    return b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items())


class UpstreamPool:
    def __init__(self) -> None:
        self._targets: dict[str, UpstreamTarget] = {}

    def add(self, config: UpstreamConfig, base_url: str, api_key: str | None) -> UpstreamTarget:
        client = Http1Client(
            base_url,
            max_connections=config.max_parallel,
            connect_timeout_s=config.timeouts.connect_s,
            keepalive_s=30,
        )
        dialect = upstream_dialect(config.protocol, config.kind, config.api_version)
        # Streams pass through byte for byte: never let an upstream compress them.
        fixed = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        # Later entries win, whatever their case: the credential over operator headers over ours.
        merged = {
            name.lower(): (name, value)
            for part in (fixed, config.headers, dialect.upstream_headers(api_key))
            for name, value in part.items()
        }
        head = encode_head(dict(merged.values()))
        path = urlsplit(base_url).path.rstrip("/")
        forwarded = tuple(sorted(FORWARDED_REQUEST_HEADERS - merged.keys()))
        target = UpstreamTarget(config, dialect, path, head, frozenset(merged), client, api_key, forwarded)
        self._targets[config.name] = target
        return target

    def get(self, name: str) -> UpstreamTarget:
        return self._targets[name]

    def adopt(self, target: UpstreamTarget) -> None:
        """Take over another pool's target (a reload keeps unchanged upstreams' connections)."""
        self._targets[target.name] = target

    def targets(self) -> list[UpstreamTarget]:
        return list(self._targets.values())

    async def close(self) -> None:
        await asyncio.gather(*(t.client.close() for t in self._targets.values()))
        self._targets.clear()


def request_head(client_headers: Mapping[str, str], target: UpstreamTarget, request_id: str) -> bytes:
    """The header lines of the upstream request: a few client headers (lower-case names,
    as the front server parses them), then ours; one line per name, ours win. The client's
    values were latin-1 decoded by the parser (which refuses CR and LF in them), and a
    request id is either ours or matched a strict pattern, so the lines encode as they are."""
    # Looked up by the few names that pass, not by scanning what the client sent: SDKs
    # send ~17 header lines per request.
    lines = []
    for name in target.forwarded:
        value = client_headers.get(name)
        if value is not None:
            lines.append(f"{name}: {value}\r\n")
    if "x-request-id" not in target.head_names:
        lines.append(f"X-Request-Id: {request_id}\r\n")
    return "".join(lines).encode("latin-1") + target.head


async def open_response(target: UpstreamTarget, path: str, body: bytes, head: bytes) -> Http1Response:
    """Send the request; return once response headers are in (within first_byte_s)."""
    try:
        return await target.client.request("POST", path, head, body, target.config.timeouts.first_byte_s)
    except TimeoutError:
        raise UpstreamTimeout("The upstream did not answer in time.") from None
    except (UpstreamConnectionError, OSError) as exc:
        # No upstream URL or exception text in the message: it can name internal hosts.
        raise UpstreamError(f"The upstream is unreachable ({type(exc).__name__}).") from None


# A run of key-like characters, mask characters included ("sk-proj-****abcd", "sk-ab...wxyz").
_TOKEN = re.compile("[A-Za-z0-9_\\-*.\u2022]{8,}".encode())
_REDACTED = b"[redacted]"
_BULLET = "\u2022".encode()
_MASK_BYTES = b"*." + _BULLET


def scrub_secret(data: bytes, secret: str | None) -> bytes:
    """`data` (an upstream's error body) without the upstream credential: the whole key,
    a prefix of it of 8 characters or more, or a masked form that keeps its first or last
    four characters around a run of `*` / `.` / `•` (what providers echo: "Incorrect API
    key provided: sk-proj-****...abcd")."""
    if not secret or len(secret) < 8:
        return data
    raw = secret.encode("utf-8", "replace")
    head, tail = raw[:4], raw[-4:]

    def redact(m: re.Match[bytes]) -> bytes:
        token = m.group(0)
        core = token.strip(_MASK_BYTES)
        if raw in token or (len(core) >= 8 and raw.startswith(core)):
            return _REDACTED
        masked = sum(token.count(c) for c in (b"*", b".", _BULLET)) >= 3
        if masked and (core.startswith(head) or core.endswith(tail)):
            return _REDACTED
        return token

    return _TOKEN.sub(redact, data)
