"""Native TLS for the gateway's port (`server.tls`: a certificate chain and its key).

Clients that call from elsewhere need HTTPS (Cursor's requests come from Cursor's
servers, so its base URL must be public and https://); a terminator in front (Caddy,
nginx; deploy/container has a Caddy profile) is the other way.

The listening socket keeps one `ssl.SSLContext` for its life. `ServerTls.reload` loads
the files again into that same context: handshakes after it present the new
certificate, connections already open keep theirs. The files are first loaded into a
scratch context, so a bad pair (unreadable, not PEM, key not matching) raises and
leaves the certificate being served as it was: a half-replaced context (new chain, old
key) would fail every handshake.
"""

from __future__ import annotations

import ssl

from proxy.config import TlsConfig


def _context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # HTTP/1.1 only: the gateway's server speaks nothing else (no h2 in ALPN).
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class ServerTls:
    def __init__(self, config: TlsConfig) -> None:
        self.context = _context()
        self.config = config
        self.reload(config)

    def reload(self, config: TlsConfig | None = None) -> None:
        """Read the certificate and key again (from `config`'s paths when given, which
        then become the current ones). Raises OSError / ssl.SSLError on a bad pair, and
        then changes nothing."""
        config = config or self.config
        _context().load_cert_chain(config.cert_file, config.key_file)  # check first
        self.context.load_cert_chain(config.cert_file, config.key_file)
        self.config = config


__all__ = ["ServerTls"]
