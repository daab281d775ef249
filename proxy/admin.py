"""The admin API under /admin/ (master key only), on the control plane (proxy/control.py).

With no master key configured the admin API is off: every /admin/ route answers 403.
The master key is compared in constant time. Responses never contain a key's digest;
the full key is returned once, by the create call (and a new one by rotate).

`master_only` is the one gate: it takes the master key as a Bearer header (scripts, the
CLI) or a dashboard session signed in with the master key, whose every call must also
carry its CSRF token and come from the dashboard's own origin
(proxy/middleware/session.py). A session signed in with a gateway key is refused here.

Keys are never deleted: `DELETE /admin/keys/{key}` revokes, like `POST .../revoke`. The
row stays, so the usage ledger keeps naming it and its spend stays on record; its name
is free for a new key at once. A revocation or rotation is effective at once in this
process and within `auth.cache_ttl_s` in every other worker or node.

The usage, series, overview and upstream views live in `proxy.admin_stats`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy import admin_stats
from proxy.config import ModelConfig, masked
from proxy.errors import Conflict, InvalidApiKey, InvalidRequest, NotFound, PermissionDenied
from proxy.middleware.auth import extract_key
from proxy.middleware.session import COOKIE, session_of
from proxy.routing import Route
from proxy.sessions import MASTER, is_master_key
from proxy.store.base import DuplicateName, KeyLimits, KeyRecord, KeyRevoked
from proxy.views import MAX_DAYS, MAX_LIMIT, check_name, key_json, parse_since, parse_ts

_PERIODS = (None, "day", "month")
_LIMIT_FIELDS = (
    "models", "rpm", "tpm", "max_parallel", "budget_usd", "budget_period", "expires_at", "expires_in_days", "force"
)


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LIMIT:
        raise InvalidRequest(f"'{name}' must be an integer from 0 to {MAX_LIMIT}, or null.", param=name)
    return v


def parse_limits(body: dict[str, Any], base: KeyRecord | None = None) -> KeyLimits:
    """Limits from a JSON body; fields left out keep `base`'s values (PATCH semantics)."""
    allowed = set(_LIMIT_FIELDS) | ({"name"} if base is None else set())
    unknown = sorted(set(body) - allowed)
    if unknown:
        what = "A key cannot be renamed" if unknown[0] == "name" else "Unknown field"
        raise InvalidRequest(f"{what}: '{unknown[0][:64]}'.", param=unknown[0][:64])

    def pick(name: str, parse: Callable[[dict[str, Any], str], Any]) -> Any:
        if name in body:
            return parse(body, name)
        return getattr(base, name) if base is not None else None

    def models(b: dict[str, Any], n: str) -> tuple[str, ...]:
        v = b.get(n)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(m, str) and 0 < len(m) <= 256 for m in v):
            raise InvalidRequest("'models' must be a list of model names.", param="models")
        return tuple(dict.fromkeys(v))

    def budget(b: dict[str, Any], n: str) -> float | None:
        v = b.get(n)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1e12:
            raise InvalidRequest("'budget_usd' must be a number from 0 to 1e12, or null.", param=n)
        return float(v)

    def period(b: dict[str, Any], n: str) -> str | None:
        v = b.get(n)
        if v is not None and v not in _PERIODS:
            raise InvalidRequest("'budget_period' must be 'day', 'month' or null.", param=n)
        return str(v) if v is not None else None

    def expires(b: dict[str, Any], n: str) -> float | None:
        v = b.get(n)
        if v is None:
            return None
        try:
            return parse_ts(v)
        except ValueError:
            raise InvalidRequest(f"'{n}' must be unix seconds or an ISO date/time, up to year 9999.", param=n) from None

    if "force" in body and not isinstance(body["force"], bool):
        raise InvalidRequest("'force' must be true or false.", param="force")
    expires_at = pick("expires_at", expires)
    if "expires_in_days" in body:
        if "expires_at" in body:
            raise InvalidRequest("Give 'expires_at' or 'expires_in_days', not both.", param="expires_in_days")
        days = body["expires_in_days"]
        if days is None:
            expires_at = None
        elif isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 <= days <= MAX_DAYS:
            raise InvalidRequest(f"'expires_in_days' must be a number from 0 to {MAX_DAYS}, or null.", param="expires_in_days")
        else:
            expires_at = time.time() + days * 86400
    return KeyLimits(
        models=pick("models", models) or (),
        rpm=pick("rpm", _opt_int),
        tpm=pick("tpm", _opt_int),
        max_parallel=pick("max_parallel", _opt_int),
        budget_usd=pick("budget_usd", budget),
        budget_period=pick("budget_period", period),
        expires_at=expires_at,
    )


def add_routes(app: web.Application, state_key: web.AppKey[Any]) -> None:
    def master_only(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def checked(request: web.Request) -> web.StreamResponse:
            state = request.app[state_key]
            master = state.config.auth.master_key
            if not master:
                raise PermissionDenied("The admin API is disabled: no master key is configured.", code="admin_disabled")
            presented = extract_key(request.headers, None)
            if presented is None and COOKIE in request.cookies:
                session = await session_of(request, state.sessions, master, state.relay_token)
                if session.kind != MASTER:
                    raise PermissionDenied("This session may see its own key's usage only.", code="admin_only")
            elif not is_master_key(presented or "", master):
                raise InvalidApiKey()
            return await handler(request)

        return checked

    async def body_of(request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
        return body

    def check_models(request: web.Request, body: dict[str, Any], limits: KeyLimits) -> None:
        """Model names the config does not know are refused (a typo would lock the key out)
        unless the body says `"force": true` (e.g. a model about to be added)."""
        if body.get("force") is True or "models" not in body:
            return
        known = {m.name for m in request.app[state_key].config.models}
        unknown = [m for m in limits.models if m not in known]
        if unknown:
            raise InvalidRequest(
                f"Unknown model '{unknown[0][:64]}' in 'models' (not in the config); send \"force\": true to allow it.",
                param="models",
                code="unknown_model",
            )

    async def create_key(request: web.Request) -> web.Response:
        body = await body_of(request)
        try:
            name = check_name(body.get("name"))
        except ValueError as exc:
            raise InvalidRequest(f"'name': {exc}.", param="name") from None
        limits = parse_limits(body)
        check_models(request, body, limits)
        try:
            record, key = await request.app[state_key].store.create_key(name, limits)
        except DuplicateName:
            raise Conflict("A key with this name already exists.", code="duplicate_name") from None
        return _json({**key_json(record), "key": key}, status=201)

    async def list_keys(request: web.Request) -> web.Response:
        keys = await request.app[state_key].store.list_keys()
        return _json({"data": [key_json(k) for k in keys]})

    async def found(request: web.Request) -> KeyRecord:
        record: KeyRecord | None = await request.app[state_key].store.get_key(request.match_info["key"])
        if record is None:
            raise NotFound("No such key.", code="key_not_found")
        return record

    async def get_key(request: web.Request) -> web.Response:
        return _json(key_json(await found(request)))

    async def update_key(request: web.Request) -> web.Response:
        record = await found(request)
        body = await body_of(request)
        limits = parse_limits(body, base=record)
        check_models(request, body, limits)
        state = request.app[state_key]
        updated = await state.store.update_key(record.id, limits)
        state.authenticator.forget(record.digest)  # new limits apply at once in this process
        if updated is None:
            raise NotFound("No such key.", code="key_not_found")
        return _json(key_json(updated))

    async def revoke_key(request: web.Request) -> web.Response:
        record = await found(request)
        state = request.app[state_key]
        revoked = await state.store.revoke_key(record.id)
        state.authenticator.forget(record.digest)  # effective at once in this process
        if revoked is None:
            raise NotFound("No such key.", code="key_not_found")
        return _json(key_json(revoked))

    async def rotate_key(request: web.Request) -> web.Response:
        record = await found(request)
        state = request.app[state_key]
        try:
            rotated = await state.store.rotate_key(record.id)
        except KeyRevoked:
            raise Conflict("A revoked key cannot be rotated.", code="key_revoked") from None
        if state.authenticator is not None:
            state.authenticator.forget(record.digest)  # the old secret stops at once here
        if rotated is None:
            raise NotFound("No such key.", code="key_not_found")
        new_record, key = rotated
        return _json({**key_json(new_record), "key": key})

    async def config(request: web.Request) -> web.Response:
        return _json(masked(request.app[state_key].config))

    async def upstreams(request: web.Request) -> web.Response:
        """Each route's breaker state, this process's recent error rate and latency."""
        state = request.app[state_key]
        health = state.health
        await health.sync()   # shared states: the freshest view, not the last poll's
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for route in state.router.routes:
            row = seen.get(route.key)
            if row is None:
                row = seen[route.key] = {**health.view(route.key).to_json(), "protocol": route.upstream.protocol, "models": []}
            row["models"].append({"model": route.model.name, "priority": route.priority, "weight": route.weight})
        return _json({"data": list(seen.values()), "shared": health.shared})

    async def test_upstream(request: web.Request) -> web.Response:
        """One tiny real call through one route: {"model": client model} (its first
        route) or {"upstream": U, "model": upstream model}."""
        body = await body_of(request)
        state = request.app[state_key]
        model, upstream = body.get("model"), body.get("upstream")
        if not isinstance(model, str) or not model or (upstream is not None and not isinstance(upstream, str)):
            raise InvalidRequest("Give {\"model\": NAME} or {\"upstream\": U, \"model\": M}.", param="model")
        router, pool = state.router, state.upstreams
        if upstream is None:
            route = router.first_route(model)
        else:
            route = next((r for r in router.routes if r.key == (upstream, model)), None)
            if route is None:
                try:
                    target = pool.get(upstream)
                except KeyError:
                    raise NotFound(f"No usable upstream '{upstream[:64]}'.", code="upstream_not_found") from None
                route = Route(ModelConfig(model, ()), target.config, model, 1.0)
        return _json(await state.checks.test(route, pool, route.model.name))

    async def reload(request: web.Request) -> web.Response:
        result = await request.app[state_key].reloader.reload(tell_parent=True)
        if not result.ok:
            raise InvalidRequest(result.summary, code="invalid_config")
        return _json(result.to_json())

    r = app.router
    r.add_get("/admin/upstreams", master_only(upstreams))
    r.add_post("/admin/upstreams/test", master_only(test_upstream))
    r.add_post("/admin/reload", master_only(reload))
    r.add_post("/admin/keys", master_only(create_key))
    r.add_get("/admin/keys", master_only(list_keys))
    r.add_get("/admin/keys/{key}", master_only(get_key))
    r.add_patch("/admin/keys/{key}", master_only(update_key))
    r.add_post("/admin/keys/{key}/revoke", master_only(revoke_key))
    r.add_delete("/admin/keys/{key}", master_only(revoke_key))
    r.add_post("/admin/keys/{key}/rotate", master_only(rotate_key))
    views = admin_stats.make_handlers(lambda request: request.app[state_key].store)
    r.add_get("/admin/usage", master_only(views["usage"]))
    r.add_get("/admin/usage/series", master_only(views["series"]))
    r.add_get("/admin/stats/overview", master_only(views["overview"]))
    r.add_get("/admin/stats/upstreams", master_only(views["upstreams"]))
    r.add_get("/admin/config", master_only(config))


def _since(request: web.Request) -> float:
    try:
        return parse_since(request.query.get("since", "24h"))
    except ValueError:
        raise InvalidRequest("'since' must look like 24h, 7d or an ISO date.", param="since") from None
