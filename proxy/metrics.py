"""Prometheus metrics (`GET /metrics`). Labels never carry keys or key names.

Each gateway process has its own registry (no module globals), so tests can build
many apps in one interpreter.

Label values come from configuration only: `model` is a configured model name (a
request for an unknown model is refused before any record exists), `endpoint` one of
the fixed endpoint names, `upstream` a configured upstream name, `status` an HTTP
status. Nothing a client sends (key, key name, headers, body) becomes a label, which
also keeps the number of series bounded.

Series (one count per upstream attempt, i.e. per usage record):

    llm_proxy_requests_total{endpoint,model,status}
    llm_proxy_tokens_total{model,kind}          kind: prompt|completion|cached|cache_creation|reasoning
    llm_proxy_estimated_requests_total{model}   records whose tokens are an estimate
    llm_proxy_cost_usd_total{model}
    llm_proxy_upstream_errors_total{upstream,outcome}
    llm_proxy_time_to_first_byte_seconds{endpoint}   histogram
    llm_proxy_request_duration_seconds{endpoint}     histogram
    llm_proxy_open_streams, llm_proxy_in_flight_requests
    llm_proxy_usage_queue_depth, llm_proxy_usage_spool_bytes, llm_proxy_usage_store_ok
    llm_proxy_usage_records_total{path}          path: written|spooled|replayed
    llm_proxy_usage_store_errors_total, llm_proxy_usage_spool_errors_total
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from proxy.store.base import UsageRecord

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKEN_KINDS = ("prompt", "completion", "cached", "cache_creation", "reasoning")


class _SinkCollector(Collector):
    """Reads the usage sink's own counters at scrape time (the sink owns the numbers)."""

    def __init__(self) -> None:
        self.sink: Any = None

    def collect(self) -> Iterator[Metric]:
        sink = self.sink
        depth = GaugeMetricFamily("llm_proxy_usage_queue_depth", "Usage records in memory, waiting to be written")
        spool = GaugeMetricFamily("llm_proxy_usage_spool_bytes", "Bytes of usage records spooled to disk, waiting for replay")
        ok = GaugeMetricFamily("llm_proxy_usage_store_ok", "1 while the usage store accepts writes, 0 while records go to the spool")
        records = CounterMetricFamily("llm_proxy_usage_records", "Usage records by where they went", labels=["path"])
        store_errors = CounterMetricFamily("llm_proxy_usage_store_errors", "Failed or timed-out usage store writes")
        spool_errors = CounterMetricFamily("llm_proxy_usage_spool_errors", "Failed usage spool appends (records kept in memory)")
        if sink is not None:
            depth.add_metric([], sink.depth)
            spool.add_metric([], sink.spool_bytes)
            ok.add_metric([], 1 if sink.store_ok else 0)
            records.add_metric(["written"], sink.written)
            records.add_metric(["spooled"], sink.spooled)
            records.add_metric(["replayed"], sink.replayed)
            store_errors.add_metric([], sink.store_errors)
            spool_errors.add_metric([], sink.spool_errors)
        yield from (depth, spool, ok, records, store_errors, spool_errors)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("llm_proxy_requests", "Model calls (upstream attempts) by endpoint, model and status", ["endpoint", "model", "status"], registry=r)
        self.tokens = Counter("llm_proxy_tokens", "Tokens by model and kind", ["model", "kind"], registry=r)
        self.estimated = Counter("llm_proxy_estimated_requests", "Model calls whose token counts are estimated", ["model"], registry=r)
        self.upstream_errors = Counter("llm_proxy_upstream_errors", "Failed upstream attempts", ["upstream", "outcome"], registry=r)
        self.ttft = Histogram("llm_proxy_time_to_first_byte_seconds", "Time to first byte", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("llm_proxy_request_duration_seconds", "Request duration", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.cost = Counter("llm_proxy_cost_usd", "Spend in USD by model", ["model"], registry=r)
        self.open_streams = Gauge("llm_proxy_open_streams", "Streams being relayed", registry=r)
        self.in_flight = Gauge("llm_proxy_in_flight_requests", "Requests being handled", registry=r)
        self._sink = _SinkCollector()
        r.register(self._sink)
        # `labels()` takes a lock and builds a key on every call; the label sets are few
        # (configured models × endpoints × statuses), so the children are kept here.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_record(self, rec: UsageRecord) -> None:
        child = self._child
        child(self.requests, rec.endpoint, rec.model, str(rec.status)).inc()
        for kind, value in zip(
            _TOKEN_KINDS,
            (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens, rec.cache_creation_tokens, rec.reasoning_tokens),
            strict=True,
        ):
            if value > 0:
                child(self.tokens, rec.model, kind).inc(value)
        if rec.estimated:
            child(self.estimated, rec.model).inc()
        if rec.cost_usd > 0:
            child(self.cost, rec.model).inc(rec.cost_usd)
        if rec.outcome in ("upstream_error", "timeout"):
            child(self.upstream_errors, rec.upstream, rec.outcome).inc()
        if rec.ttft_ms is not None:
            child(self.ttft, rec.endpoint).observe(max(0.0, rec.ttft_ms) / 1000)
        child(self.duration, rec.endpoint).observe(max(0.0, rec.duration_ms) / 1000)

    def render(self, state: Any) -> tuple[bytes, str]:
        self.open_streams.set(len(state.streams))
        self.in_flight.set(state.in_flight)
        self._sink.sink = state.sink
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
