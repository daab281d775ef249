"""The benchmark suite starts and prints its table (a smoke run; never a timed assertion).

`python -m bench.run --smoke` starts the bench upstream, llm-proxy and (when installed)
nginx, runs every scenario for a second or two, and prints the results table. Missing
wrk / nginx / taskset are skipped by the suite itself (their cells read n/a).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
