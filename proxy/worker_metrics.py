"""One `/metrics` scrape for the whole service when `serve --workers N` runs N processes.

With SO_REUSEPORT the kernel hands a scrape to any one worker, and each worker counts
only its own requests, so a scrape used to show one worker's numbers. Here every worker
also listens on a Unix socket of its own in a private directory the parent made (mode
0700: only the service's user can connect), where it answers with its own exposition
text and closes. The worker that gets the scrape reads its siblings' texts and merges
them with its own:

- counters and histograms: summed per label set (a worker that restarted starts from 0,
  which Prometheus' rate() reads as a counter reset, as for any restarted process);
- gauges: summed (streams, requests in flight, queued records), except the ones in
  `_GAUGE_MERGE` (a shared spool's size is the largest any worker sees; "ok" flags are
  the minimum: one worker refusing is the service refusing, in part).

`llm_proxy_workers` is the number of workers started, `llm_proxy_workers_scraped` the
number whose numbers are in this scrape (a sibling that does not answer within
`timeout_s` is left out, and the two differ).

prometheus_client's own multiprocess mode was not used: it supports only its Counter /
Gauge / Histogram objects (files per process), not the custom collectors the gateway
keeps its per-call numbers in (proxy/metrics.py: plain dicts, for the hot path's sake).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger("llm_proxy.metrics")

_GAUGE_MERGE: dict[str, Callable[[Iterable[float]], float]] = {
    "llm_proxy_usage_spool_bytes": max,
    "llm_proxy_usage_store_ok": min,
    "llm_proxy_usage_accepting": min,
}


def socket_path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.sock"


class WorkerMetrics:
    """Worker `index` of `count`: serves its own exposition on its socket in `directory`
    and merges its siblings' into a scrape."""

    def __init__(self, directory: Path, index: int, count: int, timeout_s: float = 2.0) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self._timeout = timeout_s
        self._server: asyncio.AbstractServer | None = None

    async def start(self, render_local: Callable[[], bytes]) -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(render_local())
                await writer.drain()
            except (ConnectionError, OSError):
                pass  # the scraping sibling gave up
            finally:
                writer.close()

        path = socket_path(self.directory, self.index)
        path.unlink(missing_ok=True)  # left by a worker of this index that died
        self._server = await asyncio.start_unix_server(answer, path=str(path))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        socket_path(self.directory, self.index).unlink(missing_ok=True)

    async def scrape(self, local: bytes) -> bytes:
        """This worker's exposition merged with every sibling's that answers in time."""
        others = [i for i in range(self.count) if i != self.index]
        texts = await asyncio.gather(*(self._fetch(i) for i in others))
        answered = [local, *(t for t in texts if t is not None)]
        return merge(answered, started=self.count)

    async def _fetch(self, index: int) -> bytes | None:
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_unix_connection(str(socket_path(self.directory, index)))
                try:
                    return await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(ConnectionError, OSError):
                        await writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.debug("worker %d did not answer the metrics scrape (%s)", index, type(exc).__name__)
            return None


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge(texts: Iterable[bytes], started: int) -> bytes:
    """Prometheus text expositions of the same series from several processes, as one."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    scraped = 0
    for text in texts:
        scraped += 1
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            table = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a per-process start time: no sum makes sense of it
                table.setdefault((sample.name, tuple(sorted(sample.labels.items()))), []).append(sample.value)
    for name, family in families.items():
        combine = _GAUGE_MERGE.get(name, sum) if family.type == "gauge" else sum
        for (sample_name, labels), numbers in values[name].items():
            family.samples.append(Sample(sample_name, dict(labels), combine(numbers)))
    workers = Metric("llm_proxy_workers", "Gateway worker processes started", "gauge")
    workers.samples.append(Sample("llm_proxy_workers", {}, started))
    answered = Metric("llm_proxy_workers_scraped", "Worker processes whose numbers are in this scrape", "gauge")
    answered.samples.append(Sample("llm_proxy_workers_scraped", {}, scraped))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([*families.values(), workers, answered]))
    return generate_latest(registry)
