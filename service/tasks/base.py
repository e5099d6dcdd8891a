"""What a task is to the service: its stages, in the spirit of LitServe's `LitAPI`.

A task says how a model of its kind runs (`runner`: one batch in, its outputs out, on the
model's inference thread), how many images one run may take and what warms it up
(`max_batch`, `warm_up_input`: the loader asks), what the Open Inference Protocol calls the
runner's outputs (`oip_outputs`, in order), and its REST routes (`routes`). A route has its
parameters as one pydantic model (the query string and the JSON body alike, and the OpenAPI
document), says how its payload comes (`ImageParts` or `TENSOR`), and names `run`, the stage
that turns a resolved model and a read request into the answer (decode, batch, encode).

Reading requests is REST's (`protocols/rest.py`); resolving the model a request names is the
server's; decoding (`decoding.py`) and batching (`batching.py`) are shared. A task only says
what is its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from convserve.runtime import OnnxModel
from convserve.service.batching import Infer, Rows
from convserve.service.decoding import Decoder, Upload
from convserve.service.messages import Answer
from convserve.service.schemas import ImagesBody
from convserve.service.settings import ServiceSettings
from convserve.spec import ModelSpec, TaskName

if TYPE_CHECKING:
    from convserve.service.loading import ServedModel


class ModelParams(BaseModel):
    """The parameters every REST route takes: which model answers."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str | None = Field(
        default=None,
        min_length=1,
        description="model name (default: the first served model of the route's task)",
    )
    version: str | None = Field(
        default=None, min_length=1, description="model version, or 'latest'"
    )


P = TypeVar("P", bound=ModelParams)


@dataclass(frozen=True, slots=True)
class RestCall(Generic[P]):
    """A REST request read: its parameters, which name the model that answers."""

    params: P

    @property
    def model(self) -> str | None:
        return self.params.model

    @property
    def version(self) -> str | None:
        return self.params.version


@dataclass(frozen=True, slots=True)
class ImagesCall(RestCall[P]):
    """Its images, in the order sent."""

    uploads: list[Upload]


@dataclass(frozen=True, slots=True)
class TensorCall(RestCall[P]):
    """Its preprocessed tensors: N x C x H x W (or the model's layout)."""

    array: np.ndarray


@dataclass(frozen=True)
class ImageParts:
    """Images come as multipart parts named `fields` (each exactly once when `one_each`, else
    one or more `images`, at most `most`), as the whole body, or as JSON `images` in base64."""

    fields: tuple[str, ...] = ("images",)
    one_each: bool = False
    most: int | None = None
    raw_body: bool = True  # an image as the whole body is accepted (one image)


TENSOR = "tensor"  # the payload is a tensor: .npy, or raw bytes with shape and dtype


@dataclass(frozen=True)
class Route:
    """One REST route of a task."""

    path: str
    params: type[ModelParams]  # the query string's parameters, and the JSON body's
    payload: ImageParts | str
    run: Callable[
        [Any, ServedModel, Any], Awaitable[Answer]
    ]  # the task's method: (task, model, call)
    summary: str
    response: type[BaseModel] | None = None  # the 200 answer's schema (None: documented below)
    json_body: type[ImagesBody] | None = None  # the JSON variant: params + images
    answer: str = "one result per image"  # the 200 answer, in words
    # Extra documentation, by status.
    responses: dict[int, Any] = field(default_factory=dict[int, Any])


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as the Open Inference Protocol describes it."""

    name: str
    datatype: str
    shape: list[int]  # -1: the batch axis


class Task:
    """The parts every task shares; each task module subclasses it. Built once per worker,
    with the worker's decoder and settings."""

    name: ClassVar[TaskName]
    summary: ClassVar[str] = ""  # one line for the model listing and the demo page
    routes: ClassVar[tuple[Route, ...]] = ()  # its REST routes

    def __init__(self, decoder: Decoder, settings: ServiceSettings) -> None:
        self.decoder = decoder
        self.settings = settings

    def runner(self, model: OnnxModel, spec: ModelSpec) -> Infer:
        """What the batcher calls with a batch, on the model's inference thread: every
        output of the graph, as a tuple."""
        return lambda x: tuple(model.run(cast(np.ndarray, x)))  # one input: an array

    def max_batch(self, spec: ModelSpec) -> int:
        """Images one run may take: the configured bound, within `max_batch_bytes` of input
        (a 224 px colour image is 600 KB as float32, a 28 px grey one 3 KB)."""
        per_image = int(np.prod(spec.input.shape(1))) * (1 if spec.input.dtype == "uint8" else 4)
        return max(1, min(self.settings.max_batch_size, self.settings.max_batch_bytes // per_image))

    def warm_up_input(self, spec: ModelSpec, n: int) -> Rows:
        """n rows of input shaped as requests will send them (zeros)."""
        dtype = np.uint8 if spec.input.dtype == "uint8" else np.float32
        return np.zeros(spec.input.shape(n), dtype=dtype)

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[TensorInfo]:
        return [TensorInfo(name, "FP32", [-1]) for name in model.output_names]

    def oip_inputs(self, spec: ModelSpec) -> list[TensorInfo]:
        """The runner's inputs after the images (a stylizer's style weights), each with the
        images' batch axis: the runner takes (images, *these) as rows."""
        return []
