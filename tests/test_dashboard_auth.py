"""Dashboard sign-in, sessions and CSRF at the HTTP level (the browser tests are in
test_dashboard_browser.py): cookie attributes, the admin API's one gate accepting a
master session with its token and refusing everything else, key-holder sessions kept
to their own key, sign-out, the sign-in brake, and relay headers a client cannot forge.
"""

from __future__ import annotations

import dataclasses
import ssl
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from _gateway import MASTER_KEY
from _tls import make_cert
from proxy.config import ServerConfig, TlsConfig

from proxy.sessions import Sessions
from proxy.store.sqlite import SQLiteStore


BASE_SERVER = ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=2)


async def _sign_in(s: aiohttp.ClientSession, url: str, key: str, **headers: str) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    async with s.post(url + "/ui/api/session", json={"key": key}, headers={"Origin": url, **headers}) as r:
        return r, await r.json()


def _cookie(r: aiohttp.ClientResponse) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    jar.load(r.headers["Set-Cookie"])
    return jar


def _session_headers(url: str, sid: str, csrf: str | None) -> dict[str, str]:
    headers = {"Cookie": f"llm_proxy_session={sid}", "Origin": url}
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    return headers


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


async def test_master_session_cookie_and_admin_gate(gateway, http):
    gw = await gateway()
    r, doc = await _sign_in(http, gw.url, MASTER_KEY)
    assert r.status == 200 and doc["kind"] == "master" and doc["csrf"]
    morsel = _cookie(r)["llm_proxy_session"]
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain HTTP, no trusted proxy
    assert 11 * 3600 < int(morsel["max-age"]) <= 12 * 3600
    sid = morsel.value
    assert MASTER_KEY not in r.headers["Set-Cookie"] and MASTER_KEY not in str(doc)
    ok = _session_headers(gw.url, sid, doc["csrf"])

    async with http.get(gw.url + "/admin/keys", headers=ok) as r:
        assert r.status == 200
    async with http.post(gw.url + "/admin/keys", json={"name": "from-ui"}, headers=ok) as r:
        assert r.status == 201
    # Every way of leaving out or faking the CSRF defences is refused, reads included.
    refused = [
        _session_headers(gw.url, sid, None),
        _session_headers(gw.url, sid, "0" * 64),
        {**ok, "Origin": "http://evil.example"},
        {**ok, "Sec-Fetch-Site": "cross-site"},
        {k: v for k, v in ok.items() if k != "Origin"},  # a POST must say where it comes from
    ]
    for headers in refused:
        async with http.post(gw.url + "/admin/keys", json={"name": "csrf"}, headers=headers) as r:
            assert r.status == 403, headers
            assert (await r.json())["error"]["code"] == "csrf_failed"
    for headers in refused[:4]:
        async with http.get(gw.url + "/admin/keys", headers=headers) as r:
            assert r.status == 403
    assert await gw.state.store.get_key("csrf") is None
    # A made-up session id is no session.
    async with http.get(gw.url + "/admin/keys", headers=_session_headers(gw.url, "x" * 43, doc["csrf"])) as r:
        assert r.status == 401
    # The Bearer master key still works, without cookie or token (scripts, the CLI).
    async with http.get(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {MASTER_KEY}"}) as r:
        assert r.status == 200

    # Sign-out ends the session everywhere; the old cookie is worthless.
    async with http.post(gw.url + "/ui/api/signout", headers=ok) as r:
        assert r.status == 200
        assert _cookie(r)["llm_proxy_session"]["max-age"] == "0"
    async with http.get(gw.url + "/admin/keys", headers=ok) as r:
        assert r.status == 401
    async with http.get(gw.url + "/ui/api/session", headers=ok) as r:
        assert (await r.json()) == {"signed_in": False}


async def test_config_view_masks_secrets(gateway, http):
    gw = await gateway()
    async with http.get(gw.url + "/admin/config", headers={"Authorization": f"Bearer {MASTER_KEY}"}) as r:
        assert r.status == 200
        text = await r.text()
    doc = await r.json()
    assert MASTER_KEY[:-4] not in text and "sk-upstream-CANARY" not in text
    assert doc["auth"]["master_key"].startswith("****")
    assert {m["name"] for m in doc["models"]} >= {"mock-gpt", "up-gpt"}


async def test_key_holder_session_sees_only_its_own_key(gateway, http):
    gw = await gateway()
    other = await gw.create_key("someone-else", budget_usd=3.0, budget_period="day")
    mine = await gw.create_key("mine", budget_usd=5.0, budget_period="month", rpm=60)
    r, doc = await _sign_in(http, gw.url, mine)
    assert r.status == 200 and doc["kind"] == "key" and doc["key"]["name"] == "mine"
    sid = _cookie(r)["llm_proxy_session"].value
    headers = _session_headers(gw.url, sid, doc["csrf"])

    async with http.get(gw.url + "/ui/api/self?since=7d", headers=headers) as r:
        assert r.status == 200
        own = await r.json()
    assert own["key"]["name"] == "mine" and own["budget"]["budget_usd"] == 5.0 and own["limits"]["rpm"] == 60
    assert "someone-else" not in str(own) and other not in str(own)

    # Every admin route refuses the session, token and origin notwithstanding.
    routes = [(rt.method, rt.resource.canonical) for rt in gw.app.router.routes() if rt.resource is not None]
    admin = [(m, c.replace("{key}", "someone-else")) for m, c in routes if c.startswith("/admin/") and m not in ("OPTIONS", "HEAD")]
    assert len(admin) >= 8
    for method, path in admin:
        async with http.request(method, gw.url + path, json={"name": "x"}, headers=headers) as r:
            assert r.status == 403, (method, path)
            assert (await r.json())["error"]["code"] == "admin_only"
    assert (await gw.state.store.get_key("someone-else")).revoked_at is None

    # Revoking the key ends its session.
    await gw.state.store.revoke_key("mine")
    async with http.get(gw.url + "/ui/api/self", headers=headers) as r:
        assert r.status == 401
    # A revoked key cannot sign in either.
    r, _ = await _sign_in(http, gw.url, mine)
    assert r.status == 401


async def test_master_session_has_no_self_page_and_key_sessions_need_csrf(gateway, http):
    gw = await gateway()
    r, doc = await _sign_in(http, gw.url, MASTER_KEY)
    headers = _session_headers(gw.url, _cookie(r)["llm_proxy_session"].value, doc["csrf"])
    async with http.get(gw.url + "/ui/api/self", headers=headers) as r:
        assert r.status == 403
    r, doc = await _sign_in(http, gw.url, gw.key)
    sid = _cookie(r)["llm_proxy_session"].value
    async with http.get(gw.url + "/ui/api/self", headers=_session_headers(gw.url, sid, None)) as r:
        assert r.status == 403


async def test_failed_sign_ins_are_braked(gateway, http, caplog):
    gw = await gateway()
    tried = "sk-" + "x" * 43
    for _ in range(5):
        r, doc = await _sign_in(http, gw.url, tried)
        assert r.status == 401 and "Set-Cookie" not in r.headers
    refused = [rec for rec in caplog.records if rec.name == "llm_proxy.dashboard"]
    assert len(refused) == 5 and "127.0.0.1" in refused[0].getMessage()
    assert tried not in caplog.text
    r, doc = await _sign_in(http, gw.url, MASTER_KEY)  # even the right key waits now
    assert r.status == 429 and int(r.headers["Retry-After"]) > 0
    assert doc["error"]["code"] == "too_many_auth_failures"


async def test_sign_in_refuses_other_origins(gateway, http):
    gw = await gateway()
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site", "Origin": gw.url}):
        async with http.post(gw.url + "/ui/api/session", json={"key": MASTER_KEY}, headers=headers) as r:
            assert r.status == 403 and "Set-Cookie" not in r.headers


async def test_secure_cookie_only_behind_a_trusted_tls_proxy(gateway, http):
    gw = await gateway()
    # A client cannot claim TLS, nor forge the front server's own relay headers.
    forged = {"X-Forwarded-Proto": "https", "X-LLM-Proxy-Proto": "https", "X-LLM-Proxy-Relay": "0" * 32}
    r, _ = await _sign_in(http, gw.url, MASTER_KEY, **forged)
    assert r.status == 200 and not _cookie(r)["llm_proxy_session"]["secure"]

    cfg = gw.state.config
    trusted = await gateway(
        server=dataclasses.replace(cfg.server, trusted_proxies=("127.0.0.1",)),
        storage=dataclasses.replace(cfg.storage, url=cfg.storage.url.replace("gw.db", "gw2.db"), spool_path=cfg.storage.spool_path + "2"),
    )
    public = "https://llm.example.com"
    async with http.post(
        trusted.url + "/ui/api/session", json={"key": MASTER_KEY},
        headers={"Origin": public, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "llm.example.com"},
    ) as r:
        assert r.status == 200, await r.text()
        assert _cookie(r)["llm_proxy_session"]["secure"]
    # Behind that proxy, the page's origin is the public one; the gateway's own is foreign.
    async with http.post(trusted.url + "/ui/api/session", json={"key": MASTER_KEY},
                         headers={"Origin": trusted.url, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "llm.example.com"}) as r:
        assert r.status == 403


async def test_secure_cookie_on_the_gateways_own_tls_port(gateway, tmp_path):
    cert, key = make_cert(tmp_path)
    gw = await gateway(server=dataclasses.replace(BASE_SERVER, tls=TlsConfig(str(cert), str(key))))
    url = gw.url.replace("http://", "https://")
    trust = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust), cookie_jar=aiohttp.DummyCookieJar()) as s:
        r, doc = await _sign_in(s, url, MASTER_KEY)
        assert r.status == 200 and _cookie(r)["llm_proxy_session"]["secure"]
        sid = _cookie(r)["llm_proxy_session"].value
        async with s.get(url + "/admin/keys", headers=_session_headers(url, sid, doc["csrf"])) as r:
            assert r.status == 200
        # The http:// origin of the same host and port is another origin.
        async with s.get(url + "/admin/keys", headers=_session_headers(gw.url, sid, doc["csrf"])) as r:
            assert r.status == 403


async def test_pages_are_served_with_a_strict_policy(gateway, http):
    gw = await gateway()
    for path in ("/ui/", "/ui/js/main.js", "/ui/app.css"):
        async with http.get(gw.url + path) as r:
            assert r.status == 200, path
            csp = r.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            etag = r.headers["ETag"]
        async with http.get(gw.url + path, headers={"If-None-Match": etag}) as r:
            assert r.status == 304
    async with http.get(gw.url + "/ui/js/main.js") as r:
        assert r.content_type == "text/javascript"
    async with http.get(gw.url + "/ui/../proxy.yaml") as r:
        assert r.status == 404
    async with http.get(gw.url + "/ui", allow_redirects=False) as r:
        assert r.status == 308 and r.headers["Location"] == "/ui/"


async def test_sessions_live_in_the_store(tmp_path):
    """Every worker (and node) sharing the store knows a session; a new master key ends it."""
    a, b = SQLiteStore(str(tmp_path / "s.db")), SQLiteStore(str(tmp_path / "s.db"))
    await a.open()
    await b.open()
    try:
        sid, session = await Sessions(a, 3600).sign_in(MASTER_KEY, MASTER_KEY)  # type: ignore[misc]
        other = Sessions(b, 3600)
        found = await other.find(sid, MASTER_KEY)
        assert found is not None and found.csrf == session.csrf
        assert await other.find(sid, MASTER_KEY + "-rotated") is None
        assert await other.find(sid + "x", MASTER_KEY) is None
        await other.sign_out(sid)
        assert await Sessions(a, 3600).find(sid, MASTER_KEY) is None
        assert await Sessions(a, 3600).sign_in("wrong", MASTER_KEY) is None
        expired = await Sessions(a, -1).sign_in(MASTER_KEY, MASTER_KEY)
        assert expired is not None and await Sessions(a, 3600).find(expired[0], MASTER_KEY) is None
    finally:
        await a.close()
        await b.close()


def test_every_dashboard_asset_ships_in_the_package():
    """setup.cfg's package_data globs cover every file under proxy/ui/ (a wheel holds
    only what they name)."""
    import configparser
    import fnmatch
    from pathlib import Path

    import proxy

    root = Path(proxy.__file__).parent
    cfg = configparser.ConfigParser()
    cfg.read(root.parent / "setup.cfg")
    globs = [g.strip() for g in cfg["options.package_data"]["proxy"].split(",")]
    files = [p.relative_to(root).as_posix() for p in (root / "ui").rglob("*") if p.is_file()]
    assert "ui/index.html" in files and "ui/js/main.js" in files
    for f in files:
        # setuptools globs do not cross "/": match segment counts as it does.
        assert any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs), f


def test_page_code_builds_no_html_from_strings_and_stores_nothing():
    """Every text reaches the page through textContent (proxy/ui/js/dom.js), so key names,
    model names and error messages cannot inject markup; nothing is put in web storage."""
    from pathlib import Path

    import proxy

    ui = Path(proxy.__file__).with_name("ui")
    sources = {p.name: p.read_text() for p in ui.rglob("*.js")}
    assert len(sources) >= 10
    for name, text in sources.items():
        text = text.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace is a name, not a fetch
        for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                       "localStorage", "sessionStorage", "indexedDB", "document.cookie", "http://", "https://"):
            assert banned not in text, (name, banned)
    html = (ui / "index.html").read_text()
    assert "<script" in html and "http" not in html.replace('http-equiv', "")  # no CDN, no inline code
    assert "<script>" not in html
