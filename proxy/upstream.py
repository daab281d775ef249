"""Upstream connections: one pooled ClientSession per upstream, made at start-up."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Mapping

import aiohttp
from multidict import CIMultiDict

from proxy.config import UpstreamConfig
from proxy.dialects import BY_PROTOCOL, Dialect
from proxy.errors import UpstreamError, UpstreamTimeout

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
    base_url: str
    headers: Mapping[str, str]   # credential + operator headers, in the provider's style
    session: aiohttp.ClientSession
    secret: str | None           # the credential, only to scrub it from upstream bodies

    @property
    def name(self) -> str:
        return self.config.name


class UpstreamPool:
    def __init__(self) -> None:
        self._targets: dict[str, UpstreamTarget] = {}

    def add(self, config: UpstreamConfig, base_url: str, api_key: str | None) -> UpstreamTarget:
        # aiohttp's default pool silently caps at 100 connections; set it from config.
        connector = aiohttp.TCPConnector(
            limit=config.max_parallel,
            limit_per_host=0,
            ttl_dns_cache=300,
            enable_cleanup_closed=False,
            keepalive_timeout=30,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            # No total timeout: streams may run for many minutes. First byte and idle
            # gaps are enforced by the forwarder; connect here.
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=config.timeouts.connect_s),
            auto_decompress=False,
            trust_env=False,          # HTTP(S)_PROXY must not reroute provider traffic
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            raise_for_status=False,
        )
        dialect = BY_PROTOCOL[config.protocol]
        headers = {**dict(config.headers), **dialect.upstream_headers(api_key)}
        target = UpstreamTarget(config, dialect, base_url, headers, session, api_key)
        self._targets[config.name] = target
        return target

    def get(self, name: str) -> UpstreamTarget:
        return self._targets[name]

    async def close(self) -> None:
        await asyncio.gather(*(t.session.close() for t in self._targets.values()))
        self._targets.clear()


def request_headers(client_headers: Mapping[str, str], target: UpstreamTarget, request_id: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client_headers.items():
        if name.lower() in FORWARDED_REQUEST_HEADERS:
            out.add(name, value)
    out["Content-Type"] = "application/json"
    out["Accept-Encoding"] = "identity"   # streams pass through byte for byte, never gzip
    out["X-Request-Id"] = request_id
    out.update(target.headers)
    return out


async def open_response(
    target: UpstreamTarget, url: str, body: bytes, headers: CIMultiDict[str]
) -> aiohttp.ClientResponse:
    """Send the request; return once response headers are in (within first_byte_s)."""
    try:
        async with asyncio.timeout(target.config.timeouts.first_byte_s):
            return await target.session.post(url, data=body, headers=headers, allow_redirects=False)
    except TimeoutError:
        raise UpstreamTimeout("The upstream did not answer in time.") from None
    except (aiohttp.ClientError, OSError) as exc:
        # No upstream URL or exception text in the message: it can name internal hosts.
        raise UpstreamError(f"The upstream is unreachable ({type(exc).__name__}).") from None
