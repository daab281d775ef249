"""The benchmark suite starts and prints its table (a smoke run; never a timed assertion).

`python -m bench.run --smoke` starts the bench upstream, llm-proxy and (when installed)
nginx, runs every scenario for a second or two, and prints the results table. Missing
wrk / nginx / taskset are skipped by the suite itself (their cells read n/a).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = proc.stdout
    header = next((line for line in text.splitlines() if line.startswith("metric")), None)
    assert header is not None, text
    for column in ("direct", "llm-proxy", "nginx", "proxy/direct", "proxy/nginx", "target"):
        assert column in header
    for row in ("req/s", "CPU us/request", "of which in the kernel", "added p50 ms", "added TTFB p50 ms", "bunched gaps %",
                "KB per open stream", "idle RSS MB"):
        assert row in text, row
    raw = json.loads(out.read_text())
    assert set(raw["summary"]) == {"direct", "llm-proxy", "nginx"}
    assert raw["machine"]["python"]
    # The Python-only scenarios always run, so llm-proxy has numbers for them.
    proxy = raw["summary"]["llm-proxy"]
    assert proxy["e_idle_rss_mb"] is not None
    assert proxy["b_p50_ms"] is not None
    assert proxy["c_hi_bunched_pct"] is not None


def test_bench_ab_compares_two_instances(tmp_path: Path) -> None:
    """`python -m bench.ab` ages A (here by scenario e only), loads A and B at once and
    prints the ratio of their CPU per request (a smoke run: the number is not judged)."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--age", "e", "--rounds", "1", "--seconds", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "CPU per request ratio" in proc.stdout
    raw = json.loads(out.read_text())
    (only,) = raw["rounds"]
    assert only["a"]["cpu_us_per_req"] > 0 and only["b"]["cpu_us_per_req"] > 0
    assert raw["median_ratio"] > 0


def test_bench_translated_prints_the_side_by_side(tmp_path: Path) -> None:
    """`python -m bench.translated --smoke`: an Anthropic Messages client through llm-proxy
    onto the bench's OpenAI-chat upstream, beside the same-dialect call and direct, for a
    second each (LiteLLM stays out of a smoke run; the numbers are not judged)."""
    out = tmp_path / "translated.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.translated", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "llm-proxy messages->chat" in proc.stdout and "bunched" in proc.stdout
    raw = json.loads(out.read_text())
    assert "left_out" not in raw, raw.get("left_out")
    assert "litellm" not in raw
    translated = raw["summary"]["llm-proxy messages->chat"]
    # Every translated stream carried its content chunks (the marker was found in them).
    assert translated["ttfb_p50_ms"] is not None
    assert translated["stream_errors"] == 0 and translated["short_streams"] == 0
    assert translated["hi_bunched_pct"] is not None
    if shutil.which("wrk") is not None:
        assert translated["non2xx"] == 0 and translated["ratio_cpu_req"] > 0
