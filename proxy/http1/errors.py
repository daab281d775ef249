"""What the upstream client raises: one tree, every failure of the connection under
UpstreamConnectionError (the gateway maps it to 502 in one place)."""

from __future__ import annotations

__all__ = ["BodyTooLarge", "ConnectFailed", "ConnectionCut", "ProtocolViolation", "UpstreamConnectionError"]


class UpstreamConnectionError(Exception):
    """Base: the upstream connection failed."""


class ConnectFailed(UpstreamConnectionError):
    """Could not connect (refused, DNS, TLS handshake, connect timeout)."""


class ConnectionCut(UpstreamConnectionError):
    """The connection closed or reset before the response (or its body) was complete."""


class ProtocolViolation(UpstreamConnectionError):
    """The upstream sent something that is not valid HTTP/1.1 (httptools error)."""


class BodyTooLarge(UpstreamConnectionError):
    """read_all(): the body is larger than the caller's cap."""
