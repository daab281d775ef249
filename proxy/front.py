"""The data plane's entry: every client connection's requests land here.

`Front.handle` is the handler of the lean HTTP/1.1 server (proxy/http1/server.py): it
resolves the route (method and raw path) to one of the chains proxy/gateway.py composed,
and runs it on a fresh `Call`. Every client route (model calls, model lists, usage,
health, preflights, 404/405) is served by its chain right here. The control plane's
paths (`/admin/*`, `/metrics`, `/ui/`) take the relay chain: the request goes on over an
in-process socket pair to the aiohttp application (proxy/control.py), which keeps its
own router and middlewares there.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from proxy.access_log import AccessLog
from proxy.dialects import GEMINI_MODEL_PREFIXES, MODEL_PATHS, OPENAI, Dialect, model_endpoint
from proxy.errors import InvalidRequest, NotFound, ProxyError, RequestTooLarge, ServiceUnavailable
from proxy.http1.client import Http1Client, UpstreamConnectionError
from proxy.http1.server import Exchange, Refusal, Request
from proxy.middleware.auth import Authenticate
from proxy.middleware.auth_failures import AuthFailures, ClientAddress, TooManyAuthFailures, tarpit
from proxy.middleware.context import dialect_for_path, error_parts, fresh_request_id, new_request_id, response_headers
from proxy.middleware.session import RELAY_HOST, RELAY_PEER, RELAY_PREFIX, RELAY_PROTO, RELAY_TOKEN
from proxy.pipeline import Call, Next
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
# Paths with a GET route below a prefix (the model named in the path).
_MODEL_PREFIXES = ("/v1/models/", "/v1beta/models/")


@dataclass(frozen=True)
class Routes:
    """The composed chains, one per kind of route (built in proxy/gateway.py)."""

    model_call: Next                    # POST on a model path
    get: Mapping[str, Next]             # GET (and HEAD) by exact path
    get_model: Next                     # GET below _MODEL_PREFIXES
    control: Callable[[str], bool]      # whether a path is the control plane's
    relay: Next                         # ... and its chain
    preflight: Next                     # OPTIONS
    not_found: Next
    method_not_allowed: Next
    refuse: Callable[[ProxyError], Next]   # a chain that answers this error

    def table(self) -> list[tuple[str, str]]:
        """(method, path pattern) of every client route, for audits and docs."""
        rows = [("POST", path) for path in MODEL_PATHS]
        rows += [("POST", prefix + "{tail}") for prefix in GEMINI_MODEL_PREFIXES]
        rows += [("GET", path) for path in self.get]
        rows += [("GET", prefix + "{model}") for prefix in _MODEL_PREFIXES]
        return rows

    def resolve(self, call: Call) -> Next:
        """The chain for `call`'s request; sets the caller's dialect (a model call's is its
        endpoint's; other routes' come from the path, and on /v1/models the headers)."""
        request = call.ex.request
        method, path = request.method, request.path
        refusal: Next | None = None
        if method == "POST" and not self.control(path):
            try:
                found = model_endpoint(path)
            except NotFound as err:   # an unknown Gemini method
                refusal = self.refuse(err)
            else:
                if found is not None:
                    call.endpoint, call.path_model = found
                    call.dialect = found[0].dialect
                    return self.model_call
        call.dialect = dialect_for_path(path, request.headers, request.query_string)
        return refusal if refusal is not None else self._other(method, path)

    def _other(self, method: str, path: str) -> Next:
        """The chain of any route but a model call."""
        if self.control(path):
            return self.relay
        if method in ("GET", "HEAD"):
            chain = self.get.get(path)
            if chain is not None:
                return chain
            if _below(path, _MODEL_PREFIXES):
                return self.get_model
        elif method == "OPTIONS":
            return self.preflight
        if path in self.get or path in MODEL_PATHS or _below(path, GEMINI_MODEL_PREFIXES):
            return self.method_not_allowed
        return self.not_found


def _below(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `path` names something below one of `prefixes` (not the prefix itself)."""
    return any(path.startswith(prefix) and len(path) > len(prefix) for prefix in prefixes)


class Brake:
    """The brute-force brake (RELIABILITY B6) where authentication fails: a failure is
    counted; past the address's limit it is answered 429 after a pause (`tarpit`). A
    valid key is never braked."""

    def __init__(self, failures: AuthFailures) -> None:
        self._failures = failures

    async def failed(self, client: str, now: float) -> None:
        try:
            self._failures.check(client, now)
        except TooManyAuthFailures:
            await tarpit()
            raise
        self._failures.failed(client, now)


class _Refused:
    """`Request.admitted` of a request the head check refused: for its access-log line."""

    __slots__ = ("client", "rid")

    def __init__(self, client: str, rid: str) -> None:
        self.client = client
        self.rid = rid


class Front:
    def __init__(
        self, routes: Routes, client_address: ClientAddress, authenticate: Authenticate, access_log: AccessLog | None
    ) -> None:
        self._routes = routes
        self._client_address = client_address
        self._authenticate = authenticate
        self._access_log = access_log

    async def handle(self, ex: Exchange) -> None:
        request = ex.request
        client = self._client_address(request.remote, request.headers.get("x-forwarded-for"))
        call = Call(ex, OPENAI, client)   # the caller's dialect is the route's: set by resolve
        await self._routes.resolve(call)(call)

    def head_check(self, request: Request) -> Awaitable[Refusal | None] | None:
        """For a model call: check the key before the body is read (the server's HeadCheck),
        so a caller without a valid key never makes the gateway hold its body (RELIABILITY D5)."""
        if request.method != "POST" or self._routes.control(request.path):
            return None
        try:
            found = model_endpoint(request.path)
        except NotFound:
            return None  # answered by handle() once the (bounded) body is in
        if found is None:
            return None
        dialect = found[0].dialect
        # A key the cache knows as valid is admitted here, without a task or a pause: the
        # hot path's cost stays that of one cache lookup. Anything else is looked up (and
        # refused) with reading paused.
        key = self._authenticate.key_now(request, dialect)
        if key is not None:
            request.admitted = key
            return None
        return self._check_key(request, dialect)

    async def _check_key(self, request: Request, dialect: Dialect) -> Refusal | None:
        client = self._client_address(request.remote, request.headers.get("x-forwarded-for"))
        try:
            request.admitted = await self._authenticate.key_of(request, dialect, client)
            return None
        except ProxyError as err:
            rid = new_request_id(request.headers.get("x-request-id"))
            request.admitted = _Refused(client, rid)
            status, headers, body = error_parts(dialect, err, rid)
            return Refusal(status, response_headers(rid, request.headers.get("origin")) + list(headers.items()), body)

    def on_done(self, ex: Exchange) -> None:
        """The server's on_done: the access-log line of a request the head check refused
        (the chain's access-log stage logs every other one)."""
        refused = ex.request.admitted
        if isinstance(refused, _Refused) and self._access_log is not None:
            self._access_log.line(ex, refused.client, "-", refused.rid)


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


# ---------------------------------------------------------------------- the relay


class Relay:
    """The last stage of the control plane's chain: the request goes on to the aiohttp
    application, the answer comes back as it is (its own request id, headers, errors)."""

    def __init__(
        self, internal: Http1Client, client_address: ClientAddress, relay_token: str, brake: Brake, *, tls: bool = False
    ) -> None:
        self._tls = tls  # this server's own port speaks HTTPS (server.tls)
        self._internal = internal
        self._brake = brake
        self._client_address = client_address
        self._relay_token = relay_token   # proves to the control plane that the x-llm-proxy-* headers are ours

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
        headers[RELAY_TOKEN] = self._relay_token
        headers[RELAY_PEER] = client
        headers[RELAY_PROTO] = "https" if https else "http"
        headers[RELAY_HOST] = host
        return encode_head(headers)

    async def __call__(self, call: Call) -> None:
        ex = call.ex
        request = ex.request
        head = self._relay_head(request, call.client)
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
            raise ProxyError("Internal error.") from None
        if resp.status == 401:  # a wrong master key: braked like a wrong client key
            await self._brake.failed(call.client, request.started)
        headers = [(name, value) for name, value in resp.headers.items() if name not in _HOP_BY_HOP]
        call.request_id = resp.headers.get("x-request-id") or "-"
        ex.respond(resp.status, headers, b"" if request.method == "HEAD" else body)

    async def close(self) -> None:
        await self._internal.close()


def internal_connector(runner: web.AppRunner) -> Callable[[Callable[[], asyncio.Protocol]], Awaitable[tuple[asyncio.Transport, asyncio.Protocol]]]:
    """Connections to the aiohttp application over socket pairs: no port, no network."""

    async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, asyncio.Protocol]:
        server = runner.server
        if server is None:   # not set up yet, or cleaned up
            raise ConnectionRefusedError("the control plane is not running")
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        await loop.connect_accepted_socket(server, theirs)
        transport, protocol = await loop.create_connection(factory, sock=ours)
        return transport, protocol

    return connect
