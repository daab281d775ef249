"""Deployment (issue 8): the systemd unit, the container image and compose file, the
production configuration, `serve --workers N`, Type=notify, graceful stop.

Everything runs on 127.0.0.1 in subprocesses (`python -m proxy ...`, the same code as
the `llm-proxy` console script), each bounded in time and killed in `finally`.
Nothing here needs a Docker engine or a running systemd: the Dockerfile's entrypoint
is run directly, and the unit is checked with `systemd-analyze`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import (
    AuthConfig,
    LimitsConfig,
    ModelConfig,
    Price,
    RouteConfig,
    ServerConfig,
    StorageConfig,
    Timeouts,
    UpstreamConfig,
)

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy/systemd/llm-proxy.service"
ENV_EXAMPLE = ROOT / "deploy/systemd/llm-proxy.env.example"
INSTALL_SH = ROOT / "deploy/install.sh"
DOCKERFILE = ROOT / "deploy/container/Dockerfile"
DOCKERIGNORE = ROOT / "deploy/container/Dockerfile.dockerignore"
COMPOSE = ROOT / "deploy/container/compose.yaml"
PRODUCTION = ROOT / "config/production.yaml"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL", re.IGNORECASE)


# ---------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would steer the gateway."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_PROXY_", "NOTIFY_SOCKET", "OPENAI_", "ANTHROPIC_", "GEMINI_", "POSTGRES_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _console_script() -> list[str]:
    """`llm-proxy` as installed next to this interpreter, else `python -m proxy`."""
    script = Path(sys.executable).with_name("llm-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


def _mdwe_supported() -> bool:
    code = "import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", code], timeout=10).returncode == 0


_MDWE: bool | None = None


def _under_mdwe(argv: Sequence[str]) -> list[str]:
    """Run `argv` (a Python command) with the kernel's MemoryDenyWriteExecute
    (PR_SET_MDWE, Linux 6.3+; inherited by the workers), as the unit asks of systemd.
    Unchanged where the kernel does not offer it."""
    global _MDWE
    if _MDWE is None:
        _MDWE = _mdwe_supported()
    if not _MDWE:
        return list(argv)
    assert argv[0] == sys.executable
    wrapper = (
        "import ctypes, os, sys\n"
        "assert ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) == 0\n"
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
    )
    return [sys.executable, "-c", wrapper, *argv[1:]]


class Proc:
    """A subprocess with its output in a file; `stop()` always leaves nothing running."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {self.pid} still running after {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def stop(self) -> None:
        """Kill it (and any workers it left behind) if it still runs; reap it."""
        for child in _children(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._out.close()


@contextlib.contextmanager
def _running(argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path | None = None) -> Iterator[Proc]:
    proc = Proc(argv, env, log, cwd)
    try:
        yield proc
    finally:
        proc.stop()


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc/*/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


async def _wait_healthy(proc: Proc, port: int, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.popen.poll() is not None:
                raise AssertionError(f"the gateway exited with {proc.popen.returncode}:\n{proc.output()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"no /healthz on port {port} after {timeout}s:\n{proc.output()}")
            await asyncio.sleep(0.05)


def _create_key(argv0: Sequence[str], env: Mapping[str, str], config: Path | None, name: str, cwd: Path | None = None) -> str:
    cmd = [*argv0, "keys", "create", "--name", name, "--json"] + (["--config", str(config)] if config else [])
    done = subprocess.run(cmd, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    key = json.loads(done.stdout)["key"]
    assert isinstance(key, str) and key
    return key


def _check_config(env: Mapping[str, str], config: Path = PRODUCTION) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        env=dict(env), capture_output=True, text=True, timeout=60,
    )


def _env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a systemd EnvironmentFile (comments and blanks skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"not KEY=value: {line!r}"
        out[key] = value
    return out


def _config_vars(path: Path) -> tuple[set[str], set[str]]:
    """(${VAR}s without a fallback, ${VAR:-x}s) referenced by a config file."""
    text = "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else "" for line in path.read_text().splitlines())
    required, optional = set(), set()
    for name, fallback in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}", text):
        (optional if fallback else required).add(name)
    return required, optional


def _production_grace_s() -> float:
    return float(yaml.safe_load(PRODUCTION.read_text())["server"]["shutdown_grace_s"])


def _seconds(text: str) -> float:
    """systemd / compose durations: 35, 35s, 1min 30s, 1m30s, 500ms."""
    total = 0.0
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts, text
    for number, unit in parts:
        total += float(number) * units[unit or "s"]
    return total


def _slow_chat(model: str) -> dict[str, Any]:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": "Tell me a long story."}]}


async def _read_all(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The body read to its end, and whether it ended cleanly (chunked terminator)."""
    body = b""
    try:
        async for chunk in resp.content.iter_any():
            body += chunk
    except aiohttp.ClientPayloadError:
        return body, False
    return body, True


# ---------------------------------------------------------------------- NOTIFY_SOCKET


_SCM_CREDENTIALS = 2
_SO_PASSCRED = 16


class NotifySocket:
    """A systemd-style notification socket: datagrams with the sender's pid attached
    (SO_PASSCRED), which is how systemd applies NotifyAccess=main."""

    def __init__(self) -> None:
        self.name = f"@llm-proxy-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 1)
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    async def receive(self, timeout: float) -> tuple[list[str], int]:
        """The next message's lines and its sender's pid."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no notification within {timeout}s") from None
                await asyncio.sleep(0.01)
                continue
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS:
                    pid, _uid, _gid = struct.unpack("3i", payload[:12])
            return data.decode().splitlines(), pid


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket()
    try:
        yield s
    finally:
        s.close()


# ---------------------------------------------------------------------- upstream


@pytest.fixture(scope="module")
def slow_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`llm-proxy mock-upstream` streaming 20 chunks 150 ms apart (3 s per stream);
    its OpenAI base URL. The gateway does not pass x-mock-* headers on, so the pace is
    set on the mock's command line."""
    port = _free_port()
    log = tmp_path_factory.mktemp("mock") / "mock.log"
    argv = [sys.executable, "-m", "proxy", "mock-upstream", "--port", str(port), "--chunks", "20", "--chunk-delay-ms", "150"]
    with _running(argv, _base_env(), log) as proc:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(port):
            assert proc.popen.poll() is None, proc.output()
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"


def _test_config(tmp_path: Path, port: int, *, grace_s: float, slow_base_url: str) -> Path:
    """A small config: SQLite in tmp_path, the in-process mock (`demo`) and a slow
    OpenAI-style upstream (`slow`)."""
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"""
server: {{host: 127.0.0.1, port: {port}, shutdown_grace_s: {grace_s}}}
storage: {{url: "sqlite:///{tmp_path}/proxy.db", spool_path: "{tmp_path}/spool.jsonl"}}
upstreams:
  - {{name: mock, protocol: openai, base_url: "mock://"}}
  - {{name: slow, protocol: openai, base_url: "{slow_base_url}", api_key: sk-mock-upstream}}
models:
  - {{name: demo, routes: [{{upstream: mock, model: mock-gpt}}]}}
  - {{name: slow, routes: [{{upstream: slow, model: mock-gpt}}]}}
"""
    )
    return path


# ====================================================================== systemd


def _unit() -> dict[str, dict[str, list[str]]]:
    """The unit file as {section: {key: [values in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: install systemd (apt-get install systemd); CI has it")
    return path


def _verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's `llm-proxy` (verify checks
    that the executable exists)."""
    script = Path(sys.executable).with_name("llm-proxy")
    exe = str(script) if script.exists() else shutil.which("llm-proxy")
    assert exe, "the llm-proxy console script is not installed (pip install -e .)"
    text = UNIT.read_text()
    assert "ExecStart=/opt/llm-proxy/venv/bin/llm-proxy " in text
    path = tmp_path / "llm-proxy.service"
    path.write_text(text.replace("ExecStart=/opt/llm-proxy/venv/bin/llm-proxy ", f"ExecStart={exe} "))
    return path


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _verifiable_unit(tmp_path)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and unparsable values, only warning about them.
    about_unit = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not about_unit, done.stdout + done.stderr


def test_systemd_unit_is_sandboxed(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _verifiable_unit(tmp_path)
    # Overall exposure 0..10 (threshold in tenths); 1.1 when this was written.
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    if "--offline" in done.stderr and "unrecognized" in done.stderr:  # systemd < 250
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


def test_systemd_unit_settings() -> None:
    unit = _unit()
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    exec_start = shlex.split(svc["ExecStart"])
    assert exec_start[1:] == ["serve", "--config", "/etc/llm-proxy/proxy.yaml"]
    assert exec_start[0].startswith("/opt/llm-proxy/")
    assert svc.get("DynamicUser") == "yes" or svc["User"] not in ("", "root", "0")
    assert svc["StateDirectory"] == "llm-proxy"
    assert svc["EnvironmentFile"].startswith("/etc/llm-proxy/")
    assert svc["LimitNOFILE"] == "65536"
    assert svc["Restart"] == "on-failure"
    assert _seconds(svc["TimeoutStopSec"]) >= _production_grace_s() + 5, "TimeoutStopSec must exceed shutdown_grace_s"
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "LockPersonality": "yes", "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes",
    }.items():
        assert svc.get(key) == value, f"{key}={svc.get(key)!r}, want {value!r}"
    assert sorted(svc["RestrictAddressFamilies"].split()) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "@system-service" in unit["Service"]["SystemCallFilter"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_env_example_with_production_config_is_a_working_single_host_setup() -> None:
    """install.sh installs production.yaml and the env example: together they load, and
    the database and spool are in the unit's StateDirectory."""
    example = _env_file(ENV_EXAMPLE)
    required, optional = _config_vars(PRODUCTION)
    assert required <= example.keys(), f"the env example misses {required - example.keys()}"
    assert (required | optional) >= {k for k in example if k.startswith("LLM_PROXY_") and k != "LLM_PROXY_LOG_LEVEL"}
    done = _check_config(_base_env(**example))
    assert done.returncode == 0, done.stderr
    cfg = json.loads(done.stdout)
    state_dir = "/var/lib/" + _unit()["Service"]["StateDirectory"][-1]
    assert cfg["storage"]["url"] == f"sqlite:///{state_dir}/llm-proxy.db"
    assert cfg["storage"]["spool_path"].startswith(state_dir + "/")
    assert cfg["auth"]["master_key"] is None  # empty until install.sh generates one


def test_install_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(INSTALL_SH)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert os.access(INSTALL_SH, os.X_OK)
    text = INSTALL_SH.read_text()
    assert "set -euo pipefail" in text
    for path in ("/opt/llm-proxy", "/etc/llm-proxy", "llm-proxy.service", "config/production.yaml", "llm-proxy.env.example"):
        assert path in text


# ====================================================================== production.yaml


def test_production_config_loads_with_its_variables_set() -> None:
    password = "pw-CANARY-5e6f7a8b9c"
    env = _base_env(
        LLM_PROXY_STORAGE_URL=f"postgresql://llm_proxy:{password}@db.internal:5432/llm_proxy",
        LLM_PROXY_LIMITS_URL="redis://redis.internal:6379/0",
        LLM_PROXY_MASTER_KEY="master-CANARY-0123456789abcdef",
        OPENAI_API_KEY="sk-CANARY-openai-0123456789",
        ANTHROPIC_API_KEY="sk-ant-CANARY-0123456789",
        GEMINI_API_KEY="gem-CANARY-0123456789",
    )
    done = _check_config(env)
    assert done.returncode == 0, done.stderr
    assert "CANARY" not in done.stdout.replace("****", ""), "check-config printed a secret"
    cfg = json.loads(done.stdout)
    assert cfg["storage"]["url"].startswith("postgresql://llm_proxy:****@db.internal")
    assert cfg["limits"]["url"].startswith("redis://")
    assert {u["name"] for u in cfg["upstreams"]} == {"openai", "anthropic", "gemini"}
    assert all(u["api_key"] and u["api_key"].startswith("****") for u in cfg["upstreams"])
    assert not any(u["base_url"] == "mock://" for u in cfg["upstreams"])


def test_production_config_is_commented_throughout() -> None:
    """A complete reference: every server/auth/storage/limits setting the loader knows is
    written out, and every key is explained (a comment on its line or just above it, or
    in the comment block above for keys grouped together; keys repeated in later list
    items of the same shape are explained once)."""
    doc = yaml.safe_load(PRODUCTION.read_text())
    for section, cls in (("server", ServerConfig), ("auth", AuthConfig), ("storage", StorageConfig), ("limits", LimitsConfig)):
        missing = {f.name for f in dataclasses.fields(cls)} - set(doc[section])
        assert not missing, f"config/production.yaml does not show (and explain) {section}.{sorted(missing)}"
    # The first upstream and the first model show every field of their kind.
    for where, item, cls in (
        ("upstreams[0]", doc["upstreams"][0], UpstreamConfig),
        ("upstreams[0].timeouts", doc["upstreams"][0]["timeouts"], Timeouts),
        ("models[0]", doc["models"][0], ModelConfig),
        ("models[0].routes[0]", doc["models"][0]["routes"][0], RouteConfig),
        ("models[].price", {k: 1 for m in doc["models"] for k in m.get("price", {})}, Price),
    ):
        missing = {f.name for f in dataclasses.fields(cls)} - set(item)
        assert not missing, f"config/production.yaml does not show (and explain) {where}.{sorted(missing)}"
    lines = PRODUCTION.read_text().splitlines()
    seen: set[str] = set()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(- )?([a-z_]+):", line)
        if not m:
            continue
        key = m.group(3)
        commented = "#" in line or any(lines[j].strip().startswith("#") for j in range(max(0, i - 1), i))
        if not commented and key not in seen:
            # Explained together with its neighbours in one comment block above.
            block = [lines[j] for j in range(max(0, i - 8), i)]
            assert any(key in b for b in block if b.strip().startswith("#")), f"line {i + 1}: {key!r} has no comment"
        seen.add(key)


@pytest.mark.parametrize(
    ("unset_or_bad", "where"),
    [({"LLM_PROXY_STORAGE_URL": None}, "storage.url"), ({"LLM_PROXY_LIMITS_URL": None}, "limits.url"), ({"LLM_PROXY_PORT": "eighty"}, "server.port (line ")],
    ids=["storage-url-unset", "limits-url-unset", "port-not-a-number"],
)
def test_production_config_names_the_key_of_a_problem(unset_or_bad: dict[str, str | None], where: str) -> None:
    env = _base_env(LLM_PROXY_STORAGE_URL="postgresql://u:p@db/x", LLM_PROXY_LIMITS_URL="redis://r:6379/0")
    for k, v in unset_or_bad.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    done = _check_config(env)
    assert done.returncode == 2 and not done.stdout
    assert where in done.stderr and "production.yaml" in done.stderr, done.stderr


# ====================================================================== container


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions as (INSTRUCTION, arguments), continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def _final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instrs) if word == "FROM"]
    assert starts, "no FROM"
    return instrs[starts[-1]:]


def _exec_form(args: str) -> list[str]:
    try:
        argv = json.loads(args)
    except ValueError:
        raise AssertionError(f"not exec form (a JSON array): {args}") from None
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), args
    return argv


def _env_instruction(args: str) -> dict[str, str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def _image() -> dict[str, Any]:
    """What the final stage of the Dockerfile sets up."""
    instrs = _instructions(DOCKERFILE)
    final = _final_stage(instrs)
    env: dict[str, str] = {}
    copies: dict[str, str] = {}
    out: dict[str, Any] = {"stages": sum(1 for w, _ in instrs if w == "FROM"), "base": final[0][1], "env": env, "copies": copies}
    for word, args in final:
        if word == "ENV":
            env.update(_env_instruction(args))
        elif word == "COPY" and not args.startswith("--from"):
            *srcs, dest = shlex.split(args)
            for src in srcs:
                copies[dest] = src
        elif word in ("USER", "WORKDIR", "STOPSIGNAL"):
            out[word.lower()] = args
        elif word in ("ENTRYPOINT", "CMD"):
            out[word.lower()] = _exec_form(args)
        elif word == "HEALTHCHECK":
            options, sep, cmd = args.partition("CMD ")
            assert sep, f"HEALTHCHECK without CMD: {args}"
            out["healthcheck"] = _exec_form(cmd)
            out["healthcheck_options"] = options
    return out


def test_dockerfile_shape() -> None:
    instrs = _instructions(DOCKERFILE)
    image = _image()
    assert image["stages"] >= 2, "multi-stage build expected"
    assert "slim" in image["base"], image["base"]
    assert any(w == "COPY" and a.startswith("--from=") for w, a in _final_stage(instrs))
    user = image.get("user", "root").split(":")[0]
    assert user not in ("root", "0", ""), "the final stage must run as a non-root USER"
    assert "healthcheck" in image and any("/healthz" in a for a in image["healthcheck"])
    assert "--interval=" in image["healthcheck_options"]
    assert image["entrypoint"] and image["cmd"], "exec-form ENTRYPOINT and CMD"
    assert "sh" not in Path(image["entrypoint"][0]).name, "no shell between the runtime and the gateway"
    assert image["env"]["LLM_PROXY_HOST"] == "0.0.0.0", "a container must listen on every interface"
    assert image.get("stopsignal", "SIGTERM") == "SIGTERM"
    # No secrets baked in: no ENV or ARG (in any stage) names one, no .env file is copied.
    for word, args in instrs:
        if word == "ENV":
            for name, value in _env_instruction(args).items():
                assert not SECRET_NAME.search(name), f"ENV {name} looks like a secret"
                assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"ENV {name} holds a credential"
        if word == "ARG":
            name = args.split("=", 1)[0]
            assert not SECRET_NAME.search(name), f"ARG {name} looks like a secret"
        if word in ("COPY", "ADD"):
            assert ".env" not in args and "data/" not in args, f"{word} {args}"
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the build context is an allow-list"
    assert not any(".env" in line or line.startswith("!data") for line in ignore)


def test_compose_file_shape() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"llm-proxy", "postgres", "redis"} <= services.keys()
    for name in ("llm-proxy", "postgres", "redis"):
        test = services[name]["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck"
    proxy = services["llm-proxy"]
    assert proxy["depends_on"] == {"postgres": {"condition": "service_healthy"}, "redis": {"condition": "service_healthy"}}
    command = proxy["command"]
    assert command[0] == "serve" and command[command.index("--workers") + 1] == "2"
    env = proxy["environment"]
    assert env["LLM_PROXY_HOST"] == "0.0.0.0"
    assert env["LLM_PROXY_STORAGE_URL"].startswith("postgresql://")
    assert env["LLM_PROXY_LIMITS_URL"].startswith("redis://redis:")
    required, _optional = _config_vars(PRODUCTION)
    assert required <= env.keys(), f"compose does not set {required - env.keys()}"
    for name, svc in services.items():
        for k, v in (svc.get("environment") or {}).items():
            # Secrets come from the environment / .env, never written here.
            if SECRET_NAME.search(k):
                assert not v or str(v).startswith("${"), f"{name}.{k} is written in the file"
            assert not re.search(r"://[^/@\s]+:(?!\$\{)[^/@\s]+@", str(v)), f"{name}.{k} has a literal password"
    # The config mount is the production config, read-only; data volumes are named.
    compose_dir = COMPOSE.parent
    mounts = {v.split(":")[1]: v for v in proxy["volumes"]}
    config_mount = mounts["/etc/llm-proxy/proxy.yaml"]
    assert (compose_dir / config_mount.split(":")[0]).resolve() == PRODUCTION and config_mount.endswith(":ro")
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert named and named <= set(doc["volumes"])
    assert (compose_dir / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert _seconds(proxy["stop_grace_period"]) >= _production_grace_s() + 5


async def test_container_entrypoint_serves_the_demo(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD of the image, run here with the image's ENV (its config file
    mapped to the repository copy the Dockerfile COPYs), a temp SQLite and a free port."""
    image = _image()
    argv = image["entrypoint"] + image["cmd"]
    assert argv[0] == "llm-proxy", argv
    argv = _console_script() + argv[1:]
    port = _free_port()
    env = _base_env(**{k: v for k, v in image["env"].items() if k != "PATH"})
    config_in_image = env["LLM_PROXY_CONFIG"]
    env["LLM_PROXY_CONFIG"] = str(ROOT / image["copies"][config_in_image])
    env.update(LLM_PROXY_HOST="127.0.0.1", LLM_PROXY_PORT=str(port), LLM_PROXY_STORAGE_URL=f"sqlite:///{tmp_path}/llm-proxy.db")
    key = _create_key(_console_script(), env, None, "container", cwd=tmp_path)
    healthcheck = [sys.executable if a == "python" else a for a in image["healthcheck"]]

    with _running(argv, env, tmp_path / "gateway.log", cwd=tmp_path) as gw:
        await _wait_healthy(gw, port)
        done = subprocess.run(healthcheck, env=env, capture_output=True, timeout=10)
        assert done.returncode == 0, done.stderr
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "demo", "messages": [{"role": "user", "content": "Hi"}]},
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
        assert body["choices"][0]["message"]["content"]
        gw.signal(signal.SIGTERM)
        assert await gw.wait(STOP_TIMEOUT_S) == 0, gw.output()
    assert (tmp_path / "llm-proxy.db").exists(), "the storage URL from the environment was not used"
    done = subprocess.run(healthcheck, env=env, capture_output=True, timeout=10)
    assert done.returncode != 0, "the healthcheck passed with no gateway running"


# ====================================================================== processes


def _server_connections(port: int, pids: Sequence[int]) -> dict[int, int]:
    """For each pid, how many established TCP connections it serves on `port` (the
    server side: local port == port), from /proc/net/tcp* and /proc/<pid>/fd."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    counts = {}
    for pid in pids:
        n = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        n += 1
        counts[pid] = n
    return counts


def _open_keepalive_connections(port: int, n: int) -> list[socket.socket]:
    """n connections, each having had one /healthz answered and kept open."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        conns.append(s)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            assert chunk, "connection closed"
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
    return conns


async def test_workers_serve_from_two_processes_and_drain_on_sigterm(
    tmp_path: Path, slow_upstream: str, pg_store_url: str, redis_url: str, notify_socket: NotifySocket
) -> None:
    """The compose topology without Docker: config/production.yaml, PostgreSQL, Redis,
    `serve --workers 2` (under MemoryDenyWriteExecute where the kernel has it), with
    the mock as the OpenAI upstream. READY=1 and STOPPING=1 come from the parent only
    (NotifyAccess=main); a stream in flight at SIGTERM finishes; the parent exits 0."""
    port = _free_port()
    env = _base_env(
        LLM_PROXY_STORAGE_URL=pg_store_url,
        LLM_PROXY_LIMITS_URL=redis_url,
        LLM_PROXY_SPOOL_PATH=str(tmp_path / "spool.jsonl"),
        LLM_PROXY_PORT=str(port),
        OPENAI_BASE_URL=slow_upstream,
        OPENAI_API_KEY="sk-mock-upstream",
        NOTIFY_SOCKET=notify_socket.name,
    )
    key = _create_key([sys.executable, "-m", "proxy"], env, PRODUCTION, "workers")
    argv = _under_mdwe([sys.executable, "-m", "proxy", "serve", "--config", str(PRODUCTION), "--workers", "2"])
    conns: list[socket.socket] = []
    with _running(argv, env, tmp_path / "gateway.log") as gw:
        try:
            lines, sender = await notify_socket.receive(START_TIMEOUT_S)
            assert lines == ["READY=1"] and sender == gw.pid, (lines, sender, gw.pid, gw.output())
            # Both workers listen by now: the kernel spreads new connections over them.
            conns = _open_keepalive_connections(port, 16)
            served = {pid: n for pid, n in _server_connections(port, _children(gw.pid)).items() if n}
            assert len(served) == 2 and sum(served.values()) == 16, (served, gw.output())
            workers = list(served)
            assert _server_connections(port, [gw.pid])[gw.pid] == 0, "the parent serves nothing itself"
        finally:
            for c in conns:
                c.close()

        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=_slow_chat("gpt-4o-mini"),
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                first = await asyncio.wait_for(resp.content.readline(), 10)
                assert first.startswith(b"data: {")
                gw.signal(signal.SIGTERM)
                lines, sender = await notify_socket.receive(5)
                assert lines == ["STOPPING=1"] and sender == gw.pid
                body, clean = await asyncio.wait_for(_read_all(resp), 20)
        assert clean and body.rstrip().endswith(b"data: [DONE]"), body[-300:]
        assert b"server_shutdown" not in body
        assert await gw.wait(STOP_TIMEOUT_S) == 0, gw.output()
        assert not [p for p in workers if Path(f"/proc/{p}").exists()], "workers left behind"
    # Every worker flushed its usage to PostgreSQL before it exited.
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--json", "--config", str(PRODUCTION)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [(r["model"], r["outcome"], r["stream"]) for r in records] == [("gpt-4o-mini", "ok", True)], records


async def test_type_notify_ready_once_listening_then_stopping(tmp_path: Path, slow_upstream: str, notify_socket: NotifySocket) -> None:
    """As systemd runs it (Type=notify, under MemoryDenyWriteExecute where the kernel
    has it): READY=1 from the main pid when the port accepts connections; STOPPING=1
    on SIGTERM; exit 0."""
    port = _free_port()
    config = _test_config(tmp_path, port, grace_s=10, slow_base_url=slow_upstream)
    env = _base_env(NOTIFY_SOCKET=notify_socket.name)
    argv = _under_mdwe([sys.executable, "-m", "proxy", "serve", "--config", str(config)])
    with _running(argv, env, tmp_path / "gateway.log") as gw:
        assert not _accepts(port)
        lines, sender = await notify_socket.receive(START_TIMEOUT_S)
        assert lines == ["READY=1"] and sender == gw.pid, (lines, sender, gw.pid)
        assert _accepts(port), "READY=1 came before the port accepted connections"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 200, await resp.text()
        gw.signal(signal.SIGTERM)
        lines, sender = await notify_socket.receive(5)
        assert lines == ["STOPPING=1"] and sender == gw.pid
        assert await gw.wait(STOP_TIMEOUT_S) == 0, gw.output()


async def test_sigterm_with_a_stream_longer_than_the_grace(tmp_path: Path, slow_upstream: str) -> None:
    """shutdown_grace_s 1 and a 3 s stream: the stream runs on for the grace period, then
    the client gets the shutdown error event, and the process exits 0 right after."""
    grace_s = 1.0
    port = _free_port()
    config = _test_config(tmp_path, port, grace_s=grace_s, slow_base_url=slow_upstream)
    env = _base_env()
    key = _create_key([sys.executable, "-m", "proxy"], env, config, "grace")
    with _running([sys.executable, "-m", "proxy", "serve", "--config", str(config)], env, tmp_path / "gateway.log") as gw:
        await _wait_healthy(gw, port)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=_slow_chat("slow"), headers={"Authorization": f"Bearer {key}"}
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert (await asyncio.wait_for(resp.content.readline(), 10)).startswith(b"data: {")
                gw.signal(signal.SIGTERM)
                signalled = time.monotonic()
                events: list[dict[str, Any]] = []
                ended_after = None
                async with asyncio.timeout(10):
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            events.append(json.loads(line[6:]))
                            if "error" in events[-1]:
                                ended_after = time.monotonic() - signalled
        assert events and events[-1].get("error", {}).get("code") == "server_shutdown", events[-2:]
        assert sum(1 for e in events if "choices" in e) >= 3, "the stream did not go on during the grace period"
        assert ended_after is not None and grace_s - 0.2 < ended_after < grace_s + 1.0, ended_after
        assert await gw.wait(STOP_TIMEOUT_S) == 0, gw.output()
        assert time.monotonic() - signalled < grace_s + 2.5, "the stop took much longer than the grace period"
    # The partial stream was recorded as such.
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--json", "--config", str(config)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    records = [r for r in json.loads(done.stdout) if r["model"] == "slow"]
    assert len(records) == 1 and records[0]["outcome"] == "shutdown" and records[0]["completion_tokens"] > 0, records
