"""Dashboard sessions on the wire: the cookie, the CSRF header, the Origin check, and what
the front server tells the control plane about the client.

Requests reach the aiohttp application through the front server's in-process relay
(proxy/front.py), so the application's own view of the peer, scheme and Host is the
relay's. The front server adds what it knows as `x-llm-proxy-*` headers (dropping any a
client sent) together with a per-process random token; those headers are believed only
when the token matches, so they cannot be forged by a client that reaches the
application some other way.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from proxy.errors import InvalidApiKey, PermissionDenied
from proxy.sessions import Session, Sessions

COOKIE = "llm_proxy_session"
CSRF_HEADER = "x-csrf-token"
RELAY_TOKEN = "x-llm-proxy-relay"
RELAY_PEER = "x-llm-proxy-peer"
RELAY_PROTO = "x-llm-proxy-proto"
RELAY_HOST = "x-llm-proxy-host"
RELAY_PREFIX = "x-llm-proxy-"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Client:
    address: str                 # the client's IP (after trusted proxies)
    https: bool                  # the browser's connection was TLS (directly or at a trusted proxy)
    host: str                    # the Host the browser asked for

    @property
    def origin(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.host}"


def client_of(request: web.Request, relay_token: str) -> Client:
    headers = request.headers
    token = headers.get(RELAY_TOKEN)
    if token is not None and hmac.compare_digest(token, relay_token):
        return Client(headers.get(RELAY_PEER, ""), headers.get(RELAY_PROTO) == "https", headers.get(RELAY_HOST, ""))
    return Client(request.remote or "", request.secure, request.host)


class CsrfRefused(PermissionDenied):
    code = "csrf_failed"


def check_origin(request: web.Request, client: Client) -> None:
    """Refuse a browser request made by another site. State-changing methods must carry
    an Origin equal to the dashboard's own; browsers send it on every such fetch."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise CsrfRefused("Cross-site requests are not accepted.")
    origin = request.headers.get("Origin")
    if origin is None:
        if request.method not in _SAFE_METHODS:
            raise CsrfRefused("This request must come from the dashboard's own page (no Origin header).")
        return
    parts = urlsplit(origin)
    if f"{parts.scheme}://{parts.netloc}".lower() != client.origin.lower():
        raise CsrfRefused("Cross-site requests are not accepted.")


def check_csrf(request: web.Request, session: Session) -> None:
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), session.csrf.encode()):
        raise CsrfRefused("Missing or wrong CSRF token: reload the dashboard.")


async def session_of(
    request: web.Request, sessions: Sessions, master_key: str | None, relay_token: str, *, csrf: bool = True
) -> Session:
    """The caller's dashboard session, with its Origin and CSRF token checked (every call
    a session makes, reads included, carries the token; only the page's question "who am
    I, and what is my token" cannot). Raises 401 without a live session."""
    session_id = request.cookies.get(COOKIE)
    session = await sessions.find(session_id, master_key) if session_id else None
    if session is None:
        raise InvalidApiKey("Not signed in, or the session has ended: sign in again.", code="session_required")
    check_origin(request, client_of(request, relay_token))
    if csrf:
        check_csrf(request, session)
    return session


def set_cookie(response: web.StreamResponse, client: Client, session_id: str, max_age_s: int) -> None:
    response.set_cookie(
        COOKIE, session_id, max_age=max_age_s, path="/", httponly=True, samesite="Strict", secure=client.https
    )


def clear_cookie(response: web.StreamResponse, client: Client) -> None:
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=client.https)
