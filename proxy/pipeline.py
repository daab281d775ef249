"""The data plane's request pipeline: the `Call` every stage works on, and the fold.

A stage is one of two shapes:

* a middleware, `async def mw(call, call_next)` (or an object with that `__call__`): it
  acts around `await call_next(call)` (after it, or in `except` / `finally`), or answers
  the call itself and does not go on;
* a step, `Before(step)`: it acts only before the rest of the chain (checks or fills
  the call, or raises to refuse it). `step(call)` returns None when it is done, or an
  awaitable when it must wait (a key lookup, a limiter round trip); the chain goes on
  after it. A step that need not wait costs a function call, not a coroutine (most of a
  model call's stages are steps: bench/RESULTS.md, "CPU per same-dialect request").

`compose` folds an ordered list of stages around a handler once, at start-up (the
chains are composed in proxy/gateway.py), as starlette's `build_middleware_stack` and
aiohttp's middlewares do. Handlers write to `call.ex` (proxy/http1/server.py); a stage
that fails raises a ProxyError, which the request-context stage renders once, in the
caller's dialect (proxy/middleware/context.py).

`Call` is one mutable object per request: each stage fills the fields it owns (listed
by section below) and later stages read them. Model calls use every section; the other
routes only the first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import FunctionType, MethodType
from typing import Any, Protocol, TypeVar, cast

from proxy.dialects import Dialect, Endpoint
from proxy.http1.server import Exchange
from proxy.limits.base import Reservation
from proxy.metering.base import Meter
from proxy.routing import Route
from proxy.store.base import KeyRecord, Outcome, UsageRecord
from proxy.upstream import UpstreamPool

Next = Callable[["Call"], Awaitable[None]]
Step = Callable[["Call"], "Awaitable[None] | None"]
_C = TypeVar("_C", bound=Callable[..., Any])


class Middleware(Protocol):
    def __call__(self, call: Call, call_next: Next) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class Before:
    """A stage that acts only before the rest of the chain (see the module's doc)."""

    step: Step


Stage = Middleware | Before

HeaderList = list[tuple[str, str]]


@dataclass(slots=True, eq=False)
class Call:
    """One client request on its way through the chain."""

    ex: Exchange
    dialect: Dialect                   # the caller's: errors are written in it
    client: str                        # the client's address (proxy/middleware/auth_failures.py)
    endpoint: Endpoint | None = None   # model calls: the endpoint the path names
    path_model: str | None = None      # Gemini: the model named in the path
    # request context (middleware/context.py)
    request_id: str = "-"              # x-request-id of the answer
    headers: HeaderList = field(default_factory=list)   # on every answer: request id, CORS
    # auth (middleware/auth.py)
    key: KeyRecord | None = None
    # usage accounting (middleware/accounting.py)
    record_id: str = ""                # of the usage records and the limit reservation
    started: float = 0.0
    records: list[UsageRecord] = field(default_factory=list)
    # the model request, parsed once (middleware/model_request.py)
    body: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    stream: bool = False
    plan: tuple[Route, ...] = ()
    upstreams: UpstreamPool | None = None   # the pool the plan was made with (one config per call)
    prompt_estimate: int = 0
    max_output: int = 0
    # limits (middleware/limits.py)
    reservation: Reservation | None = None
    limit_lines: bytes = b""           # x-ratelimit-* header lines, encoded
    # the current upstream attempt (proxy/forward.py): one usage record each
    route: Route | None = None
    attempt: int = 0
    status: int = 0
    ttft_ms: float | None = None
    outcome: Outcome = "ok"
    error: str | None = None
    meter: Meter | None = None
    output_bound: int | None = None    # the most output tokens the request allows, if it says
    emitted: bool = False              # the current attempt's record went out


def compose(stages: Sequence[Stage], handler: Next) -> Next:
    """`stages[0]` outermost, `handler` innermost: one callable per request."""
    app: Next = _direct(handler)
    for stage in reversed(stages):
        app = _then(_direct(stage.step), app) if isinstance(stage, Before) else _bind(_direct(stage), app)
    return app


def _bind(stage: Callable[[Call, Next], Awaitable[None]], call_next: Next) -> Next:
    """`stage` with its `call_next` bound: a plain (not async) function that returns the
    stage's coroutine, so binding costs no coroutine. Not a partial with a keyword, which
    copies and unpacks a dict on every call."""

    def app(call: Call) -> Awaitable[None]:
        return stage(call, call_next)

    return app


def _then(step: Step, call_next: Next) -> Next:
    """`step`, then the rest of the chain. A plain function: a step that does not wait
    adds no coroutine, and what it raises comes out of the `call_next(call)` of the
    stage before it, as it would from an await."""

    def app(call: Call) -> Awaitable[None]:
        waiting = step(call)
        return call_next(call) if waiting is None else _waited(waiting, call_next, call)

    return app


async def _waited(waiting: Awaitable[None], call_next: Next, call: Call) -> None:
    await waiting
    await call_next(call)


def _direct(obj: _C) -> _C:
    """An instance of a Python class with `__call__` as its bound method, found once: called
    through its type's slot, the method would be looked up and bound on every call."""
    for klass in type(obj).__mro__:
        method = vars(klass).get("__call__")
        if method is not None:
            return cast(_C, MethodType(method, obj)) if isinstance(method, FunctionType) else obj
    return obj
