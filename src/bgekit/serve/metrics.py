"""Prometheus metrics of one server (its own registry, so several apps in one process never clash).

Batching shows as ``bgekit_batch_requests`` (requests per forward batch: its ``_sum / _count``
is the mean batch size), ``bgekit_batch_items`` and ``bgekit_batch_padded_tokens``; usage as
``bgekit_input_tokens_total`` (real tokens); health as ``bgekit_worker_healthy``,
``bgekit_worker_busy_seconds`` and ``bgekit_queue_requests``, read live at every scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .batcher import Batcher, BatchStats

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _WorkerCollector(Collector):
    """Queue depth, busy time and health of every batcher, read when Prometheus scrapes."""

    def __init__(self, batchers: Callable[[], Iterable[Batcher]]):
        self._batchers = batchers

    def collect(self):
        queued = GaugeMetricFamily("bgekit_queue_requests", "Requests waiting for the model", labels=["model"])
        busy = GaugeMetricFamily(
            "bgekit_worker_busy_seconds",
            "Seconds since the batch in flight last made progress (0 when idle)",
            labels=["model"],
        )
        healthy = GaugeMetricFamily(
            "bgekit_worker_healthy", "1 when the model worker is neither stuck nor failing", labels=["model"]
        )
        for batcher in self._batchers():
            queued.add_metric([batcher.name], batcher.queued)
            busy.add_metric([batcher.name], batcher.busy_seconds())
            healthy.add_metric([batcher.name], 1.0 if batcher.healthy() else 0.0)
        yield from (queued, busy, healthy)


class ServeMetrics:
    """Every metric the server exports."""

    def __init__(self, batchers: Callable[[], Iterable[Batcher]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bgekit_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "bgekit_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "bgekit_batch_requests", "Requests joined in one forward batch", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_items = Histogram(
            "bgekit_batch_items", "Texts or pairs in one forward batch", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "bgekit_batch_padded_tokens",
            "Padded tokens (items x longest) in one forward batch",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "bgekit_forward_duration_seconds",
            "Time the model spent on one batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "bgekit_queue_wait_seconds",
            "Time a request waited between tokenization and its forward batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.input_tokens = Counter(
            "bgekit_input_tokens", "Tokens read by the model (what usage reports)", ["model"], registry=r
        )
        self.truncated = Counter(
            "bgekit_truncated_inputs", "Inputs cut to the model's max_length", ["model"], registry=r
        )
        self.rejected = Counter(
            "bgekit_rejected_requests",
            "Requests refused before the model: queue_full (429), worker_unavailable (503), too_long (413)",
            ["model", "reason"],
            registry=r,
        )
        self.model_errors = Counter(
            "bgekit_model_errors", "Requests that failed inside the model (500)", ["model"], registry=r
        )
        self.failed_batches = Counter(
            "bgekit_failed_batches", "Forward batches in which every request failed", ["model"], registry=r
        )
        r.register(_WorkerCollector(batchers))

    def on_batch(self, model: str, stats: BatchStats) -> None:
        """The batcher's callback after each forward batch."""
        self.batch_requests.labels(model).observe(stats.requests)
        self.batch_items.labels(model).observe(stats.items)
        self.batch_tokens.labels(model).observe(stats.padded_tokens)
        self.forward_seconds.labels(model).observe(stats.seconds)
        for wait in stats.queue_wait:
            self.queue_seconds.labels(model).observe(wait)
        if stats.failed:
            self.failed_batches.labels(model).inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """``(body, content type)`` for a scrape's ``Accept`` header, as prometheus_client's own exporters
        answer: OpenMetrics when asked for it, else the text format that ``generate_latest`` writes with
        its content type (``text/plain; version=0.0.4; charset=utf-8``). ``CONTENT_TYPE_LATEST`` is not that
        type in recent prometheus-client releases (``version=1.0.0``), so it misnamed the body's format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
