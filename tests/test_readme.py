"""The README as a newcomer reads it: its links stay inside the repository, and its first
command works as printed on a clean machine.

The clean-machine test copies the tracked files to a temporary directory and runs the
README's "run the gateway" block there with nothing of this checkout's environment: the
system's /usr/bin/python3 first on PATH (Debian's, which refuses `pip install` outside a
venv), no venv, no PYTHONPATH. The script makes its own ./.venv (pip's cache and the
machine's wheel settings are reused, so it takes well under a minute), the gateway must
answer /healthz, and then the README's own next steps run against it: `keys create`, the
curl call and the Python snippet (on the test's port instead of 8080). The README's second
command, `bash scripts/test`, is what CI runs on a fresh clone (.ci/run), so it is checked
here only for being the block the README prints.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from _gateway import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SYSTEM_PYTHON = Path("/usr/bin/python3")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, code, the prose just before it) for every fenced block."""
    out = []
    for m in _FENCE.finditer(text):
        before = text[max(0, m.start() - 400) : m.start()]
        out.append((m.group(1), m.group(2), before))
    return out


def _block_after(text: str, marker: str, lang: str) -> str:
    for language, code, before in _blocks(text):
        if language == lang and marker in before:
            return code
    raise AssertionError(f"README has no {lang} block after {marker!r}")


@pytest.mark.fast
def test_links_stay_inside_the_repository() -> None:
    for doc in (README, REPO / "deploy" / "README.md"):
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", target, re.I), f"{doc.name}: a link leaves the repository: {target}"
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(REPO) and path.exists(), f"{doc.name}: {target} is not a file of the repository"
        # Documents named in the text (not linked) must not be outside it either.
        for rel in re.findall(r"(?<![\w/])(\.\./[\w./-]+\.md)\b", text):
            assert (doc.parent / rel).resolve().is_relative_to(REPO), f"{doc.name}: {rel} is outside the repository"


@pytest.mark.fast
def test_the_setup_commands_are_the_scripts() -> None:
    text = README.read_text(encoding="utf-8")
    assert _block_after(text, "**Run the gateway**", "sh").strip() == "bash scripts/serve"
    assert _block_after(text, "**Run the tests**", "sh").strip() == "bash scripts/test"
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("bash scripts/test")


def _tracked_copy(dest: Path) -> None:
    try:
        names = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "data", "__pycache__", "*.egg-info"))
        return
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _clean_env(port: int) -> dict[str, str]:
    drop = ("LLM_PROXY_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "OPENAI_", "ANTHROPIC_", "GEMINI_", "NOTIFY_SOCKET")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # the system's python3, nothing of this checkout
    env["LLM_PROXY_PORT"] = str(port)
    return env


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no system /usr/bin/python3")
async def test_the_first_command_works_as_printed_on_a_clean_copy(tmp_path: Path) -> None:
    version = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True, timeout=30)
    if version.stdout.strip() != "True":
        pytest.skip("the system python3 is older than 3.11 (README: Python >= 3.11)")
    text = README.read_text(encoding="utf-8")
    repo = tmp_path / "llm-proxy"
    repo.mkdir()
    _tracked_copy(repo)
    assert not (repo / ".venv").exists() and not (repo / "data").exists()
    port = free_port()
    env = _clean_env(port)
    log = tmp_path / "serve.log"
    command = _block_after(text, "**Run the gateway**", "sh").strip()
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # the venv and its packages: a loaded CI machine is slow
        async with aiohttp.ClientSession() as s:
            while True:
                assert proc.poll() is None, f"`{command}` exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"no /healthz from `{command}`:\n{log.read_text()[-4000:]}"
                try:
                    async with s.get(url + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        assert (repo / ".venv" / "bin" / "llm-proxy").exists()
        # The README's next step, then its curl call and its Python snippet, against it.
        made = subprocess.run([".venv/bin/llm-proxy", "keys", "create", "--name", "me"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        key = next(w for w in made.stdout.split() if w.startswith("sk-"))
        assert (repo / "data" / "llm-proxy.db").exists()  # the state dir the README names
        curl = _block_after(text, "## Using it", "sh").replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        if shutil.which("curl", path=env["PATH"]):
            done = subprocess.run(["bash", "-c", curl.replace("export KEY=sk-...", f"export KEY={key}")], env=env,
                                  capture_output=True, timeout=60)
            assert done.returncode == 0 and b"data: [DONE]" in done.stdout, done
        snippet = _block_after(text, "## Using it", "python").replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        ran = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", snippet], env={**os.environ, "KEY": key}, capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 0, ran.stderr
        assert len(ran.stdout.strip().splitlines()) == 3  # three answers: OpenAI, Anthropic, Gemini
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, log.read_text()[-4000:]
