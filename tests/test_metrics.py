"""The per-call series, rendered: counters summed per model, histograms per endpoint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.store.base import UsageRecord

pytestmark = pytest.mark.fast  # pure units: no sockets (see README, "Run the tests")


def _record(endpoint: str, model: str, status: int, **fields: object) -> UsageRecord:
    return UsageRecord("req", 0.0, "key_1", "alice", endpoint, model, "up", model, False, status, **fields)  # type: ignore[arg-type]


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render(SimpleNamespace(streams=(), in_flight=0, sink=None))
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_histograms_are_per_endpoint_whatever_the_model_and_status() -> None:
    m = Metrics()
    m.observe_record(_record("chat.completions", "a", 200, ttft_ms=3.0, duration_ms=20.0))
    m.observe_record(_record("chat.completions", "b", 200, ttft_ms=30.0, duration_ms=200.0))
    m.observe_record(_record("chat.completions", "a", 502, duration_ms=5.0))        # no first byte
    m.observe_record(_record("messages", "a", 200, ttft_ms=-1.0, duration_ms=-2.0))  # clock stepped back
    got = _samples(m)

    def h(name: str, endpoint: str, le: str | None = None) -> float:
        labels = {"endpoint": endpoint} | ({"le": le} if le is not None else {})
        return got[(f"llm_proxy_{name}", tuple(sorted(labels.items())))]

    assert h("time_to_first_byte_seconds_count", "chat.completions") == 2
    assert h("time_to_first_byte_seconds_bucket", "chat.completions", "0.005") == 1
    assert h("time_to_first_byte_seconds_bucket", "chat.completions", "0.025") == 1
    assert h("time_to_first_byte_seconds_bucket", "chat.completions", "0.05") == 2
    assert abs(h("time_to_first_byte_seconds_sum", "chat.completions") - 0.033) < 1e-9
    assert h("request_duration_seconds_count", "chat.completions") == 3
    assert h("request_duration_seconds_bucket", "chat.completions", "0.005") == 1   # le is inclusive
    assert h("request_duration_seconds_bucket", "chat.completions", "0.025") == 2
    assert h("request_duration_seconds_bucket", "chat.completions", "0.25") == 3
    assert abs(h("request_duration_seconds_sum", "chat.completions") - 0.225) < 1e-9
    # Negative times count as 0 s, in the first bucket.
    assert h("time_to_first_byte_seconds_bucket", "messages", "0.005") == 1
    assert h("request_duration_seconds_sum", "messages") == 0
    # An endpoint that never saw a first byte has no ttft series at all.
    assert not any(name.startswith("llm_proxy_time_to_first_byte") and ("endpoint", "other") in labels
                   for name, labels in got)


def test_token_counters_sum_every_kind_per_model() -> None:
    m = Metrics()
    m.observe_record(_record("chat.completions", "a", 200, prompt_tokens=10, completion_tokens=5, cached_tokens=4,
                             reasoning_tokens=2, cost_usd=0.5, estimated=True))
    m.observe_record(_record("messages", "a", 200, prompt_tokens=1, completion_tokens=1, cache_creation_tokens=3,
                             cost_usd=0.25))
    m.observe_record(_record("chat.completions", "a", 504, outcome="timeout", error="upstream_timeout"))
    got = _samples(m)
    tokens = {labels: v for (name, labels), v in got.items() if name == "llm_proxy_tokens_total"}
    assert tokens == {
        (("kind", "prompt"), ("model", "a")): 11,
        (("kind", "completion"), ("model", "a")): 6,
        (("kind", "cached"), ("model", "a")): 4,
        (("kind", "cache_creation"), ("model", "a")): 3,
        (("kind", "reasoning"), ("model", "a")): 2,
    }
    assert got[("llm_proxy_cost_usd_total", (("model", "a"),))] == 0.75
    assert got[("llm_proxy_estimated_requests_total", (("model", "a"),))] == 1
    assert got[("llm_proxy_upstream_errors_total", (("outcome", "timeout"), ("upstream", "up")))] == 1
    assert got[("llm_proxy_requests_total", (("endpoint", "chat.completions"), ("model", "a"), ("status", "504")))] == 1
