"""What a task is to the service: one object that the pool, the hot path, both protocols and
the model listing ask, instead of matching task names or paths. Each task is a module of
`service/tasks/`; `service/tasks/__init__.py` lists them.

A task says how a model of its kind runs (`runner`: one batch in, its answer out, on the
model's inference thread), how many images one run may take, what warms it up, which REST
routes it answers and how (`routes`: each a handler on plain bytes, served by the raw hot path
and documented by a FastAPI route), and what the Open Inference Protocol shows of its outputs.
Decoding, admission, batching and errors are shared; a task only says what is its own.

Contract of a handler: `await handler(inference, request)` returns the `Answer` (status 200)
or raises a domain error, which the route's protocol renders.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from convserve.runtime import OnnxModel
from convserve.service.batching import Infer, Rows
from convserve.service.settings import ServiceSettings
from convserve.spec import ModelSpec

if TYPE_CHECKING:
    from fastapi import APIRouter


@dataclass(frozen=True)
class Answer:
    body: bytes
    media_type: bytes = b"application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """What a handler needs of an HTTP request, the same from the raw path and FastAPI."""

    query_string: bytes
    content_type: str | None
    body: bytes
    header_length: str | None = None  # Inference-Header-Content-Length (OIP binary data)


# (inference, request) -> answer; `inference` is the worker's `Inference`.
Handler = Callable[[Any, Request], Awaitable[Answer]]


@dataclass(frozen=True)
class OutputInfo:
    """One output as the Open Inference Protocol describes it."""

    name: str
    datatype: str
    shape: list[int]  # -1: the batch axis


class Task:
    """The parts every task shares; each task module subclasses it."""

    name: ClassVar[str]  # the spec's `task`
    routes: ClassVar[dict[str, str]] = {}  # REST path -> the name of its handler method
    summary: ClassVar[str] = ""  # one line for the model listing and the demo page

    def runner(self, model: OnnxModel, spec: ModelSpec) -> Infer:
        """What the batcher calls with a batch, on the model's inference thread: every
        output of the graph, as a tuple."""
        return lambda x: tuple(model.run(x))  # type: ignore[arg-type]

    def max_batch(self, spec: ModelSpec, settings: ServiceSettings) -> int:
        """Images one run may take: the configured bound, within `max_batch_bytes` of input
        (a 224 px colour image is 600 KB as float32, a 28 px grey one 3 KB)."""
        per_image = int(np.prod(spec.input.shape(1))) * (1 if spec.input.dtype == "uint8" else 4)
        return max(1, min(settings.max_batch_size, settings.max_batch_bytes // per_image))

    def warm_up_input(self, spec: ModelSpec, n: int) -> Rows:
        """n rows of input shaped as requests will send them (zeros)."""
        dtype = np.uint8 if spec.input.dtype == "uint8" else np.float32
        return np.zeros(spec.input.shape(n), dtype=dtype)

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[OutputInfo]:
        return [OutputInfo(name, "FP32", [-1]) for name in model.output_names]

    def oip_values(self, spec: ModelSpec, model: OnnxModel, outputs: Rows) -> dict[str, Any]:
        """The batcher's answer for a request -> output name -> array (N rows)."""
        values = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(model.output_names, values, strict=True))

    def handlers(self) -> dict[str, Handler]:
        return {path: getattr(self, method) for path, method in self.routes.items()}

    def router(self) -> APIRouter | None:
        """The FastAPI routes that document this task's REST routes (None: it has none)."""
        return None
