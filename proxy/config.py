"""Configuration: YAML into frozen dataclasses (DESIGN §3, a contract).

- `${VAR}` and `${VAR:-default}` are expanded from the environment in every string
  scalar, before the value is converted to the field's type.
- Unknown keys and wrong types are errors that name the key's path and line.
- Secrets (fields named in `SECRET_FIELDS`) are masked by `masked()`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

PROTOCOLS = ("openai", "anthropic", "gemini")
# Provider kinds that call an upstream of a protocol differently (proxy/dialects): Azure
# OpenAI's deployment URLs, api-version and api-key header.
KINDS = ("azure",)
LOG_FORMATS = ("text", "json")
# `base_url: mock://` makes the gateway start its built-in mock provider in-process
# on a loopback port and send that upstream's traffic there (the offline demo).
MOCK_BASE_URL = "mock://"
SECRET_FIELDS = frozenset({"api_key", "master_key", "url"})


class ConfigError(ValueError):
    """A configuration problem, with the key path and line where it was found."""


def _bounded(default: Any, low: float | None = None, high: float | None = None, *, above: bool = False) -> Any:
    """A numeric field with its valid range, checked where the file sets it (so the error
    names the line): `low <= value <= high`, or `value > low` when `above`."""
    return field(default=default, metadata={"low": low, "high": high, "above": above})


def _non_negative(default: Any) -> Any:
    return _bounded(default, 0)


def _positive(default: Any) -> Any:
    return _bounded(default, 0, above=True)


@dataclass(frozen=True)
class TlsConfig:
    """HTTPS on the gateway's own port: a PEM certificate chain and its private key
    (relative paths: against the config file's directory). Re-read on reload."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = _bounded(8080, 0, 65535)  # 0: any free port
    workers: int = _bounded(1, 1, 1024)
    max_body_mb: float = _positive(32)
    shutdown_grace_s: float = _non_negative(30)
    keepalive_s: float = _positive(60)
    # A request head must arrive within this, and a body may not pause longer (slowloris).
    head_timeout_s: float = _positive(10)
    # A client that stops reading a response for this long is disconnected (its stream
    # is billed for what was delivered).
    write_stall_s: float = _positive(60)
    max_line_size: int = _bounded(8190, 1)
    max_field_size: int = _bounded(8190, 1)
    max_headers: int = _bounded(100, 1)
    access_log: bool = True
    # Log lines: "text" (one line each: time, level, logger, message) or "json" (one
    # object per line, for log shippers).
    log_format: str = "text"
    # Keep-alive comment (OpenAI) / ping event (Anthropic) while an upstream is silent.
    stream_keepalive_s: float = _positive(15)
    # Addresses (IPs or CIDRs) of reverse proxies in front of the gateway: for requests
    # from them, the client's address is taken from X-Forwarded-For (access log, auth brake).
    trusted_proxies: tuple[str, ...] = ()
    # Serve HTTPS instead of HTTP (proxy/tls.py); None: plain HTTP (a terminator in front).
    tls: TlsConfig | None = None
    # A request body must be complete within this of its head (after the key check): 408.
    body_timeout_s: float = _positive(60)
    # Open client connections at once, and per client address (not for trusted proxies,
    # whose connections carry many clients); the excess gets 503 and a close. 0: no cap.
    max_connections: int = _non_negative(10_000)
    max_connections_per_client: int = _non_negative(256)


@dataclass(frozen=True)
class AuthConfig:
    master_key: str | None = None
    # Seconds a key lookup is cached; revocation takes effect within this time.
    cache_ttl_s: float = _non_negative(5)
    negative_cache_ttl_s: float = _non_negative(5)
    # Failed authentications (401) per client IP and minute before that IP gets 429s
    # for the rest of the minute (brute-force brake); 0 turns it off.
    max_failures_per_min: int = _non_negative(20)
    # How long a dashboard sign-in (/ui/) lasts before the operator signs in again.
    session_ttl_h: float = 12


@dataclass(frozen=True)
class StorageConfig:
    # The directory that relative paths in `url` (SQLite) and `spool_path` are resolved
    # against; a relative state_dir is resolved against the config file's directory, and
    # an empty one is that directory. So every command that reads one config file uses
    # one database, whatever its working directory (see `anchor_paths`).
    state_dir: str = ""
    url: str = "sqlite:///data/llm-proxy.db"
    # Where usage records go when the store cannot take them (fsync'd, replayed later).
    spool_path: str = "data/usage-spool.jsonl"
    flush_interval_s: float = _positive(0.25)
    queue_max: int = _bounded(100_000, 1)
    # Records waiting in the spool past this size: billable requests get 503 until it
    # drains (RELIABILITY I8: refuse rather than serve calls that cannot be billed).
    spool_max_mb: float = 1024.0


@dataclass(frozen=True)
class LimitsConfig:
    url: str = "memory://"
    # When the limits backend is unreachable: false answers 503 (fail closed).
    fail_open: bool = False
    # Token reservation for a request that does not say `max_tokens`.
    default_max_tokens: int = _bounded(4096, 1)
    # "spend": admit while the key's spend is under its budget (overspend bounded by the
    # requests in flight); "reserve": each request reserves its worst-case cost.
    budget_admission: str = "spend"


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = _positive(10)
    first_byte_s: float = _positive(120)
    idle_s: float = _positive(300)  # > Claude Code's 120 s pauses; keep-alives cover the client meanwhile


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    protocol: str = "openai"
    api_key: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_parallel: int = _bounded(512, 1)
    # Extra headers sent to this upstream on every request (e.g. OpenAI-Organization).
    headers: Mapping[str, str] = field(default_factory=dict)
    # Seconds between active health checks (a model-list request); 0: off. Results feed
    # the routes' circuit breakers like real calls do.
    health_check_s: float = 0
    # A provider kind (KINDS) for upstreams that speak the protocol at other URLs, and the
    # API version it needs (Azure OpenAI: api-version).
    kind: str | None = None
    api_version: str | None = None
    # Ask for the usage chunk of OpenAI streams (stream_options.include_usage). Off for
    # servers that reject the option, which saves the refused first try; usage of their
    # streams is then what they report anyway, else estimated.
    stream_usage: bool = True
    # protocol openai: whether it serves the Responses API; if not, Responses calls are
    # translated onto its chat completions (DESIGN §7).
    responses: bool = True
    # max_tokens for translated calls that did not say (Anthropic requires one).
    default_max_tokens: int = 4096

    @property
    def is_mock(self) -> bool:
        return self.base_url == MOCK_BASE_URL


@dataclass(frozen=True)
class RouteConfig:
    upstream: str
    model: str
    weight: float = _positive(1)
    # Lower tiers are tried first; weights choose the order inside a tier (DESIGN §7).
    priority: int = 0


@dataclass(frozen=True)
class Price:
    input_per_mtok: float = _non_negative(0)
    output_per_mtok: float = _non_negative(0)
    cached_input_per_mtok: float | None = _non_negative(None)
    cache_write_per_mtok: float | None = _non_negative(None)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    routes: tuple[RouteConfig, ...]
    fallbacks: tuple[str, ...] = ()
    price: Price = field(default_factory=Price)
    # Other names clients ask for the same model by (a dated id, a client's shorthand such
    # as Claude Code's `sonnet`). Each is served as a model of its own with these routes
    # and price, listed and recorded under the name the client used (see `expand_aliases`).
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class BreakerConfig:
    """Per route (upstream + upstream model): when to stop sending it traffic for a while."""

    # Consecutive failed attempts that open the breaker (cooldown).
    failures: int = 3
    # The first cooldown; each further trip doubles it, up to max_s.
    cooldown_s: float = 5
    max_cooldown_s: float = 300
    # A provider's Retry-After (429, 529, 503) is honoured up to this many seconds.
    max_retry_after_s: float = 600
    # How long the one probe request of a half-open route may take before another may probe.
    probe_timeout_s: float = 120


@dataclass(frozen=True)
class RoutingConfig:
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    # With a Redis limits.url: how often each process reads the shared route states.
    shared_sync_s: float = 1.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()

    def upstream(self, name: str) -> UpstreamConfig:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)


# --------------------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UnsetVariable(KeyError):
    """A `${VAR}` without a default whose variable is not in the environment."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """`${VAR}` and `${VAR:-default}` from `env`. A `${VAR}` without a default must be set
    (an empty value counts as set): an unset one raises `UnsetVariable`, so that a
    forgotten secret or URL is named instead of silently becoming an empty string."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None and default is None:
            raise UnsetVariable(name)
        if value is None or (value == "" and default is not None):
            return default if default is not None else ""
        return value

    return _VAR.sub(sub, text)


def _where(node: yaml.Node, path: str) -> str:
    return f"{path or '<root>'} (line {node.start_mark.line + 1})"


def _expanded(node: yaml.ScalarNode, path: str, env: Mapping[str, str]) -> str:
    try:
        return expand_env(str(node.value), env)
    except UnsetVariable as exc:
        raise ConfigError(
            f"{_where(node, path)}: the environment variable {exc.name} is not set "
            f"(set it, or give a default in the file: ${{{exc.name}:-value}})"
        ) from None


def _scalar(node: yaml.ScalarNode, path: str, env: Mapping[str, str], tp: Any) -> Any:
    """The scalar's value for a field of type `tp`, after `${VAR}` expansion.

    Quoted and plain scalars are treated alike once expanded, so `port: "${PORT:-8080}"`
    is a number; strings stay strings even when they look like numbers.
    """
    text = _expanded(node, path, env)
    plain = node.style is None
    if plain and text in ("", "~", "null", "Null", "NULL"):
        return None
    if tp is str:
        return text
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _convert(node: yaml.Node, tp: Any, path: str, env: Mapping[str, str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(node, yaml.ScalarNode):
            raw = _scalar(node, path, env, args[0])
            if raw is None or raw == "":
                return None
        return _convert(node, args[0], path, env)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{_where(node, path)}: expected a mapping")
        return _build(tp, node, path, env)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(node, yaml.ScalarNode):
            if _scalar(node, path, env, None) is None:
                return ()
            if item_tp is str:
                # A list of strings may come from one variable: "${TRUSTED_PROXIES:-}" holding
                # "10.0.0.0/8,127.0.0.1" (environment files cannot hold YAML lists).
                return tuple(s.strip() for s in _expanded(node, path, env).split(",") if s.strip())
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError(f"{_where(node, path)}: expected a list")
        return tuple(_convert(n, item_tp, f"{path}[{i}]", env) for i, n in enumerate(node.value))
    if origin in (collections.abc.Mapping, dict) or tp is Mapping:
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{_where(node, path)}: expected a mapping")
        out: dict[str, str] = {}
        for k, v in node.value:
            sub = path + "." + str(k.value)
            if not isinstance(v, yaml.ScalarNode):
                raise ConfigError(f"{_where(v, sub)}: expected a string")
            out[str(k.value)] = str(_scalar(v, sub, env, str))
        return types.MappingProxyType(out)
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{_where(node, path)}: expected a {tp.__name__}")
    raw = _scalar(node, path, env, tp)
    if tp is str:
        if raw is None:
            raise ConfigError(f"{_where(node, path)}: expected a string")
        return str(raw)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        raise ConfigError(f"{_where(node, path)}: expected true or false, got {raw!r}")
    if tp in (int, float):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{_where(node, path)}: expected a number, got {raw!r}")
        if not math.isfinite(raw):
            raise ConfigError(f"{_where(node, path)}: expected a finite number, got {raw!r}")
        if tp is int and not float(raw).is_integer():
            raise ConfigError(f"{_where(node, path)}: expected an integer, got {raw!r}")
        return tp(raw)
    raise ConfigError(f"{_where(node, path)}: unsupported type {tp!r}")  # pragma: no cover


def _check_bounds(f: dataclasses.Field[Any], value: Any, node: yaml.Node, path: str) -> None:
    """The range a `_bounded` field declares, for a value the file set."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or "low" not in f.metadata:
        return
    low, high, above = f.metadata["low"], f.metadata["high"], f.metadata["above"]
    if above and not value > low:
        raise ConfigError(f"{_where(node, path)}: must be greater than {low:g}, got {value:g}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
        raise ConfigError(f"{_where(node, path)}: must be {span}, got {value:g}")


def _build(cls: type, node: yaml.MappingNode, path: str, env: Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        sub = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(f"{_where(key_node, sub)}: unknown key {key!r}")
        if key in kwargs:
            raise ConfigError(f"{_where(key_node, sub)}: duplicate key {key!r}")
        kwargs[key] = _convert(value_node, hints[key], sub, env)
        _check_bounds(fields[key], kwargs[key], value_node, sub)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_where(node, path)}: missing required key {name!r}")
    return cls(**kwargs)


def parse_config(
    text: str, env: Mapping[str, str] | None = None, source: str = "<config>", config_dir: Path | None = None
) -> Config:
    """The validated config in `text`. With `config_dir` (the directory of the file it came
    from), relative storage paths are anchored there (see `anchor_paths`); without it they
    stay relative to the working directory."""
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if root is None:
        cfg = Config()
    elif not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{source}: the top level must be a mapping")
    else:
        try:
            cfg = _build(Config, root, "", env)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    cfg = expand_aliases(cfg)
    validate(cfg, source)
    return cfg if config_dir is None else anchor_paths(cfg, config_dir)


def expand_aliases(cfg: Config) -> Config:
    """Each model alias as a model of its own (same routes, fallbacks and price), after
    the model that names it: everything downstream (router, model lists, allowlists,
    usage records, metrics) knows model names only."""
    if not any(m.aliases for m in cfg.models):
        return cfg
    models: list[ModelConfig] = []
    for m in cfg.models:
        models.append(m)
        models.extend(dataclasses.replace(m, name=alias, aliases=()) for alias in m.aliases)
    return dataclasses.replace(cfg, models=tuple(models))


def anchor_paths(cfg: Config, config_dir: Path) -> Config:
    """`cfg` with the state directory, a relative SQLite path and a relative spool path made
    absolute: state_dir against `config_dir`, the others against state_dir.

    Relative to the working directory, `keys create` run from another directory than
    `serve` made a second, empty database, and the key it printed was unknown to the
    server; anchored, every command reading one config file meets the same files."""
    storage = cfg.storage
    state = Path(os.path.abspath(config_dir / os.path.expanduser(storage.state_dir)))
    url = storage.url
    scheme, sep, rest = url.partition("://")
    if scheme.lower() == "sqlite" and sep and rest.startswith("/") and rest not in ("/", "/:memory:"):
        url = f"{scheme}:///{state / os.path.expanduser(rest[1:])}"  # absolute: sqlite:////...
    spool = state / os.path.expanduser(storage.spool_path)
    server = cfg.server
    if server.tls is not None:
        server = dataclasses.replace(
            server,
            tls=TlsConfig(
                cert_file=os.path.abspath(config_dir / os.path.expanduser(server.tls.cert_file)),
                key_file=os.path.abspath(config_dir / os.path.expanduser(server.tls.key_file)),
            ),
        )
    return dataclasses.replace(
        cfg, server=server, storage=dataclasses.replace(storage, state_dir=str(state), url=url, spool_path=str(spool))
    )


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (None for other stores and `:memory:`)."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "sqlite" or not sep or not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(rest[1:])


def describe_store(url: str) -> str:
    """The store for a log line or a message: a SQLite file's path, else the masked URL."""
    path = sqlite_path(url)
    return f"SQLite {path}" if path is not None else _mask_url(url)


def validate(cfg: Config, source: str = "<config>") -> None:
    names = [u.name for u in cfg.upstreams]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: upstream names must be unique")
    for u in cfg.upstreams:
        if u.protocol not in PROTOCOLS:
            raise ConfigError(f"{source}: upstreams.{u.name}.protocol must be one of {', '.join(PROTOCOLS)}")
        if u.kind is not None and u.kind not in KINDS:
            raise ConfigError(f"{source}: upstreams.{u.name}.kind must be one of {', '.join(KINDS)} (or left out)")
        if u.kind == "azure" and (u.protocol != "openai" or not u.api_version):
            raise ConfigError(f"{source}: upstreams.{u.name}: kind azure needs protocol openai and an api_version")
        if not (u.is_mock or u.base_url.startswith(("http://", "https://"))):
            raise ConfigError(f"{source}: upstreams.{u.name}.base_url must be http(s):// or {MOCK_BASE_URL}")
        if u.default_max_tokens < 1:
            raise ConfigError(f"{source}: upstreams.{u.name}.default_max_tokens must be at least 1")
    model_names = [m.name for m in cfg.models]
    if len(set(model_names)) != len(model_names):
        twice = sorted({n for n in model_names if model_names.count(n) > 1})
        raise ConfigError(f"{source}: model names and aliases must be unique: {', '.join(twice)}")
    for m in cfg.models:
        if not m.routes:
            raise ConfigError(f"{source}: models.{m.name}.routes must not be empty")
        for r in m.routes:
            if r.upstream not in names:
                raise ConfigError(f"{source}: models.{m.name} routes to unknown upstream {r.upstream!r}")
            if r.weight <= 0:
                raise ConfigError(f"{source}: models.{m.name} route weight must be positive")
            if r.priority < 0:
                raise ConfigError(f"{source}: models.{m.name} route priority must be 0 or more")
        for fb in m.fallbacks:
            if fb not in model_names:
                raise ConfigError(f"{source}: models.{m.name} falls back to unknown model {fb!r}")
    if not 0 < cfg.auth.session_ttl_h <= 24 * 366:
        raise ConfigError(f"{source}: auth.session_ttl_h must be more than 0 and at most a year")
    b = cfg.routing.breaker
    if b.failures < 1:
        raise ConfigError(f"{source}: routing.breaker.failures must be at least 1")
    for name in ("cooldown_s", "max_cooldown_s", "max_retry_after_s", "probe_timeout_s"):
        if not 0 < getattr(b, name) < float("inf"):
            raise ConfigError(f"{source}: routing.breaker.{name} must be a positive number")
    if b.max_cooldown_s < b.cooldown_s:
        raise ConfigError(f"{source}: routing.breaker.max_cooldown_s must be at least cooldown_s")
    if not 0 < cfg.routing.shared_sync_s <= 60:
        raise ConfigError(f"{source}: routing.shared_sync_s must be from 0 to 60 seconds")
    for u in cfg.upstreams:
        if u.health_check_s < 0:
            raise ConfigError(f"{source}: upstreams.{u.name}.health_check_s must be 0 (off) or more")
    if cfg.server.workers < 1:
        raise ConfigError(f"{source}: server.workers must be at least 1")
    if cfg.server.log_format not in LOG_FORMATS:
        raise ConfigError(f"{source}: server.log_format must be one of {', '.join(LOG_FORMATS)}")
    for i, proxy_net in enumerate(cfg.server.trusted_proxies):
        try:
            ipaddress.ip_network(proxy_net, strict=False)
        except ValueError:
            raise ConfigError(f"{source}: server.trusted_proxies[{i}] is not an IP address or CIDR") from None
    if not 0 < cfg.storage.spool_max_mb < float("inf"):
        raise ConfigError(f"{source}: storage.spool_max_mb must be a positive number")
    if not cfg.storage.url.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise ConfigError(f"{source}: storage.url must be sqlite:///path or postgresql://...")
    if cfg.limits.budget_admission not in ("spend", "reserve"):
        raise ConfigError(f"{source}: limits.budget_admission must be 'spend' or 'reserve'")
    if not cfg.limits.url.startswith(("memory://", "redis://", "rediss://")):
        raise ConfigError(f"{source}: limits.url must be memory:// or redis://...")
    if cfg.limits.url.startswith(("redis://", "rediss://")):
        problem = _redis_url_problem(cfg.limits.url)
        if problem:
            raise ConfigError(f"{source}: limits.url: {problem}")


def _redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL (never quoting it: it may hold a password)."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        return "a Redis URL takes no options: redis://[[user]:password@]host[:port][/db]"
    if not parts.hostname:
        return "the Redis URL names no host"
    try:
        _ = parts.port   # parsed on access: raises for a port that is not a number
    except ValueError:
        return "the Redis URL's port is not a number from 0 to 65535"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return "the Redis URL's path must be a database number"
    return None


DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")


def resolve_path(explicit: str | None) -> Path:
    """--config, else $LLM_PROXY_CONFIG, else ./config/proxy.yaml, else the built-in default
    (always an absolute path, so that messages say which file it was)."""
    if explicit:
        return Path(explicit).absolute()
    env = os.environ.get("LLM_PROXY_CONFIG")
    if env:
        return Path(env).absolute()
    local = Path("config/proxy.yaml")
    return local.absolute() if local.exists() else DEFAULT_CONFIG_PATH


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The config file's contents, validated, with relative storage paths anchored to its
    directory (see `anchor_paths`; the built-in default names an absolute state_dir)."""
    p = resolve_path(str(path) if path else None)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from None
    return parse_config(text, env, source=str(p), config_dir=p.parent)


def _mask_url(url: str) -> str:
    url = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1****@", url)
    return re.sub(r"(?i)([?&](?:password|pass|pwd)=)[^&]*", r"\1****", url)


def mask(value: str | None) -> str | None:
    if not value:
        return value
    return "****" + value[-4:] if len(value) > 12 else "****"


def masked(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data with every secret masked (check-config, GET /admin/config)."""

    def walk(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if f.name == "url" and isinstance(v, str):
                    out[f.name] = _mask_url(v)
                elif f.name in SECRET_FIELDS and isinstance(v, str):
                    out[f.name] = mask(v)
                elif f.name == "headers" and isinstance(v, Mapping):
                    # upstream headers may carry credentials (Authorization, api-key, ...)
                    out[f.name] = {k: mask(h) if isinstance(h, str) else h for k, h in v.items()}
                else:
                    out[f.name] = walk(v)
            return out
        if isinstance(obj, (tuple, list)):
            return [walk(v) for v in obj]
        if isinstance(obj, Mapping):
            return {k: walk(v) for k, v in obj.items()}
        return obj

    plain: dict[str, Any] = walk(cfg)
    return plain
