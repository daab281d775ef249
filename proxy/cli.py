"""The `llm-proxy` command line (DESIGN §2, a contract)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from proxy.admin_stats import OUTCOMES, USAGE_CSV_COLUMNS
from proxy.config import Config, ConfigError, describe_store, load_config, masked, resolve_path, sqlite_path
from proxy.logs import configure_logging
from proxy.mock_upstream import MockOptions, run_mock
from proxy.server import install_uvloop, run
from proxy.store import ledger, open_store
from proxy.store.base import DuplicateName, KeyLimits, KeyRevoked, Store, StoreError, UsageFilter
from proxy.tls import ServerTls
from proxy.views import (
    MAX_DAYS,
    check_limits,
    check_name,
    csv_text,
    iso,
    key_json,
    parse_since,
    parse_until,
    usage_json,
)

DEFAULT_USAGE_LIMIT = 100
_LIMIT_FIELDS = ("models", "rpm", "tpm", "max_parallel", "budget_usd", "budget_period", "expires_at")


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


def _models_arg(text: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m.strip() for m in (text or "").split(",") if m.strip()))


def _check_models(models: tuple[str, ...], known: frozenset[str], force: bool) -> None:
    """A typo in --models would lock the key out of the model it was made for."""
    unknown = [m for m in models if m not in known]
    if unknown and not force:
        raise ValueError(f"unknown model {unknown[0]!r} in --models (not in the config); add --force to allow it")


def _expiry(days: float | None) -> float | None:
    if days is None:
        return None
    if not 0 <= days <= MAX_DAYS:
        raise ValueError(f"--expires-in-days must be from 0 to {MAX_DAYS}")
    return time.time() + days * 86400


def cmd_keys(args: argparse.Namespace, url: str, cache_ttl_s: float = 5.0, known_models: frozenset[str] = frozenset()) -> int:
    if args.keys_cmd == "create":
        try:
            check_name(args.name)
            models = _models_arg(args.models)
            limits = check_limits(
                KeyLimits(
                    models=models,
                    rpm=args.rpm,
                    tpm=args.tpm,
                    max_parallel=args.max_parallel,
                    budget_usd=args.budget_usd,
                    budget_period=args.budget_period,
                    expires_at=_expiry(args.expires_in_days),
                )
            )
            _check_models(models, known_models, args.force)
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
            _table(rows, ("id", "name", "prefix", "models", "rpm", "tpm", "max_parallel", "budget_usd", "expires_at",
                          "revoked_at", "last_used_at"))
        return 0
    if args.keys_cmd == "update":
        return _keys_update(args, url, cache_ttl_s, known_models)
    if args.keys_cmd == "rotate":
        return _keys_rotate(args, url, cache_ttl_s)
    record = asyncio.run(_with_store(url, lambda s: s.revoke_key(args.id_or_name)))
    if record is None:
        print(f"error: no key {args.id_or_name!r}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(key_json(record))
    else:
        print(f"Revoked key '{record.name}' ({record.id}). It stops working within the auth cache time ({cache_ttl_s:g} s);"
              " its name is free for a new key.")
    return 0


_UNSET = object()


def _keys_update(args: argparse.Namespace, url: str, cache_ttl_s: float, known_models: frozenset[str]) -> int:
    """Options left out keep their value; `none` clears a limit (and --models "" allows every model)."""

    async def update(store: Store) -> Any:
        record = await store.get_key(args.id_or_name)
        if record is None:
            return None
        changes: dict[str, Any] = {
            name: value
            for name, value in (
                ("rpm", args.rpm), ("tpm", args.tpm), ("max_parallel", args.max_parallel),
                ("budget_usd", args.budget_usd), ("budget_period", args.budget_period),
            )
            if value is not _UNSET
        }
        if args.models is not None:
            changes["models"] = _models_arg(args.models)
            _check_models(changes["models"], known_models, args.force)
        if args.expires_in_days is not _UNSET:
            changes["expires_at"] = _expiry(args.expires_in_days)
        limits = check_limits(replace(KeyLimits(**{f: getattr(record, f) for f in _LIMIT_FIELDS}), **changes))
        return await store.update_key(record.id, limits)

    try:
        record = asyncio.run(_with_store(url, update))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if record is None:
        print(f"error: no key {args.id_or_name!r}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(key_json(record))
    else:
        print(f"Updated key '{record.name}' ({record.id}). The running server applies it within the auth cache time"
              f" ({cache_ttl_s:g} s).")
    return 0


def _keys_rotate(args: argparse.Namespace, url: str, cache_ttl_s: float) -> int:
    try:
        rotated = asyncio.run(_with_store(url, lambda s: s.rotate_key(args.id_or_name)))
    except KeyRevoked:
        print(f"error: key {args.id_or_name!r} is revoked; create a new key instead", file=sys.stderr)
        return 1
    if rotated is None:
        print(f"error: no key {args.id_or_name!r}", file=sys.stderr)
        return 1
    record, key = rotated
    if args.json:
        _print_json({**key_json(record), "key": key})
    else:
        print(
            f"Rotated key '{record.name}' ({record.id}): same id, name and limits, new secret. It is shown only this"
            f" once:\n\n  {key}\n\nThe old secret stops working within the auth cache time ({cache_ttl_s:g} s) in"
            " running servers."
        )
    return 0


USAGE_COLUMNS = ("ts", "key_name", "model", "endpoint", "status", "prompt_tokens", "completion_tokens", "cost_usd",
                 "estimated", "outcome")
GROUP_COLUMNS = ("group", "requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
                 "estimated")


def cmd_usage(args: argparse.Namespace, url: str) -> int:
    async def run(store: Store) -> int:
        key_id = None
        if args.key:
            record = await store.get_key(args.key)
            if record is None:
                print(f"error: no key {args.key!r}", file=sys.stderr)
                return 1
            key_id = record.id
        f = UsageFilter(since=args.since, until=args.until, key_id=key_id, model=args.model, outcome=args.outcome)
        if args.by:
            rows = await store.usage_groups(f, args.by)
            for r in rows:
                r["last_ts"] = iso(r["last_ts"])
            if args.by == "key_model":
                cols: Sequence[str] = ("key_name", "model", *GROUP_COLUMNS[1:])
            else:
                cols = GROUP_COLUMNS
            if args.json:
                # The original fields for key, model and day; key_model rows carry their own.
                _print_json(ledger.legacy_summary(rows) if args.by in ("key", "model", "day") else rows)
            elif args.format == "csv":
                sys.stdout.write(csv_text(rows, list(rows[0]) if rows else list(cols)))
            else:
                _table(rows, cols)
            return 0
        if args.format == "csv" and args.limit is None:
            # Every matching record, a page at a time.
            after = None
            header = True
            while True:
                page = await store.page_usage(f, 5000, after)
                sys.stdout.write(csv_text([usage_json(r) for r in page], USAGE_CSV_COLUMNS, header=header))
                header = False
                if len(page) < 5000:
                    return 0
                after = (page[-1].ts, page[-1].id)
        limit = args.limit or DEFAULT_USAGE_LIMIT
        records = await store.page_usage(f, limit + 1, None)
        page, more = records[:limit], len(records) > limit
        rows = [usage_json(r) for r in page]
        if args.json:
            _print_json(rows)
        elif args.format == "csv":
            sys.stdout.write(csv_text(rows, USAGE_CSV_COLUMNS))
        else:
            _table(rows, USAGE_COLUMNS)
        if more:
            print(
                f"note: showing the newest {limit} records; older ones match too (raise --limit, or use --until"
                f" {iso(page[-1].ts)})",
                file=sys.stderr,
            )
        return 0

    rc: int = asyncio.run(_with_store(url, run))
    return rc


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


def _until_arg(text: str) -> float:
    try:
        return parse_until(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--until: {exc}") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("--limit must be a positive integer")
    return int(text)


def _or_none(kind: Any) -> Any:
    """For `keys update`: a value of `kind`, or `none` to clear the limit."""

    def parse(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None

    return parse


def _int_arg(flag: str, low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{flag}: must be from {low} to {high}, got {value}")
        return value

    return parse


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
    s.add_argument("--port", type=_int_arg("--port", 0, 65535))
    s.add_argument("--workers", type=_int_arg("--workers", 1, 1024))

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
    kc.add_argument("--force", action="store_true", help="allow --models names the config does not know")
    kr = ksub.add_parser("revoke", parents=[common], help="revoke a key for good (its name becomes free)")
    kr.add_argument("id_or_name")
    kr.add_argument("--json", action="store_true")
    kt = ksub.add_parser("rotate", parents=[common], help="new secret for a key: same id, name and limits")
    kt.add_argument("id_or_name")
    kt.add_argument("--json", action="store_true")
    ku = ksub.add_parser("update", parents=[common], help="change a key's limits, models or expiry (none clears)")
    ku.add_argument("id_or_name")
    ku.add_argument("--models", help='comma-separated allowlist ("" for every model)')
    ku.add_argument("--rpm", type=_or_none(int), default=_UNSET)
    ku.add_argument("--tpm", type=_or_none(int), default=_UNSET)
    ku.add_argument("--max-parallel", type=_or_none(int), default=_UNSET)
    ku.add_argument("--budget-usd", type=_or_none(float), default=_UNSET)
    ku.add_argument("--budget-period", type=_or_none(str), choices=("day", "month", None), default=_UNSET,
                    metavar="{day,month,none}")
    ku.add_argument("--expires-in-days", type=_or_none(float), default=_UNSET)
    ku.add_argument("--force", action="store_true", help="allow --models names the config does not know")
    ku.add_argument("--json", action="store_true")

    u = sub.add_parser("usage", parents=[common], help="show recorded usage, newest first")
    u.add_argument("--since", type=_since_arg, default="24h")
    u.add_argument("--until", type=_until_arg, help="end of the range (ISO, unix seconds or 1h-style), exclusive")
    u.add_argument("--by", choices=("key", "model", "day", "key_model"))
    u.add_argument("--key", help="only this key (id or name)")
    u.add_argument("--model", help="only this model (as clients ask for it)")
    u.add_argument("--outcome", choices=OUTCOMES, help="only this outcome (error: upstream_error or timeout)")
    u.add_argument("--limit", type=_positive, help=f"at most N records (default {DEFAULT_USAGE_LIMIT}; all for csv)")
    out = u.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--format", choices=("table", "csv"), default="table")

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


def _new_database(url: str) -> Path | None:
    """The SQLite file a command is about to create (None: it exists, or no SQLite)."""
    path = sqlite_path(url)
    return path if path is not None and not path.exists() else None


def _note_new_database(path: Path | None, where: str) -> None:
    """`keys` or `usage` that made a new, empty SQLite database most likely read another
    config than the server (or the server never ran): say which, on stderr."""
    if path is not None and path.exists():
        print(f"note: there was no database at {path}: a new, empty one was made ({where})", file=sys.stderr)


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
    configure_logging(fmt=config.server.log_format)
    where = f"config {resolve_path(args.config)}; keys and usage in {describe_store(config.storage.url)}"
    try:
        if args.cmd == "check-config":
            print(where, file=sys.stderr)  # stdout holds the JSON document alone
            if config.server.tls is not None:
                try:
                    ServerTls(config.server.tls)  # the files `serve` would refuse to start with
                except OSError as exc:  # ssl.SSLError is one
                    print(f"config error: server.tls: cannot load the certificate and key: {exc}", file=sys.stderr)
                    return 2
            _print_json(masked(config))
            return 0
        if args.cmd == "reload":
            return cmd_reload(config, args.host, args.port)
        if args.cmd == "serve":
            logging.getLogger("llm_proxy.cli").info("%s; usage spool %s", where, config.storage.spool_path)
            host = args.host or config.server.host
            port = args.port or config.server.port
            return run(config, args.config, host, port, args.workers or config.server.workers)
        new_db = _new_database(config.storage.url)
        if args.cmd == "keys":
            rc = cmd_keys(args, config.storage.url, config.auth.cache_ttl_s, frozenset(m.name for m in config.models))
        elif args.cmd == "usage":
            rc = cmd_usage(args, config.storage.url)
        else:
            return 2
        if rc == 0:
            _note_new_database(new_db, where)
        return rc
    except StoreError as exc:
        print(f"error: the store is unavailable: {exc}", file=sys.stderr)
        return 1
