"""Model name → upstream routes in attempt order. Only operator config chooses hosts;
client text never does.

A plan is the model's routes by priority tier (lower first), each tier in a weighted
random order, then each fallback model's routes the same way (DESIGN §7). Which of
them are cooling down is not the router's business: proxy/health arranges the plan.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from proxy.config import Config, ModelConfig, UpstreamConfig
from proxy.errors import InvalidRequest, ModelNotFound

log = logging.getLogger("llm_proxy.routing")


@dataclass(frozen=True)
class Route:
    model: ModelConfig
    upstream: UpstreamConfig
    upstream_model: str
    weight: float
    priority: int = 0
    # The route's identity for its circuit breaker: (upstream, upstream model). Made once:
    # it is read on every attempt.
    key: tuple[str, str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.upstream.name, self.upstream_model))


class Router:
    """Resolves a client model name to the routes that can serve it, in attempt order."""

    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._routes: dict[str, tuple[Route, ...]] = {}
        self._models: dict[str, ModelConfig] = {}
        self._fixed: dict[tuple[str, str, frozenset[str]], tuple[Route, ...]] = {}  # plans without a weighted pick
        self.skipped: list[str] = []
        for model in config.models:
            routes = []
            for r in model.routes:
                up = config.upstream(r.upstream)
                if not up.api_key and not up.is_mock:
                    continue
                routes.append(Route(model, up, r.model, r.weight, r.priority))
            if routes:
                self._routes[model.name] = tuple(routes)
                self._models[model.name] = model
            else:
                self.skipped.append(model.name)

    @property
    def models(self) -> list[ModelConfig]:
        return list(self._models.values())

    @property
    def routes(self) -> list[Route]:
        """Every route of every served model, in config order."""
        return [r for routes in self._routes.values() for r in routes]

    def first_route(self, name: str) -> Route:
        """The model's first route by priority (what the admin's route test calls)."""
        routes = self._routes.get(name)
        if not routes:
            raise ModelNotFound(f"The model '{_short(name)}' does not exist or is not served here.", param="model")
        return min(routes, key=lambda r: r.priority)

    def protocols(self, name: str) -> set[str]:
        return {r.upstream.protocol for r in self._routes.get(name, ())}

    def plan(self, name: str, protocol: str, translatable: frozenset[str] = frozenset()) -> tuple[Route, ...]:
        """The routes to try for `name` in order: a weighted pick first, then fallbacks.

        Routes whose upstream speaks `protocol`, or one of the `translatable` protocols
        the caller's endpoint can be translated to, are usable. Raises ModelNotFound for
        unknown names and InvalidRequest when no route is usable (an endpoint without
        translation, such as embeddings, on a model of another protocol).
        A plan with no weighted choice in it is made once and kept (the usual case).
        """
        fixed = self._fixed.get((name, protocol, translatable))
        if fixed is not None:
            return fixed
        routes = self._routes.get(name)
        if routes is None:
            raise ModelNotFound(f"The model '{_short(name)}' does not exist or is not served here.", param="model")
        usable = [r for r in routes if r.upstream.protocol == protocol or r.upstream.protocol in translatable]
        if not usable:
            others = ", ".join(sorted(self.protocols(name)))
            if translatable:   # the call translates, but not to these (Anthropic has no embeddings)
                served = ", ".join(sorted(translatable | {protocol}))
                message = (f"The model '{_short(name)}' is served by a {others} upstream, which has no API "
                           f"for this call; it needs a model served by a {served} upstream.")
            else:
                message = (f"The model '{_short(name)}' is served by a {others} upstream and cannot be called "
                           f"through the {protocol} API; call it through the {others} API.")
            raise InvalidRequest(message, param="model", code="dialect_mismatch")
        groups = _tiers(usable) + [
            tier
            for fb in self._models[name].fallbacks
            for tier in _tiers(
                [r for r in self._routes.get(fb, ()) if r.upstream.protocol == protocol or r.upstream.protocol in translatable]
            )
        ]
        plan = tuple(route for group in groups for route in self._weighted_order(group))
        if all(len(group) <= 1 for group in groups):
            self._fixed[(name, protocol, translatable)] = plan
        return plan

    def _weighted_order(self, routes: list[Route]) -> list[Route]:
        if len(routes) <= 1:
            return list(routes)
        remaining = list(routes)
        out: list[Route] = []
        while remaining:
            pick = self._rng.choices(remaining, weights=[r.weight for r in remaining])[0]
            out.append(pick)
            remaining.remove(pick)
        return out


def _tiers(routes: list[Route]) -> list[list[Route]]:
    """The routes grouped by priority, lowest first (config order kept inside a tier)."""
    by: dict[int, list[Route]] = {}
    for r in routes:
        by.setdefault(r.priority, []).append(r)
    return [by[p] for p in sorted(by)]


def _short(name: str) -> str:
    """Echo at most a short, printable prefix of client text in messages."""
    clean = "".join(c if c.isprintable() else "?" for c in name[:64])
    return clean + ("…" if len(name) > 64 else "")
