"""The data plane's handlers other than the model call (proxy/forward.py).

Model lists in each dialect's shape, a key's own usage (`GET /v1/usage`), liveness and
readiness, CORS preflights, and the 404 / 405 answers. Each is the last stage of a chain
composed in proxy/gateway.py: by the time one runs, the request context is set and, on
keyed routes, `call.key` is the caller's key.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from proxy.config import ModelConfig
from proxy.dialects import ModelInfo
from proxy.errors import InvalidRequest, MethodNotAllowed, NotFound, ProxyError
from proxy.limits.base import Limiter
from proxy.middleware.context import EXPOSE, preflight_headers
from proxy.middleware.draining import StreamRegistry
from proxy.pipeline import Call
from proxy.routing import Router
from proxy.store.base import KeyRecord, Store
from proxy.usage_sink import UsageSink
from proxy.views import own_usage_doc, parse_since

# As aiohttp's json_response wrote them before these routes moved to the data plane.
_JSON = ("Content-Type", "application/json; charset=utf-8")
_JSON_BARE = ("Content-Type", "application/json")


def _json(call: Call, doc: Any, status: int = 200, content_type: tuple[str, str] = _JSON) -> None:
    call.ex.respond(status, [*call.headers, content_type], orjson.dumps(doc))


def _query(call: Call) -> dict[str, str]:
    return dict(parse_qsl(call.ex.request.query_string))


def is_embedding_model(model: ModelConfig) -> bool:
    """Whether model lists show `model` as an embedding model (Gemini's list names the
    embedding methods for it instead of generateContent): its name, or the upstream model
    of one of its routes, says "embed", as every major provider's embedding models do
    (text-embedding-3-small, gemini-embedding-001, nomic-embed-text...). Only the lists
    read it: any model may be called on any endpoint, and its upstream answers."""
    return "embed" in model.name.lower() or any("embed" in r.model.lower() for r in model.routes)


class ClientRoutes:
    """The handlers, over the gateway's backends."""

    def __init__(
        self,
        router: Router,
        store: Store,
        limiter: Limiter,
        sink: UsageSink,
        streams: StreamRegistry,
        is_ready: Callable[[], bool],
    ) -> None:
        self._router = router
        self._store = store
        self._limiter = limiter
        self._sink = sink
        self._streams = streams
        self._is_ready = is_ready
        self._started = int(time.time())

    def use(self, router: Router) -> None:
        """A reloaded configuration's models."""
        self._router = router

    # ---------------------------------------------------------------- models

    def _visible_models(self, key: KeyRecord | None) -> list[ModelInfo]:
        return [
            ModelInfo(m.name, m.routes[0].upstream, self._started, embeds=is_embedding_model(m))
            for m in self._router.models
            if key is None or not key.models or m.name in key.models
        ]

    async def list_models(self, call: Call) -> None:
        body = call.dialect.models_body(self._visible_models(call.key), _query(call))
        call.ex.respond(200, [*call.headers, _JSON_BARE], body)

    async def get_model(self, call: Call) -> None:
        path = call.ex.request.path
        name = unquote(path.split("/models/", 1)[1]).removeprefix("models/")
        for m in self._visible_models(call.key):
            if m.id == name:
                call.ex.respond(200, [*call.headers, _JSON_BARE], call.dialect.model_body(m))
                return
        raise NotFound(f"The model '{name[:64]}' does not exist.", code="model_not_found")

    # ---------------------------------------------------------------- usage

    async def own_usage(self, call: Call) -> None:
        """The calling key's own usage by model, limits, budget and what is left of it."""
        key = call.key
        assert key is not None   # a keyed route
        query = _query(call)
        try:
            since = parse_since(query.get("since", "24h"))
        except ValueError:
            raise InvalidRequest("'since' must look like 24h, 7d or an ISO date.", param="since") from None
        _json(call, await own_usage_doc(self._store, key, since), content_type=_JSON_BARE)

    # ---------------------------------------------------------------- health

    async def root(self, call: Call) -> None:
        _json(call, {"name": "llm-proxy", "status": "ok"})

    async def healthz(self, call: Call) -> None:
        _json(call, {"status": "ok"})

    async def readyz(self, call: Call) -> None:
        """200 when the stores answer and usage can be recorded; 503 (and why) otherwise."""
        if not self._is_ready() or self._streams.stopping:
            _json(call, {"status": "unavailable"}, 503)
            return
        checks: dict[str, str] = {}
        for name, ping in (("store", self._store.ping), ("limits", self._limiter.ping)):
            try:
                await ping()
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = type(exc).__name__
        if not self._sink.accepting:
            checks["usage"] = "refusing"  # spool full or disk refusing: model calls get 503
        ok = all(v == "ok" for v in checks.values())
        _json(call, {"status": "ok" if ok else "degraded", "checks": checks}, 200 if ok else 503)


# -------------------------------------------------------------------- answers without backends


async def preflight(call: Call) -> None:
    """A CORS preflight: any origin may call with the headers the SDKs send."""
    headers = call.ex.request.headers
    origin = headers.get("origin")
    out = [*call.headers[:2], *preflight_headers(origin, headers.get("access-control-request-headers"))]
    if origin:
        out.append(("Access-Control-Expose-Headers", EXPOSE))
    call.ex.respond(204, out, b"")


def refuse(err: ProxyError) -> Callable[[Call], Awaitable[None]]:
    """A handler that answers `err` (rendered by the request context)."""

    async def handler(call: Call) -> None:
        raise err

    return handler


async def not_found(call: Call) -> None:
    raise NotFound("No such endpoint.")


async def method_not_allowed(call: Call) -> None:
    raise MethodNotAllowed("This method is not allowed on this endpoint.")
