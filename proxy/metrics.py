"""Prometheus metrics (`GET /metrics`). Labels never carry keys or key names.

Each gateway process has its own registry (no module globals), so tests can build
many apps in one interpreter.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy.store.base import UsageRecord

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("llm_proxy_requests", "Model calls by endpoint, model and status", ["endpoint", "model", "status"], registry=r)
        self.tokens = Counter("llm_proxy_tokens", "Tokens by model and kind", ["model", "kind"], registry=r)
        self.upstream_errors = Counter("llm_proxy_upstream_errors", "Failed upstream attempts", ["upstream", "outcome"], registry=r)
        self.ttft = Histogram("llm_proxy_time_to_first_byte_seconds", "Time to first byte", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("llm_proxy_request_duration_seconds", "Request duration", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.cost = Counter("llm_proxy_cost_usd", "Spend in USD by model", ["model"], registry=r)
        self.open_streams = Gauge("llm_proxy_open_streams", "Streams being relayed", registry=r)
        self.in_flight = Gauge("llm_proxy_in_flight_requests", "Requests being handled", registry=r)
        self.queue_depth = Gauge("llm_proxy_usage_queue_depth", "Usage records waiting to be written", registry=r)
        self.spool_bytes = Gauge("llm_proxy_usage_spool_bytes", "Bytes of usage records spooled to disk", registry=r)

    def observe_record(self, rec: UsageRecord) -> None:
        self.requests.labels(rec.endpoint, rec.model, str(rec.status)).inc()
        if rec.prompt_tokens:
            self.tokens.labels(rec.model, "prompt").inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self.tokens.labels(rec.model, "completion").inc(rec.completion_tokens)
        if rec.cached_tokens:
            self.tokens.labels(rec.model, "cached").inc(rec.cached_tokens)
        if rec.cost_usd:
            self.cost.labels(rec.model).inc(rec.cost_usd)
        if rec.outcome in ("upstream_error", "timeout"):
            self.upstream_errors.labels(rec.upstream, rec.outcome).inc()
        if rec.ttft_ms is not None:
            self.ttft.labels(rec.endpoint).observe(rec.ttft_ms / 1000)
        self.duration.labels(rec.endpoint).observe(rec.duration_ms / 1000)

    def render(self, state: Any) -> tuple[bytes, str]:
        self.open_streams.set(len(state.streams))
        self.in_flight.set(state.in_flight)
        if state.sink is not None:
            self.queue_depth.set(state.sink.depth)
            self.spool_bytes.set(state.sink.spool_bytes)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
