"""Live configuration: re-read the config file and swap it in without a restart.

Triggered by SIGHUP, `POST /admin/reload` (master key) and `llm-proxy reload`. The file
is loaded and validated exactly as at start-up (the errors `check-config` prints); a
broken file changes nothing, and its error is logged and returned. A good one is swapped
in at once, in one step of the event loop: a request reads the router and the upstream
pool together before its first await, so requests in flight finish on the old
configuration and new ones use the new (proxy/forward.py `Forwarder.use`).

Reloadable: upstreams (keys, URLs, timeouts, headers), models, routes, prices,
fallbacks, limits.default_max_tokens, routing.breaker, auth.master_key. Everything else
(listen address, workers, storage, limits URL, ...) needs a restart: it is reported as
such and keeps its running value. Unchanged upstreams keep their connection pools;
replaced ones are closed once their last request is done. Breaker states are keyed by
names and survive a reload. One INFO line says what changed, naming keys, never values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Config, ConfigError, UpstreamConfig, load_config
from proxy.routing import Router
from proxy.upstream import UpstreamPool

log = logging.getLogger("llm_proxy.reload")

# Sections whose every key needs a restart, and single keys that do.
_RESTART_SECTIONS = ("server", "storage")
_RESTART_KEYS = (
    ("limits", "url"), ("limits", "fail_open"), ("auth", "cache_ttl_s"), ("auth", "negative_cache_ttl_s"),
    ("auth", "max_failures_per_min"), ("routing", "shared_sync_s"),
)
_RETIRE_POLL_S = 1.0
_RETIRE_MAX_S = 24 * 3600.0
MOCK_KEY = "mock-upstream-key"


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    changed: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()
    error: str | None = None

    @property
    def summary(self) -> str:
        if not self.ok:
            return f"config not reloaded: {self.error}"
        text = "config reloaded: " + ("; ".join(self.changed) if self.changed else "no changes")
        if self.restart_required:
            text += "; needs a restart to apply: " + ", ".join(self.restart_required)
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "reloaded" if self.ok else "error", "changed": list(self.changed),
            "restart_required": list(self.restart_required), "error": self.error, "summary": self.summary,
        }


def fill_pool(pool: UpstreamPool, cfg: Config, mock_base: str, old: UpstreamPool | None = None) -> list[str]:
    """Add a target per usable upstream of `cfg` (mock ones at `mock_base`), adopting
    `old`'s target where the upstream's config is unchanged. Returns the upstreams left
    out because they are mock ones and no mock server runs."""
    kept = {t.name: t for t in old.targets()} if old is not None else {}
    missing = []
    for u in cfg.upstreams:
        same = kept.get(u.name)
        if same is not None and same.config == u:
            pool.adopt(same)
        elif u.is_mock:
            if not mock_base:
                missing.append(u.name)
                continue
            pool.add(u, mock_base + ("/v1" if u.protocol == "openai" else ""), u.api_key or MOCK_KEY)
        elif u.api_key:
            pool.add(u, u.base_url, u.api_key)
    return missing


def effective(old: Config, new: Config) -> Config:
    """`new`, with the settings that need a restart kept at their running values."""
    return dataclasses.replace(
        new,
        server=old.server,
        storage=old.storage,
        limits=dataclasses.replace(new.limits, url=old.limits.url, fail_open=old.limits.fail_open),
        auth=dataclasses.replace(old.auth, master_key=new.auth.master_key),
        routing=dataclasses.replace(new.routing, shared_sync_s=old.routing.shared_sync_s),
    )


def differences(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(what changed, in words; keys that need a restart). Names keys, never values."""
    changed: list[str] = []
    restart = [
        f"{section}.{f.name}"
        for section in _RESTART_SECTIONS
        for f in dataclasses.fields(getattr(old, section))
        if getattr(getattr(old, section), f.name) != getattr(getattr(new, section), f.name)
    ]
    restart += [f"{s}.{k}" for s, k in _RESTART_KEYS if getattr(getattr(old, s), k) != getattr(getattr(new, s), k)]
    old_ups = {u.name: u for u in old.upstreams}
    new_ups = {u.name: u for u in new.upstreams}
    ups = _named_changes(old_ups, new_ups, _upstream_fields)
    if ups:
        changed.append("upstreams " + ups)
    old_models = {m.name: m for m in old.models}
    new_models = {m.name: m for m in new.models}
    models = _named_changes(old_models, new_models, _model_fields)
    if models:
        changed.append("models " + models)
    for section, keys in (("limits", ("default_max_tokens",)), ("auth", ("master_key",))):
        for k in keys:
            if getattr(getattr(old, section), k) != getattr(getattr(new, section), k):
                changed.append(f"{section}.{k}")
    if old.routing.breaker != new.routing.breaker:
        changed.append("routing.breaker")
    return changed, restart


def _upstream_fields(a: UpstreamConfig, b: UpstreamConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def _model_fields(a: Any, b: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def _named_changes(old: dict[str, Any], new: dict[str, Any], fields: Callable[[Any, Any], list[str]]) -> str:
    parts = [f"+{n}" for n in new if n not in old] + [f"-{n}" for n in old if n not in new]
    for n in new:
        if n in old and old[n] != new[n]:
            parts.append(f"~{n} ({', '.join(fields(old[n], new[n]))})")
    return " ".join(parts)


@dataclass
class Reloader:
    """Reloads one process. `apply` swaps the new router and pool in (the app's wiring);
    `parent_pid`: set in a --workers child, whose reload also asks the parent to reload
    every worker (the parent forwards SIGHUP; this worker finds nothing left to change)."""

    path: str | None
    current: Callable[[], tuple[Config, UpstreamPool]]
    apply: Callable[[Config, Router, UpstreamPool], None]
    mock_base: str = ""
    parent_pid: int | None = None
    # Called after every good reload, to read again the files the config names whose
    # contents may have changed under the same path (the TLS certificate: proxy/tls.py).
    reread: Callable[[], None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)

    async def reload(self, *, tell_parent: bool = False) -> ReloadResult:
        async with self._lock:
            result = self._reload()
        log.log(logging.INFO if result.ok else logging.ERROR, "%s", result.summary)
        if tell_parent and self.parent_pid is not None and result.ok:
            try:
                os.kill(self.parent_pid, signal.SIGHUP)
            except ProcessLookupError:
                pass
        return result

    def _reload(self) -> ReloadResult:
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            return ReloadResult(False, error=str(exc))
        old, old_pool = self.current()
        changed, restart = differences(old, new)
        cfg = effective(old, new)
        pool = UpstreamPool()
        missing = fill_pool(pool, cfg, self.mock_base, old_pool)
        if missing:
            for target in pool.targets():
                if target not in old_pool.targets():
                    self._retire(target.client)
            return ReloadResult(False, error=f"mock upstreams need a restart to start the mock provider: {', '.join(missing)}")
        router = Router(cfg)
        self.apply(cfg, router, pool)   # the swap: synchronous, one step of the loop
        kept = {id(t) for t in pool.targets()}
        for target in old_pool.targets():
            if id(target) not in kept:
                self._retire(target.client)
        if router.skipped:
            log.warning("models left out (their upstream has no credential): %s", ", ".join(router.skipped))
        if self.reread is not None:
            self.reread()
        return ReloadResult(True, tuple(changed), tuple(restart))

    def _retire(self, client: Any) -> None:
        task = asyncio.ensure_future(_close_when_idle(client))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """At shutdown: close the retired pools now (their requests were drained)."""
        for task in list(self._retiring):
            task.cancel()
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=5)


async def _close_when_idle(client: Any) -> None:
    """Close a replaced upstream's pool once no request uses it (checked twice in a row,
    so a request that took its plan just before the swap has started by then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _RETIRE_MAX_S
    quiet = 0
    try:
        while quiet < 2 and loop.time() < deadline:
            await asyncio.sleep(_RETIRE_POLL_S)
            quiet = quiet + 1 if client.in_use == 0 else 0
    finally:
        await client.close()
