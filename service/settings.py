"""Service configuration: `CONVSERVE_*` environment variables, optionally a TOML file.

Precedence, highest first: environment, the file named by `CONVSERVE_CONFIG_FILE`, defaults.
The README's settings table is checked against this class by a test.
"""

from __future__ import annotations

import math
import os
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from convserve.defaults import DEFAULT_MODELS

ALL_MODELS = "*"  # CONVSERVE_MODELS: every model the store holds

CONFIG_FILE_ENV = "CONVSERVE_CONFIG_FILE"

# Short names a user may write, and the ONNX Runtime providers they stand for.
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def _available_cores() -> int:
    # sched_getaffinity honours taskset/cgroup pinning; cpu_count does not.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _split_list(value: object) -> object:
    """'a, b' -> ['a', 'b'] (environment); lists (TOML) pass through."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVSERVE_", frozen=True, extra="forbid")

    models: CommaList = Field(
        default=list(DEFAULT_MODELS),
        min_length=1,
        description="model store tags to serve, comma-separated; the first is the default "
        "model. `*`: every model in the store, its latest version, in name order",
    )
    api_token: str | None = Field(
        default=None,
        min_length=16,
        repr=False,
        description="when set, inference, metadata, the model listing and the page's API need "
        "`Authorization: Bearer <it>` (probes stay open); at least 16 characters",
    )
    admin_token: str | None = Field(
        default=None,
        min_length=16,
        repr=False,
        description="when set, model control (the repository API: index, load, unload) is on "
        "and needs `Authorization: Bearer <it>`; not an inference token. Unset: model control "
        "is off (403)",
    )
    header_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a request head (request line and headers) not complete this long after its "
        "first byte is closed with 408",
    )
    max_pending_heads: int = Field(
        default=1000,
        ge=1,
        description="connections per worker that may be sending a request head at once; past "
        "it the oldest is closed (well under the 20,000 files a process may open)",
    )
    grpc_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol over gRPC (Triton's and KServe's "
        "`inference.GRPCInferenceService`); every worker serves it (SO_REUSEPORT). 0: off",
    )
    grpc_host: str = Field(
        default="0.0.0.0",
        min_length=1,
        description="address the gRPC port binds; `convserve serve` sets it to its `--host` "
        "unless this is set",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="BentoML worker processes; each loads its own sessions, and the ONNX "
        "Runtime threads are divided among them",
    )
    max_batch_size: int = Field(
        default=128,
        ge=1,
        description="most images one ONNX Runtime call receives (adaptive batching)",
    )
    max_batch_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        description="most bytes of model input one ONNX Runtime call receives, which bounds its "
        "activations' memory: 224 px colour images (600 KB each as float32) go 17 to a call, "
        "28 px grey ones up to max_batch_size",
    )
    max_latency_ms: int = Field(
        default=2000,
        ge=1,
        description="queue + inference budget per request; a queued request that can no longer "
        "meet it is answered 503 at once",
    )
    max_queue_delay_ms: float = Field(
        default=0.0,
        ge=0,
        description="how long a batch that is not full may wait for more images (Triton's "
        "max_queue_delay); 0 never waits",
    )
    request_timeout_ms: int = Field(
        default=10_000, ge=1, description="hard deadline for one inference request; past it, 504"
    )
    warmup_requests: int = Field(
        default=12,
        ge=0,
        description="requests run through each batcher before ready, to train its latency model",
    )
    max_in_flight: int = Field(
        default=256, ge=1, description="inference requests handled at once; more are answered 503"
    )
    max_queued_images: int = Field(
        default=2048, ge=1, description="images waiting for or in inference, per model; more: 503"
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="request body limit in bytes; larger: 413. The default admits a 48-50 MP "
        "phone photo (10-20 MB as JPEG)",
    )
    max_held_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="request bodies held at once, in bytes, from first byte to answer; more: 503",
    )
    body_timeout_s: float = Field(
        default=10.0, gt=0, description="time allowed for a request body to arrive; slower: 408"
    )
    max_pending_bodies: int = Field(
        default=64,
        ge=1,
        description="requests whose body is still arriving after the first read (slow "
        "uploads); more: 503. They never take in-flight places",
    )
    max_request_pixels: int = Field(
        default=100_000_000,
        ge=1,
        description="pixels decoded, summed over a request's images, checked from their "
        "headers before any pixel is decoded (a JPEG decoded reduced counts at that size); "
        "more: 413",
    )
    drain_s: float = Field(
        default=5.0,
        ge=0,
        description="on SIGTERM, /readyz answers 503 at once while requests are still served "
        "this long; then in-flight work finishes and the process exits 0",
    )
    max_images_per_request: int = Field(default=64, ge=1, description="images in one request")
    default_top_k: int = Field(
        default=5, ge=1, description="predictions per image when top_k is absent"
    )
    max_image_pixels: int = Field(
        default=25_000_000,
        ge=1,
        description="pixels decoded of one image, checked from its header before any pixel is "
        "decoded: width x height, or for a JPEG the model's recipe decodes reduced (1/2, 1/4 "
        "or 1/8 of each side) the reduced size",
    )
    max_reduced_image_pixels: int = Field(
        default=70_000_000,
        ge=1,
        description="width x height a JPEG decoded reduced may declare (a 48-50 MP phone "
        "photo, or 64 MP, decodes at 1/8 to about 1 MP for a 224 px model)",
    )
    min_image_side: int = Field(
        default=8, ge=1, description="shortest accepted image side, in pixels"
    )
    max_aspect_ratio: float = Field(
        default=20.0, ge=1.0, description="longest side / shortest side of an accepted image"
    )
    providers: CommaList = Field(
        default=["cpu"],
        min_length=1,
        description="ONNX Runtime execution providers in order of preference: tensorrt, cuda, "
        "cpu (or full ORT names)",
    )
    allow_provider_fallback: bool = Field(
        default=False,
        description="start even if a requested provider is not active (the active one is "
        "logged and shown by GET /models)",
    )
    intra_op_threads: int = Field(
        default_factory=lambda data: max(1, _available_cores() // data.get("workers", 1)),
        ge=1,
        description="ONNX Runtime threads per operator, per worker (default: usable cores / "
        "workers)",
    )
    decode_threads: int = Field(
        default_factory=_available_cores,
        ge=1,
        description="threads decoding large uploads off the event loop, which is also how many "
        "large images are decoded at once (default: usable cores)",
    )
    inter_op_threads: int = Field(
        default=1, ge=1, description="ONNX Runtime threads across operators"
    )
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", description="ONNX Runtime graph optimizations"
    )
    enable_mem_arena: bool = Field(
        default=True, description="ONNX Runtime CPU memory arena (faster; holds peak memory)"
    )
    trace_sample_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="OpenTelemetry sampling rate; 0 keeps requests out of tracing altogether",
    )
    gc_full_interval_s: float = Field(
        default=300.0,
        ge=0.0,
        description="after warm-up the garbage collector runs on a clock: young generations "
        "every second, a full pass this often; 0 keeps Python's automatic collection",
    )
    access_log: bool = Field(
        default=False,
        description="one log line per request: method, path, status, milliseconds, request id "
        "(off by default: logging costs a single core a noticeable share of its throughput; "
        "errors are logged either way)",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="json: every log line of the service is one JSON object with time, level, "
        "logger, message and request_id",
    )
    known_answer_atol: float = Field(
        default=1e-3,
        gt=0,
        description="start-up self-test: largest logit difference from the answer recorded at "
        "export",
    )

    @field_validator("models", "providers", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, value: list[str]) -> list[str]:
        return [PROVIDER_ALIASES.get(p.lower(), p) for p in value]

    @field_validator("models")
    @classmethod
    def _all_or_tags(cls, value: list[str]) -> list[str]:
        if ALL_MODELS in value and value != [ALL_MODELS]:
            raise ValueError(f"{ALL_MODELS} (every stored model) stands alone, not among tags")
        return value

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> ServiceSettings:
        if self.max_queued_images < self.max_images_per_request:
            raise ValueError("max_queued_images must be at least max_images_per_request")
        if self.max_held_bytes < self.max_body_bytes:
            raise ValueError("max_held_bytes must be at least max_body_bytes")
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError("max_request_pixels must be at least max_image_pixels")
        return self

    @property
    def default_model(self) -> str:
        return self.models[0]

    @property
    def traffic_timeout_s(self) -> int:
        """BentoML's own request deadline: the body's time and the inference deadline, and a
        margin, so convserve's 408 and 504 always answer first."""
        return math.ceil(self.body_timeout_s + self.request_timeout_ms / 1000) + 5

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path := os.environ.get(CONFIG_FILE_ENV):
            if not os.path.isfile(path):
                raise ValueError(f"{CONFIG_FILE_ENV}={path} is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)
