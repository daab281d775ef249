"""The import contracts in setup.cfg hold (layers, independence, no HTTP in wire formats)."""

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # a static check: no sockets (see README, "Run the tests")

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency (pip install -e '.[test]')"
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
