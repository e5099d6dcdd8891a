"""Prometheus metrics: convserve's own, on /metrics, every label from a bounded set.

Requests are labelled by route template (`/v2/models/{name}/infer`, or `unmatched`), never by
raw path, so junk URLs cannot grow the output; gRPC calls by method (the service's own, a fixed
set: gRPC itself answers any other with UNIMPLEMENTED) and status code. Batching is measured
where it happens: images per ONNX Runtime call, time in the queue, time of the call, images
dropped before it.

`prometheus_client` is imported when the worker creates its metrics, after BentoML has set
PROMETHEUS_MULTIPROC_DIR, so every worker writes to the shared files /metrics reads.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

errors_log = logging.getLogger("convserve.errors")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServiceMetrics:
    def __init__(self) -> None:
        import prometheus_client as prom  # here, not at import: see the module docstring

        model = ["model", "version"]
        self.batch_size = prom.Histogram(
            "convserve_batch_size_images",
            "images per ONNX Runtime call (adaptive batching counts images)",
            model,
            buckets=BATCH_BUCKETS,
        )
        self.queue_wait = prom.Histogram(
            "convserve_queue_wait_seconds",
            "time a request's images waited in the batcher before inference",
            model,
            buckets=SECONDS_BUCKETS,
        )
        self.inference = prom.Histogram(
            "convserve_inference_seconds",
            "time of one ONNX Runtime call (one batch)",
            model,
            buckets=SECONDS_BUCKETS,
        )
        self.dropped = prom.Counter(
            "convserve_dropped_images_total",
            "images never run: their client went away (cancelled), their deadline passed "
            "(expired), or the queue could not meet the latency budget (overloaded)",
            [*model, "reason"],
        )
        self.rejected = prom.Counter(
            "convserve_rejected_requests_total",
            "requests answered with an error, by error code",
            ["code"],
        )
        self.requests = prom.Counter(
            "convserve_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
        )
        self.duration = prom.Histogram(
            "convserve_request_duration_seconds",
            "HTTP request time, from its first byte read to its last byte written",
            ["route"],
            buckets=SECONDS_BUCKETS,
        )
        self.grpc_requests = prom.Counter(
            "convserve_grpc_requests_total",
            "gRPC calls (inference.GRPCInferenceService) by method and status code",
            ["method", "code"],
        )
        self.grpc_duration = prom.Histogram(
            "convserve_grpc_request_duration_seconds",
            "gRPC call time, from its message received to its answer handed to gRPC",
            ["method"],
            buckets=SECONDS_BUCKETS,
        )

        self.images = prom.Counter(
            "convserve_images_total",
            "images run through ONNX Runtime",
            model,
        )
        self.queued = prom.Gauge(
            "convserve_queued_images",
            "images waiting for inference (sampled ten times a second)",
            model,
            multiprocess_mode="livesum",
        )
        self.in_flight = prom.Gauge(
            "convserve_in_flight_requests",
            "inference requests admitted and not yet answered (sampled ten times a second)",
            multiprocess_mode="livesum",
        )
        self.heads_closed = prom.Counter(
            "convserve_heads_closed_total",
            "connections closed while still sending their request head: past the head "
            "deadline, or the oldest past the cap on heads in progress",
        )
        self.client_gone = prom.Counter(
            "convserve_client_gone_requests_total",
            "requests whose client hung up before the answer, while sending its body or while "
            "it was handled; their images were dropped before inference (see "
            "convserve_dropped_images_total)",
        )

    def observer(self, tag: str) -> BatchMetrics:
        return BatchMetrics(self, *tag.split(":", 1))


class BatchMetrics:
    """The batcher's observer for one model version."""

    def __init__(self, metrics: ServiceMetrics, model: str, version: str) -> None:
        self._dropped, self._labels = metrics.dropped, (model, version)
        self._size = metrics.batch_size.labels(model, version)
        self._wait = metrics.queue_wait.labels(model, version)
        self._inference = metrics.inference.labels(model, version)
        self._images = metrics.images.labels(model, version)

    def on_batch(self, images: int, queue_waits_s: Sequence[float], seconds: float) -> None:
        self._images.inc(images)
        self._size.observe(images)
        self._inference.observe(seconds)
        for wait in queue_waits_s:
            self._wait.observe(wait)

    def on_dropped(self, images: int, reason: str) -> None:
        self._dropped.labels(*self._labels, reason).inc(images)


@functools.cache
def service_metrics() -> ServiceMetrics:
    # Collectors register once per process; a second service instance in the same process
    # (in-process tests) shares them.
    return ServiceMetrics()


def refused(code: str) -> None:
    """Every error answer, whoever answers it: counted by code, and one log line (with the
    request id)."""
    service_metrics().rejected.labels(code).inc()
    errors_log.info("answered %s", code, extra={"code": code})


def exposition() -> tuple[bytes, str]:
    """The /metrics body: every worker's values when BentoML runs several (multiprocess mode)."""
    import prometheus_client as prom
    from prometheus_client import multiprocess

    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = prom.REGISTRY
    return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST
