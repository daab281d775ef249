"""The dashboard in a real browser: Debian's chromium driven by Playwright (no browser
download), against a real gateway, its mock provider, and the official openai SDK.

An operator signs in, creates a key, a client uses it, the request shows in the overview
and the explorer, the key is edited, rotated and revoked; a cross-site page cannot make
the browser act; a key holder sees only their own key; the master key is in no page, no
storage, no cookie and no log line. Screenshots of every page go to tests/artifacts/
(git-ignored) for people to look at.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from _gateway import MASTER_KEY
from aiohttp import web

from proxy.store.base import UsageRecord

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
]
ARTIFACTS = Path(__file__).with_name("artifacts")
# The browser must be there: CI installs it (scripts/test); a missing one fails loudly.
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    ARTIFACTS.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


async def _page(browser: Any, errors: list[str]) -> Any:
    context = await browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = await context.new_page()
    page.set_default_timeout(10_000)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text else None)
    return page


async def _seed(gw: Any) -> None:
    """A week of traffic from two keys, so the charts have something to draw."""
    keys = [(await gw.state.store.get_key("test-key")), None]
    await gw.create_key("build-bot", budget_usd=20.0, budget_period="month")
    keys[1] = await gw.state.store.get_key("build-bot")
    now = time.time()
    records = []
    for i in range(240):
        k = keys[i % 2]
        model, upstream, target = [("mock-gpt", "mock", "mock-gpt"), ("mock-claude", "mock-anthropic", "mock-claude")][i % 3 == 0]
        failed = i % 37 == 5
        p, c = 300 + (i * 97) % 2400, 40 + (i * 53) % 700
        records.append(UsageRecord(
            f"seed-{i}", now - 3600 - (i * 2531) % (7 * 86400), k.id, k.name, "chat.completions", model, upstream, target,
            True, 502 if failed else 200, p, 0 if failed else c, 0, 0, 0, 0.0 if failed else (p * 1.0 + c * 2.0) / 1e6,
            False, None if failed else 150.0 + (i * 31) % 400, 900.0 + (i * 71) % 2500,
            "upstream_error" if failed else None, "upstream_error" if failed else "ok",
        ))
    await gw.state.store.write_usage(records)


async def _no_master_key_anywhere(page: Any) -> None:
    html = await page.content()
    storage = await page.evaluate("() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    cookies = await page.context.cookies()
    for where in (html, storage, str(cookies)):
        assert MASTER_KEY not in where and MASTER_KEY[:-4] not in where
    assert await page.evaluate("() => localStorage.length + sessionStorage.length") == 0


async def _shot(page: Any, name: str) -> None:
    await page.wait_for_timeout(150)  # let the charts fit their boxes
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_operator_console(gateway, browser, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await gateway()
    await _seed(gw)
    errors: list[str] = []
    page = await _page(browser, errors)
    ui = gw.url + "/ui/"

    # Sign in with the master key.
    await page.goto(ui)
    await _shot(page, "signin")
    await page.fill("input[name=key]", "wrong-key")
    await page.click("button[type=submit]")
    await page.wait_for_selector("text=not the master key")
    await page.fill("input[name=key]", MASTER_KEY)
    await page.click("button[type=submit]")
    await page.wait_for_selector("[data-testid=kpi-requests]")
    assert await page.input_value("input[name=key]") == "" if await page.query_selector("input[name=key]") else True
    cookie = next(c for c in await page.context.cookies() if c["name"] == "llm_proxy_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert await page.evaluate("() => document.cookie") == ""  # HttpOnly: scripts cannot read it
    await _no_master_key_anywhere(page)

    # Create a key with every option of `keys create`.
    await page.click("text=Keys")
    await page.click("[data-testid=create-key]")
    await page.fill("input[name=name]", "alice")
    await page.check("input[name=models][value=mock-gpt]")
    await page.fill("input[name=rpm]", "60")
    await page.fill("input[name=tpm]", "100000")
    await page.fill("input[name=max_parallel]", "4")
    await page.fill("input[name=budget_usd]", "5")
    await page.select_option("select[name=budget_period]", "month")
    await page.fill("input[name=expires_in_days]", "30")
    await _shot(page, "keys-create")
    await page.click("dialog button[type=submit]")
    secret = (await page.text_content("[data-testid=secret]")).strip()
    assert secret.startswith("sk-")
    await _shot(page, "keys-secret")
    await page.click("dialog button[type=submit]")  # Done
    await page.wait_for_selector("tr[data-key=alice]")
    assert secret not in await page.content()  # shown once, then gone from the page
    alice = await gw.state.store.get_key("alice")
    assert (alice.models, alice.rpm, alice.tpm, alice.max_parallel, alice.budget_usd, alice.budget_period) == (
        ("mock-gpt",), 60, 100000, 4, 5.0, "month")
    assert alice.expires_at is not None and 29 * 86400 < alice.expires_at - time.time() <= 30 * 86400

    # A client uses it through the gateway with the official SDK.
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    reply = await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content
    await gw.wait_records(241)

    # The request shows in the overview and in the explorer.
    await page.click("text=Overview")
    await page.wait_for_selector("[data-testid=top-keys] >> text=alice")
    await _shot(page, "overview")
    await page.click("[data-testid=top-keys] >> text=alice")  # opens the explorer on that key
    await page.wait_for_selector("[data-testid=usage-table]")
    assert await page.input_value("[data-testid=f-key]") == alice.id
    table = page.locator("[data-testid=usage-table] tbody tr")
    await table.first.wait_for()
    assert await table.count() == 1
    row = await table.first.text_content()
    assert "alice" in row and "mock-gpt" in row
    # Failures only, every key: the seeded upstream errors and nothing else.
    await page.select_option("[data-testid=f-key]", "")
    await page.select_option("[data-testid=f-outcome]", "error")
    await page.click("[data-testid=apply]")
    await page.wait_for_selector("[data-testid=usage-table] tbody tr >> text=upstream error")
    failures = await page.locator("[data-testid=usage-table] tbody tr").all_text_contents()
    expected = [r for r in await gw.records() if r.outcome != "ok" and r.ts >= time.time() - 86400]
    assert len(failures) == len(expected) >= 1
    assert all("upstream error" in row and "HTTP 502" in row for row in failures)
    await page.select_option("[data-testid=f-outcome]", "")
    await page.select_option("[data-testid=f-key]", alice.id)
    await page.click("[data-testid=apply]")
    await _shot(page, "usage")
    async with page.expect_download() as download:
        await page.click("[data-testid=export-csv]")
    csv_text = Path(await (await download.value).path()).read_text()
    assert "alice" in csv_text and "mock-gpt" in csv_text

    # Edit its limits, models and expiry.
    await page.click("text=Keys")
    await page.click("[data-testid=edit-alice]")
    await page.fill("input[name=rpm]", "120")
    await page.check("input[name=models][value=mock-claude]")
    await page.fill("input[name=expires_at]", "2099-01-31")
    await page.click("dialog button[type=submit]")
    await page.wait_for_selector("tr[data-key=alice] >> text=120 req/min")
    alice = await gw.state.store.get_key("alice")
    assert alice.rpm == 120 and set(alice.models) == {"mock-gpt", "mock-claude"}
    assert time.gmtime(alice.expires_at)[:3] == (2099, 1, 31)
    await _shot(page, "keys")

    # Rotate: a new secret for the same key; the old one stops working.
    if any(r.resource is not None and r.resource.canonical == "/admin/keys/{key}/rotate" for r in gw.app.router.routes()):
        await page.click("[data-testid=rotate-alice]")
        await page.click("dialog button[type=submit]")
        rotated = (await page.text_content("[data-testid=secret]")).strip()
        await page.click("dialog button[type=submit]")
        assert rotated.startswith("sk-") and rotated != secret
        assert (await gw.state.store.get_key("alice")).id == alice.id
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
        secret = rotated
        await client.close()
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
        await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hi"}])

    # Revoke.
    await page.click("[data-testid=revoke-alice]")
    await page.click("dialog button[type=submit]")
    await page.wait_for_selector("tr[data-key=alice] >> text=revoked")
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
    await client.close()

    await page.click("text=Upstreams")
    await page.wait_for_selector("[data-testid=routes] >> text=mock-gpt")
    # One tiny request through a route, and a config reload.
    await page.click("[data-testid=test-mock-gpt]")
    await page.wait_for_selector("[data-testid=routes] tr:has([data-testid=test-mock-gpt]) >> text=200 in")
    await page.click("[data-testid=reload]")
    # The API's own answer is shown (here a refusal: this test gateway was not started from a file).
    await page.wait_for_selector(".toast >> text=/reload/i")
    await page.click("text=Configuration (secrets masked)")
    config_text = await page.text_content("[data-testid=config]")
    assert "****" in config_text and "sk-upstream-CANARY" not in config_text
    await _shot(page, "upstreams")
    await _no_master_key_anywhere(page)

    # Sign out: back to sign-in, and the old session is gone on the server too.
    await page.click("[data-testid=sign-out]")
    await page.wait_for_selector("input[name=key]")
    assert [c for c in await page.context.cookies() if c["name"] == "llm_proxy_session"] == []
    assert errors == []
    assert gw.state.access_log is not None
    gw.state.access_log.flush()
    assert MASTER_KEY not in caplog.text and MASTER_KEY[:-4] not in caplog.text
    assert secret not in caplog.text


async def test_cross_site_pages_cannot_act(gateway, browser):
    """A page on another site, opened by a signed-in operator, tries a form POST and a
    credentialed fetch: neither creates a key, and it can read nothing back."""
    gw = await gateway()
    errors: list[str] = []
    page = await _page(browser, errors)
    await page.goto(gw.url + "/ui/")
    await page.fill("input[name=key]", MASTER_KEY)
    await page.click("button[type=submit]")
    await page.wait_for_selector("[data-testid=welcome]")  # no traffic yet: how to start

    target = gw.url + "/admin/keys"
    evil_html = f"""<!doctype html><body>
<form method=post action="{target}" enctype="text/plain"><input name='{{"name":"evil-form","x":"' value='"}}'></form>
<script>
fetch("{target}", {{method: "POST", credentials: "include", headers: {{"Content-Type": "text/plain"}},
                    body: JSON.stringify({{name: "evil-fetch"}})}})
  .then(r => r.text()).then(t => document.title = "read:" + t, e => document.title = "blocked");
</script></body>"""

    async def evil(request: web.Request) -> web.Response:
        return web.Response(text=evil_html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", evil)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "localhost", 0).start()  # "localhost" is another site than 127.0.0.1
    try:
        port = runner.addresses[0][1]
        await page.goto(f"http://localhost:{port}/")
        await page.wait_for_function("() => document.title.length > 0")
        assert not (await page.title()).startswith("read:{\"id\"")
        async with page.expect_navigation():
            await page.evaluate("() => document.forms[0].submit()")
        body = await page.text_content("body")
        assert '"id"' not in body and ("invalid_api_key" in body or "csrf_failed" in body), body
    finally:
        await runner.cleanup()
    for name in ("evil-form", "evil-fetch", '{"name":"evil-form","x":"='):
        assert await gw.state.store.get_key(name) is None
    assert [k.name for k in await gw.state.store.list_keys()] == ["test-key"]


async def test_key_holder_sees_only_their_own_key(gateway, browser):
    gw = await gateway()
    await gw.create_key("not-mine", budget_usd=99.0)
    mine = await gw.create_key("bob", budget_usd=10.0, budget_period="month", rpm=30, models=("mock-gpt",))
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=mine, max_retries=0) as client:
        await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hello"}])
    await gw.wait_records(1)

    errors: list[str] = []
    page = await _page(browser, errors)
    await page.goto(gw.url + "/ui/")
    await page.fill("input[name=key]", mine)
    await page.click("button[type=submit]")
    await page.wait_for_selector("[data-testid=my-key] >> text=bob")
    await page.wait_for_selector("text=mock-gpt")
    await _shot(page, "self-service")
    html = await page.content()
    assert "not-mine" not in html and "Upstreams" not in html and mine not in html
    assert await page.text_content("[data-testid=self-budget]") and "$10.00" in await page.text_content("[data-testid=self-budget]")

    # Admin pages are not offered, and the admin API refuses the session even with its token.
    await page.goto(gw.url + "/ui/#/keys")
    await page.wait_for_selector("[data-testid=my-key]")
    assert "not-mine" not in await page.content()
    statuses = await page.evaluate("""async () => {
        const s = await (await fetch("/ui/api/session")).json();
        const h = {"X-CSRF-Token": s.csrf, "Content-Type": "application/json"};
        const out = [];
        for (const [m, p] of [["GET", "/admin/keys"], ["GET", "/admin/usage"], ["GET", "/admin/config"],
                              ["POST", "/admin/keys"], ["GET", "/admin/keys/not-mine"]]) {
            const r = await fetch(p, {method: m, headers: h, body: m === "POST" ? '{"name":"x"}' : undefined});
            out.push(r.status);
        }
        return out;
    }""")
    assert statuses == [403] * 5
    assert await gw.state.store.get_key("x") is None
    assert errors == []


async def test_explorer_shows_how_each_call_was_served(gateway, browser):
    """The explorer's Served column (client dialect → upstream protocol, and the attempt of
    a failover), its two filters, and the CSV of what they select."""
    gw = await gateway()
    key = await gw.state.store.get_key("test-key")
    now = time.time()
    served = [("anthropic", "openai", 0), ("openai", "gemini", 0), ("openai", "openai", 1), ("gemini", "anthropic", 2)]
    records = [
        UsageRecord(
            id=f"served-{i}", ts=now - 600 - i * 60, key_id=key.id, key_name=key.name, endpoint="chat.completions",
            model="mock-gpt", upstream="mock", upstream_model="mock-gpt", stream=False, status=200,
            prompt_tokens=10, completion_tokens=5, cost_usd=0.001, client_dialect=cd, upstream_protocol=up, attempt=n,
        )
        for i, (cd, up, n) in enumerate(served * 3)
    ]
    await gw.state.store.write_usage(records)
    errors: list[str] = []
    page = await _page(browser, errors)
    await page.goto(gw.url + "/ui/")
    await page.fill("input[name=key]", MASTER_KEY)
    await page.click("button[type=submit]")
    await page.wait_for_selector("[data-testid=kpi-requests]")
    await page.goto(gw.url + "/ui/#/usage")
    rows = page.locator("[data-testid=usage-table] tbody tr")
    await page.wait_for_selector("[data-testid=usage-table] [data-testid=served]")
    texts = await rows.all_text_contents()
    assert len(texts) == len(records)
    shown = await page.locator("[data-testid=served]").all_text_contents()
    assert sorted(shown) == sorted(f"{cd} → {up}" for cd, up, _ in served * 3)
    attempts = await page.locator("[data-testid=attempt]").all_text_contents()
    assert sorted(attempts) == ["attempt 1 (failover)"] * 3 + ["attempt 2 (failover)"] * 3
    # Filter: OpenAI clients only, then OpenAI clients served by a Gemini upstream.
    await page.select_option("[data-testid=f-dialect]", "openai")
    await page.click("[data-testid=apply]")
    await page.wait_for_function("() => document.querySelectorAll('[data-testid=usage-table] tbody tr').length === 6")
    assert set(await page.locator("[data-testid=served]").all_text_contents()) == {"openai → gemini", "openai → openai"}
    await page.select_option("[data-testid=f-protocol]", "gemini")
    await page.click("[data-testid=apply]")
    await page.wait_for_function("() => document.querySelectorAll('[data-testid=usage-table] tbody tr').length === 3")
    assert set(await page.locator("[data-testid=served]").all_text_contents()) == {"openai → gemini"}
    await _shot(page, "usage-served")
    async with page.expect_download() as download:
        await page.click("[data-testid=export-csv]")
    lines = Path(await (await download.value).path()).read_text().splitlines()
    header = lines[0].split(",")
    got = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert len(got) == 3 and all((r["client_dialect"], r["upstream_protocol"], r["attempt"]) == ("openai", "gemini", "0") for r in got)
    assert errors == []
