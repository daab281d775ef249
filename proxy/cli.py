"""The `llm-proxy` command line (DESIGN §2, a contract)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson

from proxy.config import Config, ConfigError, load_config, masked
from proxy.mock_upstream import MockOptions, run_mock
from proxy.server import configure_logging, install_uvloop, run
from proxy.store import open_store
from proxy.store.base import DuplicateName, KeyLimits, Store, StoreError
from proxy.views import MAX_DAYS, check_limits, check_name, key_json, parse_since, usage_json


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str("" if r.get(c) is None else r.get(c)).ljust(widths[c]) for c in cols))


# ---------------------------------------------------------------------- commands


async def _with_store(url: str, fn: Any) -> Any:
    store: Store = open_store(url)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def cmd_keys(args: argparse.Namespace, url: str, cache_ttl_s: float = 5.0) -> int:
    if args.keys_cmd == "create":
        days = args.expires_in_days
        try:
            check_name(args.name)
            if days is not None and not 0 <= days <= MAX_DAYS:
                raise ValueError(f"--expires-in-days must be from 0 to {MAX_DAYS}")
            limits = check_limits(
                KeyLimits(
                    models=tuple(dict.fromkeys(m.strip() for m in (args.models or "").split(",") if m.strip())),
                    rpm=args.rpm,
                    tpm=args.tpm,
                    max_parallel=args.max_parallel,
                    budget_usd=args.budget_usd,
                    budget_period=args.budget_period,
                    expires_at=time.time() + days * 86400 if days is not None else None,
                )
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            record, key = asyncio.run(_with_store(url, lambda s: s.create_key(args.name, limits)))
        except DuplicateName:
            print(f"error: a key named {args.name!r} already exists", file=sys.stderr)
            return 1
        if args.json:
            _print_json({**key_json(record), "key": key})
        else:
            print(f"Created key '{record.name}' ({record.id}). It is shown only this once:\n\n  {key}\n")
        return 0
    if args.keys_cmd == "list":
        keys = asyncio.run(_with_store(url, lambda s: s.list_keys()))
        rows = [key_json(k) for k in keys]
        if args.json:
            _print_json(rows)
        else:
            _table(rows, ("id", "name", "prefix", "models", "rpm", "tpm", "max_parallel", "budget_usd", "expires_at", "revoked_at"))
        return 0
    record = asyncio.run(_with_store(url, lambda s: s.revoke_key(args.id_or_name)))
    if record is None:
        print(f"error: no key {args.id_or_name!r}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(key_json(record))
    else:
        print(f"Revoked key '{record.name}' ({record.id}). It stops working within the auth cache time ({cache_ttl_s:g} s).")
    return 0


def cmd_usage(args: argparse.Namespace, url: str) -> int:
    since = args.since
    if args.by:
        rows = asyncio.run(_with_store(url, lambda s: s.summarize_usage(since, args.by)))
        if args.json:
            _print_json(rows)
        else:
            _table(rows, ("group", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "estimated"))
        return 0
    records = asyncio.run(_with_store(url, lambda s: s.list_usage(since)))
    if args.json:
        _print_json([usage_json(r) for r in records])
    else:
        rows = [usage_json(r) for r in records]
        _table(rows, ("ts", "key_name", "model", "endpoint", "status", "prompt_tokens", "completion_tokens", "cost_usd", "estimated", "outcome"))
    return 0


def cmd_reload(config: Config, host: str | None = None, port: int | None = None) -> int:
    """Ask the running server (this config's listen address, or --host/--port) to reload
    its config file, through POST /admin/reload with the master key; with --workers N,
    every worker reloads."""
    master = config.auth.master_key
    if not master:
        print("error: reload needs auth.master_key (the admin API is off without it)", file=sys.stderr)
        return 2
    host = host or config.server.host
    port = port or config.server.port
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    req = urllib.request.Request(
        f"http://{host}:{port}/admin/reload", data=b"{}", method="POST",
        headers={"Authorization": f"Bearer {master}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            doc = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = orjson.loads(exc.read())["error"]["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = f"status {exc.code}"
        print(f"error: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: no server answered on {host}:{port} ({type(exc).__name__})", file=sys.stderr)
        return 1
    print(doc.get("summary", "reloaded"))
    return 0


def _since_arg(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--since: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    # --config is accepted at every level (`llm-proxy --config F keys list`, `keys --config F
    # list`, `keys list --config F`). SUPPRESS: a nested parser that did not see the option
    # must not reset what an outer one parsed; main() reads it with a None default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="config file (default: $LLM_PROXY_CONFIG, ./config/proxy.yaml, built-in)"
    )
    p = argparse.ArgumentParser(prog="llm-proxy", description="An LLM API gateway.", parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the gateway")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)

    k = sub.add_parser("keys", parents=[common], help="manage virtual keys")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", parents=[common])
    kc.add_argument("--name", required=True)
    kc.add_argument("--models", help="comma-separated allowlist (default: every model)")
    kc.add_argument("--rpm", type=int)
    kc.add_argument("--tpm", type=int)
    kc.add_argument("--max-parallel", type=int)
    kc.add_argument("--budget-usd", type=float)
    kc.add_argument("--budget-period", choices=("day", "month"))
    kc.add_argument("--expires-in-days", type=float)
    kc.add_argument("--json", action="store_true")
    kl = ksub.add_parser("list", parents=[common])
    kl.add_argument("--json", action="store_true")
    kr = ksub.add_parser("revoke", parents=[common])
    kr.add_argument("id_or_name")
    kr.add_argument("--json", action="store_true")

    u = sub.add_parser("usage", parents=[common], help="show recorded usage")
    u.add_argument("--since", type=_since_arg, default="24h")
    u.add_argument("--by", choices=("key", "model", "day"))
    u.add_argument("--json", action="store_true")

    m = sub.add_parser("mock-upstream", parents=[common], help="run a fake OpenAI/Anthropic/Gemini provider")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=9000)
    m.add_argument("--chunks", type=int, default=MockOptions().chunks)
    m.add_argument("--chunk-delay-ms", type=float, default=0.0)
    m.add_argument("--ttfb-ms", type=float, default=0.0)

    sub.add_parser("check-config", parents=[common], help="validate and print the resolved config, secrets masked")
    rl = sub.add_parser("reload", parents=[common], help="tell the running server to re-read its config file")
    rl.add_argument("--host", help="the server's address (default: server.host)")
    rl.add_argument("--port", type=int, help="the server's port (default: server.port; as given to serve --port)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    configure_logging()
    if args.cmd == "mock-upstream":
        install_uvloop()
        opts = MockOptions(chunks=args.chunks, chunk_delay_s=args.chunk_delay_ms / 1000, ttfb_s=args.ttfb_ms / 1000)
        try:
            asyncio.run(run_mock(args.host, args.port, opts))
        except KeyboardInterrupt:
            pass
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "check-config":
            _print_json(masked(config))
            return 0
        if args.cmd == "reload":
            return cmd_reload(config, args.host, args.port)
        if args.cmd == "serve":
            host = args.host or config.server.host
            port = args.port or config.server.port
            return run(config, args.config, host, port, args.workers or config.server.workers)
        if args.cmd == "keys":
            return cmd_keys(args, config.storage.url, config.auth.cache_ttl_s)
        if args.cmd == "usage":
            return cmd_usage(args, config.storage.url)
    except StoreError as exc:
        print(f"error: the store is unavailable: {exc}", file=sys.stderr)
        return 1
    return 2
