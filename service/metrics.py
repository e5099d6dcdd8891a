"""Prometheus metrics the service adds to BentoML's own on /metrics."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import bentoml

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.batch_size = bentoml.metrics.Histogram(
            name="convserve_batch_size_images",
            documentation="images per ONNX Runtime call (adaptive batching counts images)",
            labelnames=["model"],
            buckets=BATCH_BUCKETS,
        )
        self.queue_wait = bentoml.metrics.Histogram(
            name="convserve_queue_wait_seconds",
            documentation="time a request's images waited in the batcher before inference",
            labelnames=["model"],
            buckets=WAIT_BUCKETS,
        )
        self.inference = bentoml.metrics.Histogram(
            name="convserve_inference_seconds",
            documentation="time of one ONNX Runtime call (one batch)",
            labelnames=["model"],
            buckets=WAIT_BUCKETS,
        )
        self.dropped = bentoml.metrics.Counter(
            name="convserve_dropped_images_total",
            documentation="images never run: their client went away (cancelled), their "
            "deadline passed (expired), or the queue could not meet the latency budget",
            labelnames=["model", "reason"],
        )
        self.rejected = bentoml.metrics.Counter(
            name="convserve_rejected_requests_total",
            documentation="requests answered with an error, by error code",
            labelnames=["code"],
        )

    def observer(self, model: str) -> BatchMetrics:
        return BatchMetrics(self, model)


class BatchMetrics:
    """The batcher's observer for one model."""

    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self._metrics, self._model = metrics, model
        self._size = metrics.batch_size.labels(model=model)
        self._wait = metrics.queue_wait.labels(model=model)
        self._inference = metrics.inference.labels(model=model)

    def on_batch(self, images: int, queue_waits_s: Sequence[float], seconds: float) -> None:
        self._size.observe(images)
        self._inference.observe(seconds)
        for wait in queue_waits_s:
            self._wait.observe(wait)

    def on_dropped(self, images: int, reason: str) -> None:
        self._metrics.dropped.labels(model=self._model, reason=reason).inc(images)


@functools.cache
def service_metrics() -> ServiceMetrics:
    # Prometheus collectors are registered once per process; a second service instance in the
    # same process (in-process tests) shares them.
    return ServiceMetrics()
