"""The gateway's HTTP entry point: every client connection lands here.

Model calls (POST on a model route) are served right here, on the lean HTTP/1.1 server
(proxy/http1/server.py): request id, CORS headers, auth, then the Forwarder. Their key is
checked from the head, before the body is read (`head_check`): a caller without a valid
key never makes the gateway hold its body (RELIABILITY D5). Every other
request (admin API, health, metrics, model lists, preflights, 404/405s) is relayed over
an in-process socket pair to the aiohttp application, which keeps its routes and
middlewares; those requests are rare and not latency critical, model calls are both.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from proxy.access_log import AccessLog
from proxy.app import KEY_NAME_HEADER, AppState
from proxy.dialects import GEMINI, GEMINI_METHODS, GEMINI_MODEL_PREFIXES, MODEL_PATHS, Endpoint
from proxy.errors import (
    InvalidApiKey,
    InvalidRequest,
    NotFound,
    ProxyError,
    RequestTooLarge,
    ServiceUnavailable,
    ShuttingDown,
)
from proxy.http1.client import Http1Client, UpstreamConnectionError
from proxy.http1.server import Exchange, Refusal, Request
from proxy.middleware.auth import extract_key
from proxy.middleware.auth_failures import AuthFailures, ClientAddress, TooManyAuthFailures, tarpit
from proxy.middleware.context import dialect_for_path, error_parts, fresh_request_id, new_request_id, response_headers
from proxy.middleware.session import RELAY_HOST, RELAY_PEER, RELAY_PREFIX, RELAY_PROTO, RELAY_TOKEN
from proxy.store.base import KeyRecord
from proxy.upstream import encode_head

log = logging.getLogger("llm_proxy.http")

# Not relayed between the client and the in-process app: hop-by-hop, framing (re-made on
# each side), Host; and the app's Date (the front server sends its own) and Server.
_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade", "expect", "host",
        "proxy-connection", "date", "server",
    }
)
_INTERNAL_BODY_CAP = 256 * 1024 * 1024
_STATUS_ERRORS: dict[int, tuple[type[ProxyError], str]] = {
    400: (InvalidRequest, "bad_request"),
    408: (InvalidRequest, "request_timeout"),
    413: (RequestTooLarge, "request_too_large"),
    414: (InvalidRequest, "uri_too_long"),
    431: (InvalidRequest, "request_header_fields_too_large"),
    503: (ServiceUnavailable, "server_shutting_down"),
}


class _Refused:
    """`Request.admitted` of a request the head check refused: for its access-log line."""

    __slots__ = ("client", "rid")

    def __init__(self, client: str, rid: str) -> None:
        self.client = client
        self.rid = rid


def model_route(path: str) -> tuple[Endpoint, str | None] | None:
    """The endpoint (and, for Gemini, the model from the path) a POST to `path` calls."""
    endpoint = MODEL_PATHS.get(path)
    if endpoint is not None:
        return endpoint, None
    if path.startswith(GEMINI_MODEL_PREFIXES):
        tail = unquote(path.split("/models/", 1)[1])
        model, _, method = tail.rpartition(":")
        found = GEMINI_METHODS.get(method)
        if found is None or not model:
            raise NotFound(f"Unknown Gemini method '{method[:64]}'.")
        return found, model
    return None


def protocol_error(status: int, message: str, request: Request | None) -> tuple[list[tuple[str, str]], bytes]:
    """Errors the HTTP layer answers itself (malformed, too large, slow, shutting down),
    in the dialect of the path when the request line got that far. Quotes nothing."""
    cls, code = _STATUS_ERRORS.get(status, (ProxyError, "internal_error"))
    err = cls(message, code=code)
    err.status = status
    path, headers = (request.path, request.headers) if request is not None else ("/", {})
    rid = fresh_request_id()
    _, extra, body = error_parts(dialect_for_path(path, headers), err, rid)
    return [*extra.items(), ("x-request-id", rid)], body


def internal_connector(server: web.Server) -> Callable[[Callable[[], asyncio.Protocol]], Awaitable[tuple[asyncio.Transport, asyncio.Protocol]]]:
    """Connections to the aiohttp application over socket pairs: no port, no network."""

    async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        await loop.connect_accepted_socket(server, theirs)
        transport, protocol = await loop.create_connection(factory, sock=ours)
        return transport, protocol

    return connect


class _Caller:
    """The key name for a request's access line ("-" until a key authenticated)."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = "-"


class Front:
    def __init__(
        self,
        state: AppState,
        internal: Http1Client,
        access_log: AccessLog | None,
        auth_failures: AuthFailures,
        client_address: ClientAddress,
        tls: bool = False,
    ) -> None:
        self._state = state
        self._tls = tls  # this server's own port speaks HTTPS (server.tls)
        self._internal = internal
        self._access_log = access_log
        self._auth_failures = auth_failures
        self._client_address = client_address

    def head_check(self, request: Request) -> Awaitable[Refusal | None] | None:
        """For a model call: check the key before the body is read (the server's HeadCheck)."""
        if request.method != "POST":
            return None
        try:
            route = model_route(request.path)
        except NotFound:
            return None  # answered by handle() once the (bounded) body is in
        authenticator = self._state.authenticator
        if route is None or authenticator is None:
            return None
        endpoint = route[0]
        # A key the cache knows as valid is admitted here, without a task or a pause: the
        # hot path's cost stays that of one cache lookup. Anything else is looked up (and
        # refused) with reading paused.
        query = (lambda: dict(parse_qsl(request.query_string))) if endpoint.dialect is GEMINI else None
        key = authenticator.authenticate_now(extract_key(request.headers, query))
        if key is not None:
            request.admitted = key
            return None
        return self._check_key(request, endpoint)

    async def _check_key(self, request: Request, endpoint: Endpoint) -> Refusal | None:
        client = self._client_address(request.remote, request.headers.get("x-forwarded-for"))
        try:
            request.admitted = await self._authenticate(request, endpoint, client)
            return None
        except ProxyError as err:
            rid = new_request_id(request.headers.get("x-request-id"))
            request.admitted = _Refused(client, rid)
            status, headers, body = error_parts(endpoint.dialect, err, rid)
            return Refusal(status, response_headers(rid, request.headers.get("origin")) + list(headers.items()), body)

    async def _authenticate(self, request: Request, endpoint: Endpoint, client: str) -> KeyRecord:
        """The caller's key, or InvalidApiKey; past the brute-force brake's limit a failure
        is answered 429 after a pause (a valid key is never braked)."""
        assert self._state.authenticator is not None
        query = (lambda: dict(parse_qsl(request.query_string))) if endpoint.dialect is GEMINI else None
        try:
            return await self._state.authenticator.authenticate(extract_key(request.headers, query))
        except InvalidApiKey:
            await self._auth_failed(client, request.started)
            raise

    async def _auth_failed(self, client: str, now: float) -> None:
        """Count a failed authentication; raise TooManyAuthFailures (after a tarpit) when
        the address is over the brake's limit."""
        try:
            self._auth_failures.check(client, now)
        except TooManyAuthFailures:
            await tarpit()
            raise
        self._auth_failures.failed(client, now)

    def on_done(self, ex: Exchange) -> None:
        """The server's on_done: the access-log line of a request the head check refused
        (handle() logs every other one)."""
        refused = ex.request.admitted
        if isinstance(refused, _Refused) and self._access_log is not None:
            self._access_log.line(ex, refused.client, "-", refused.rid)

    async def handle(self, ex: Exchange) -> None:
        request = ex.request
        caller = _Caller()
        rid = "-"
        client = self._client_address(request.remote, request.headers.get("x-forwarded-for"))
        try:
            route = model_route(request.path) if request.method == "POST" else None
            if route is None:
                rid = await self._relay_internal(ex, client, caller)
            else:
                rid = new_request_id(request.headers.get("x-request-id"))
                await self._model_call(ex, rid, caller, client, *route)
        except (NotFound, TooManyAuthFailures) as err:  # an unknown Gemini method; a brute-forcing address
            self._render(ex, err, fresh_request_id() if rid == "-" else rid)
        finally:
            if self._access_log is not None:
                self._access_log.line(ex, client, caller.name, rid)

    async def _model_call(
        self, ex: Exchange, rid: str, caller: _Caller, client: str, endpoint: Endpoint, path_model: str | None
    ) -> None:
        request = ex.request
        state = self._state
        common = response_headers(rid, request.headers.get("origin"))
        try:
            if state.streams.stopping:
                raise ShuttingDown()
            assert state.forwarder is not None
            admitted = request.admitted
            # Checked from the head already (head_check), unless it was pipelined behind another.
            key = admitted if isinstance(admitted, KeyRecord) else await self._authenticate(request, endpoint, client)
            # Named before the call: a stream its client aborts ends this task by
            # cancellation, and its access line must still say whose it was.
            caller.name = key.name
            await state.forwarder.handle(ex, endpoint, key, rid, common, path_model)
        except ProxyError as err:
            if not ex.head_sent:
                status, headers, body = error_parts(endpoint.dialect, err, rid)
                ex.respond(status, common + list(headers.items()), body)

    def _render(self, ex: Exchange, err: ProxyError, rid: str) -> None:
        request = ex.request
        status, headers, body = error_parts(dialect_for_path(request.path, request.headers), err, rid)
        ex.respond(status, response_headers(rid, request.headers.get("origin")) + list(headers.items()), body)

    def _relay_head(self, request: Request, client: str) -> bytes:
        """The request's headers for the aiohttp application, plus what only this server
        knows: the client's address, whether the browser spoke TLS (to this port, or to a
        trusted proxy in front), and the Host it asked for (dashboard cookies and Origin
        checks need them)."""
        headers = {
            name: value for name, value in request.headers.items() if name not in _HOP_BY_HOP and not name.startswith(RELAY_PREFIX)
        }
        host = request.headers.get("host", "")
        https = self._tls
        if self._client_address.trusted(request.remote):
            https = https or request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower() == "https"
            host = request.headers.get("x-forwarded-host", "").split(",")[0].strip() or host
        headers[RELAY_TOKEN] = self._state.relay_token
        headers[RELAY_PEER] = client
        headers[RELAY_PROTO] = "https" if https else "http"
        headers[RELAY_HOST] = host
        return encode_head(headers)

    async def _relay_internal(self, ex: Exchange, client: str, caller: _Caller) -> str:
        """Relay to the aiohttp application; returns the request id it chose (and sets the
        caller's key name, when the app authenticated one)."""
        request = ex.request
        head = self._relay_head(request, client)
        target = request.path + ("?" + request.query_string if request.query_string else "")
        # HEAD is asked as GET (our client expects a body) and answered without one.
        method = "GET" if request.method == "HEAD" else request.method
        try:
            resp = await self._internal.request(method, target, head, request.body)
            try:
                body = await resp.read_all(_INTERNAL_BODY_CAP)
            finally:
                resp.close()
        except UpstreamConnectionError:
            log.exception("the in-process application did not answer %s %s", method, request.path[:200])
            rid = fresh_request_id()
            self._render(ex, ProxyError("Internal error."), rid)
            return rid
        if resp.status == 401:  # a wrong client key (model lists, usage) or master key
            await self._auth_failed(client, request.started)
        key_name = resp.headers.get(KEY_NAME_HEADER)
        if key_name is not None:
            caller.name = unquote(key_name)
        headers = [
            (name, value) for name, value in resp.headers.items() if name not in _HOP_BY_HOP and name != KEY_NAME_HEADER
        ]
        ex.respond(resp.status, headers, b"" if request.method == "HEAD" else body)
        return resp.headers.get("x-request-id") or "-"
