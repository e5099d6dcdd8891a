"""Service configuration from `CONVSERVE_*` environment variables (pydantic settings)."""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _available_cores() -> int:
    # sched_getaffinity honours taskset/cgroup pinning; cpu_count does not.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVSERVE_", frozen=True)

    model: str = Field("fashion-lenet5:latest", description="model store tag to serve")
    max_batch_size: int = Field(
        128, ge=1, description="most images one ONNX Runtime call receives (adaptive batching)"
    )
    max_latency_ms: int = Field(
        2000,
        ge=1,
        description="queue + inference budget per request before the batcher answers 503; "
        "generous so a burst of clients queues instead of being shed",
    )
    warmup_requests: int = Field(
        12,
        ge=0,
        description="requests run through the batcher before ready, to train its latency model",
    )
    max_images_per_request: int = Field(64, ge=1, description="images in one /classify call")
    default_top_k: int = Field(5, ge=1, description="predictions per image when top_k is absent")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="width x height cap, checked before pixels are decoded"
    )
    intra_op_threads: int = Field(
        default_factory=_available_cores, ge=1, description="ONNX Runtime threads per operator"
    )
    inter_op_threads: int = Field(1, ge=1, description="ONNX Runtime threads across operators")
