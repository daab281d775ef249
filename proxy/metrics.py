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
    llm_proxy_upstream_attempts_total{upstream,outcome}   every attempt, ok ones too
    llm_proxy_routes_in_cooldown                 routes (upstream + model) skipped by their breaker now
    llm_proxy_time_to_first_byte_seconds{endpoint}   histogram
    llm_proxy_request_duration_seconds{endpoint}     histogram
    llm_proxy_open_streams, llm_proxy_in_flight_requests
    llm_proxy_usage_queue_depth, llm_proxy_usage_spool_bytes, llm_proxy_usage_store_ok
    llm_proxy_usage_records_total{path}          path: written|spooled|replayed
    llm_proxy_usage_store_errors_total, llm_proxy_usage_spool_errors_total
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        accepting = GaugeMetricFamily(
            "llm_proxy_usage_accepting",
            "1 while billable requests are served; 0 while they get 503 because usage cannot be kept (spool full, disk refusing)",
        )
        records = CounterMetricFamily("llm_proxy_usage_records", "Usage records by where they went", labels=["path"])
        store_errors = CounterMetricFamily("llm_proxy_usage_store_errors", "Failed or timed-out usage store writes")
        spool_errors = CounterMetricFamily("llm_proxy_usage_spool_errors", "Failed usage spool appends (records kept in memory)")
        if sink is not None:
            depth.add_metric([], sink.depth)
            spool.add_metric([], sink.spool_bytes)
            ok.add_metric([], 1 if sink.store_ok else 0)
            accepting.add_metric([], 1 if sink.accepting else 0)
            records.add_metric(["written"], sink.written)
            records.add_metric(["spooled"], sink.spooled)
            records.add_metric(["replayed"], sink.replayed)
            store_errors.add_metric([], sink.store_errors)
            spool_errors.add_metric([], sink.spool_errors)
        yield from (depth, spool, ok, accepting, records, store_errors, spool_errors)


class _CallStats(Collector):
    """Per-call counters and histograms kept as plain dicts and lists, turned into
    Prometheus families only at scrape time.

    One event loop writes them, so they need no locks; prometheus-client's own
    Counter/Histogram children take a lock and do more bookkeeping per update, which
    was a visible share of the hot path at a few thousand calls per second.
    """

    def __init__(self) -> None:
        # (endpoint, model, status) -> [calls, prompt, completion, cached, cache_creation,
        # reasoning, estimated calls, cost, ttft histogram, duration histogram]: one
        # lookup per record; per-model series and per-endpoint histograms are summed from
        # it at scrape time. A histogram is [count per bucket (last: +Inf)..., sum].
        self.calls: dict[tuple[str, str, int], list[Any]] = {}
        self.upstream_errors: dict[tuple[str, ...], float] = {}
        self.attempts: dict[tuple[str, ...], float] = {}

    def observe(self, rec: UsageRecord) -> None:
        key = (rec.endpoint, rec.model, rec.status)
        agg = self.calls.get(key)
        if agg is None:
            agg = self.calls[key] = [0, 0, 0, 0, 0, 0, 0, 0.0, _new_histogram(), _new_histogram()]
        agg[0] += 1
        agg[1] += rec.prompt_tokens
        agg[2] += rec.completion_tokens
        agg[3] += rec.cached_tokens
        agg[4] += rec.cache_creation_tokens
        agg[5] += rec.reasoning_tokens
        agg[6] += rec.estimated
        agg[7] += max(0.0, rec.cost_usd)
        outcome = rec.outcome
        ekey = (rec.upstream, outcome)
        self.attempts[ekey] = self.attempts.get(ekey, 0) + 1
        if outcome in ("upstream_error", "timeout"):
            self.upstream_errors[ekey] = self.upstream_errors.get(ekey, 0) + 1
        # Seconds; a clock step backwards counts as 0. `le` is inclusive: bisect_left.
        ttft_ms, duration_ms = rec.ttft_ms, rec.duration_ms
        if ttft_ms is not None:
            seconds = ttft_ms / 1000 if ttft_ms > 0 else 0.0
            counts = agg[8]
            counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
            counts[-1] += seconds
        seconds = duration_ms / 1000 if duration_ms > 0 else 0.0
        counts = agg[9]
        counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def _by_model(self, index: int) -> dict[tuple[str, ...], Any]:
        """One aggregate column summed per model (models with nothing in it are left out)."""
        totals: dict[tuple[str, ...], Any] = {}
        for (_, model, _), agg in self.calls.items():
            if agg[index]:
                totals[(model,)] = totals.get((model,), 0) + agg[index]
        return totals

    def _by_endpoint(self, index: int) -> dict[str, list[float]]:
        """One histogram column summed per endpoint (endpoints with no observation left out)."""
        totals: dict[str, list[float]] = {}
        for (endpoint, _, _), agg in self.calls.items():
            counts = agg[index]
            if any(counts[:-1]):
                total = totals.setdefault(endpoint, _new_histogram())
                for i, n in enumerate(counts):
                    total[i] += n
        return totals

    def collect(self) -> Iterator[Metric]:
        requests: dict[tuple[str, ...], float] = {
            (endpoint, model, str(status)): agg[0] for (endpoint, model, status), agg in self.calls.items()
        }
        tokens: dict[tuple[str, ...], float] = {
            (model, kind): n
            for i, kind in enumerate(_TOKEN_KINDS, start=1)
            for (model,), n in self._by_model(i).items()
        }
        yield _counter("llm_proxy_requests", "Model calls (upstream attempts) by endpoint, model and status",
                       ["endpoint", "model", "status"], requests)
        yield _counter("llm_proxy_tokens", "Tokens by model and kind", ["model", "kind"], tokens)
        yield _counter("llm_proxy_estimated_requests", "Model calls whose token counts are estimated", ["model"],
                       self._by_model(6))
        yield _counter("llm_proxy_upstream_errors", "Failed upstream attempts", ["upstream", "outcome"], self.upstream_errors)
        yield _counter("llm_proxy_upstream_attempts", "Upstream attempts by upstream and outcome", ["upstream", "outcome"],
                       self.attempts)
        yield _counter("llm_proxy_cost_usd", "Spend in USD by model", ["model"], self._by_model(7))
        yield _histogram("llm_proxy_time_to_first_byte_seconds", "Time to first byte", self._by_endpoint(8))
        yield _histogram("llm_proxy_request_duration_seconds", "Request duration", self._by_endpoint(9))


def _counter(name: str, doc: str, labels: list[str], table: Mapping[tuple[str, ...], float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, count in table.items():
        family.add_metric(list(values), count)
    return family


def _go_float(value: float) -> str:
    """A bucket bound as Prometheus writes it (prometheus_client's helper is untyped)."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    return text


def _new_histogram() -> list[float]:
    return [0.0] * (len(_LATENCY_BUCKETS) + 2)


def _histogram(name: str, doc: str, table: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["endpoint"])
    for label, counts in table.items():
        cumulative, buckets = 0.0, []
        for bound, count in zip((*_LATENCY_BUCKETS, float("inf")), counts[:-1], strict=True):
            cumulative += count
            buckets.append((_go_float(bound), cumulative))
        family.add_metric([label], buckets, sum_value=counts[-1])
    return family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.open_streams = Gauge("llm_proxy_open_streams", "Streams being relayed", registry=r)
        self.in_flight = Gauge("llm_proxy_in_flight_requests", "Requests being handled", registry=r)
        self.cooling = Gauge("llm_proxy_routes_in_cooldown", "Routes (upstream + model) their breaker skips now", registry=r)
        self._calls = _CallStats()
        r.register(self._calls)
        self._sink = _SinkCollector()
        r.register(self._sink)
        self.observe_record = self._calls.observe

    def render(self, state: Any) -> tuple[bytes, str]:
        self.open_streams.set(len(state.streams))
        self.in_flight.set(state.in_flight)
        health = getattr(state, "health", None)   # (a state without breakers: some tests' stand-ins)
        if health is not None:
            self.cooling.set(health.in_cooldown({route.key for route in state.router.routes}))
        self._sink.sink = state.sink
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
