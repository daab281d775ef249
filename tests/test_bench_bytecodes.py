"""bench.bytecodes: what it reports from the traced gateway's counts.

The measurement runs the gateway under a tracer for a minute, which is a bench, not a
test; this checks the part that turns its counts into bytecodes per request by function.
"""

from __future__ import annotations

import pytest

from bench import bytecodes
from bench.run import REPO

pytestmark = pytest.mark.fast


def test_counts_become_bytecodes_per_request_by_function() -> None:
    text = (
        f"600\t{REPO}/proxy/forward.py:93:Forwarder._attempts\n"
        f"300\t{REPO}/proxy/forward.py:300:Forwarder._attempts\n"   # one name, two code objects
        "90\t/usr/lib/python3.11/asyncio/events.py:78:Handle._run\n"
        "30\t/x/.venv/lib/python3.11/site-packages/orjson/__init__.py:1:<module>\n"
    )
    assert bytecodes._parse(text, 3) == {
        "proxy/forward.py:Forwarder._attempts": 300.0,
        "asyncio/events.py:Handle._run": 30.0,
        "orjson/__init__.py:<module>": 10.0,
    }
