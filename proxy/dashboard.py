"""The operator's dashboard at /ui/: static pages, sign-in, sign-out, and the key holder's
own view. The pages call the admin API (/admin/...) with the session cookie and CSRF
header; `proxy.admin.master_only` is the one gate for those calls.

Assets are hand-written HTML, CSS and ES modules shipped in the package (proxy/ui/),
read once at start-up and served from memory with an ETag: no build step, no CDN, no
network. Every /ui/ response forbids framing and any script, style or connection that
is not the gateway's own (Content-Security-Policy).

Sign-in takes the master key (the whole console) or a gateway key (that key's own
usage, spend, budget and limits, what GET /v1/usage returns). The key travels once, in
the sign-in request's body; the browser keeps only the HttpOnly session cookie and, in
page memory, the CSRF token. Failed sign-ins are braked per client address here, on
top of the front server's brake on every 401.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import InvalidApiKey, InvalidRequest, PermissionDenied
from proxy.middleware.auth_failures import AuthFailures
from proxy.middleware.session import COOKIE, check_origin, clear_cookie, client_of, session_of, set_cookie
from proxy.sessions import KEY, Session
from proxy.views import own_usage_doc, parse_since

log = logging.getLogger("llm_proxy.dashboard")

UI_DIR = Path(__file__).with_name("ui")
# Sign-in failures per client address and minute before that address must wait.
SIGN_IN_FAILURES_PER_MIN = 5
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml", ".png": "image/png"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Asset:
    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def load_assets(root: Path = UI_DIR) -> dict[str, Asset]:
    """Every file under proxy/ui/, by its path relative to it ("index.html", "js/app.js")."""
    assets = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            assets[path.relative_to(root).as_posix()] = Asset(path.read_bytes(), ctype)
    return assets


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json", headers=SECURITY_HEADERS)


def _session_doc(session: Session) -> dict[str, Any]:
    key = session.key
    return {
        "signed_in": True,
        "kind": session.kind,
        "csrf": session.csrf,
        "expires_at": session.expires_at,
        "key": None if key is None else {"id": key.id, "name": key.name, "prefix": key.prefix},
    }


def add_routes(app: web.Application, state_key: web.AppKey[Any]) -> None:
    assets = load_assets()
    brake = AuthFailures(SIGN_IN_FAILURES_PER_MIN)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("/ui/")

    async def asset(request: web.Request) -> web.StreamResponse:
        found = assets.get(request.match_info.get("path") or "index.html")
        if found is None:
            return web.Response(status=404, text="Not found.", headers=SECURITY_HEADERS)
        headers = {**SECURITY_HEADERS, "ETag": found.etag}
        if request.headers.get("If-None-Match") == found.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=found.body, content_type=found.content_type, headers=headers)

    async def current(request: web.Request) -> web.Response:
        """Who is signed in, and the CSRF token the page sends on every call."""
        state = request.app[state_key]
        check_origin(request, client_of(request, state.relay_token))
        try:
            session = await session_of(request, state.sessions, state.config.auth.master_key, state.relay_token, csrf=False)
        except InvalidApiKey:
            # Not an authentication failure (no key was presented): the page shows sign-in.
            return _json({"signed_in": False})
        return _json(_session_doc(session))

    async def sign_in(request: web.Request) -> web.Response:
        state = request.app[state_key]
        client = client_of(request, state.relay_token)
        check_origin(request, client)
        now = time.monotonic()
        brake.check(client.address, now)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
        presented = body.get("key") if isinstance(body, dict) else None
        if not isinstance(presented, str) or not 0 < len(presented) <= 1024:
            raise InvalidRequest("Give the master key or a gateway key as 'key'.", param="key")
        started = await state.sessions.sign_in(presented.strip(), state.config.auth.master_key)
        if started is None:
            brake.failed(client.address, now)
            # For the operator's audit (and fail2ban): who tried, never what was tried.
            log.warning("dashboard sign-in refused from %s", client.address)
            raise InvalidApiKey("That key is not the master key or an active gateway key.")
        session_id, session = started
        who = "the master key" if session.key is None else f"key {session.key.name!r}"
        log.info("dashboard sign-in with %s from %s", who, client.address)
        response = _json(_session_doc(session))
        set_cookie(response, client, session_id, int(session.expires_at - time.time()))
        return response

    async def sign_out(request: web.Request) -> web.Response:
        state = request.app[state_key]
        await session_of(request, state.sessions, state.config.auth.master_key, state.relay_token)
        await state.sessions.sign_out(request.cookies.get(COOKIE, ""))
        response = _json({"signed_in": False})
        clear_cookie(response, client_of(request, state.relay_token))
        return response

    async def own_usage(request: web.Request) -> web.Response:
        state = request.app[state_key]
        session = await session_of(request, state.sessions, state.config.auth.master_key, state.relay_token)
        if session.kind != KEY or session.key is None:
            raise PermissionDenied("This page is for a gateway key's own usage; the master session has none.")
        try:
            since = parse_since(request.query.get("since", "30d"))
        except ValueError:
            raise InvalidRequest("'since' must look like 24h, 7d or an ISO date.", param="since") from None
        return _json(await own_usage_doc(state.store, session.key, since))

    r = app.router
    r.add_get("/ui", redirect)
    r.add_get("/ui/", asset)
    r.add_get("/ui/api/session", current)
    r.add_post("/ui/api/session", sign_in)
    r.add_post("/ui/api/signout", sign_out)
    r.add_get("/ui/api/self", own_usage)
    r.add_get("/ui/{path:(?!api/).+}", asset)
