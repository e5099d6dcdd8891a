"""A served model as the Open Inference Protocol shows it, whatever the transport (HTTP or
gRPC): its two views, their metadata and configuration, and inference on them.

Every model is served under two names, each a view a client can fill exactly as its metadata
lists it (perf_analyzer and tritonclient fill every listed input):

    <name>        tensors: the model's input as pixels, UINT8 [N, C, H, W] at the model's size
                  (its layout: NHWC models take N, H, W, C), normalized by the server as its
                  recipe says; FP32 of the same shape, already normalized, is taken too
    <name>.image  encoded images: `image`, BYTES [N, 1] (or [N]), each element a PNG, JPEG,
                  WebP or GIF file, decoded and preprocessed by the server as POST /classify does

A task whose runner takes more than images lists those inputs in both views (a stylizer's
`style_weights` FP32 [N, styles]). The tensor view also takes `image` (BYTES), as it always
has; its metadata lists the tensor only. `GET /models` lists each model once, by its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from convserve.errors import ErrorCode, InvalidInput
from convserve.service.decoding import Decoder, Upload
from convserve.service.protocols.oip.types import (
    IMAGE_VIEW,
    PLATFORM,
    InferCall,
    InferInput,
    InferRequest,
    ModelRef,
    RequestedOutput,
    bad_request,
)
from convserve.service.settings import ServiceSettings
from convserve.service.tasks.base import TensorInfo
from convserve.service.tasks.classify import top_k
from convserve.service.tensors import to_model_input

if TYPE_CHECKING:
    from convserve.service.loading import ServedModel

IMAGE_INPUT = "image"
_TYPE_STRING = "TYPE_STRING"  # Triton's configuration name for BYTES


def image_input(served: ServedModel) -> TensorInfo:
    """The model's images as tensors, with the batch axis. Listed as pixels: any UINT8 value is
    a valid pixel, so a client that fills inputs with random bytes (perf_analyzer's default)
    sends valid images, where random FP32 bytes are NaNs and infinities half the time."""
    return TensorInfo(served.model.input_name, "UINT8", [-1, *served.spec.input.shape(1)[1:]])


def inputs_of(served: ServedModel, images: bool) -> list[TensorInfo]:
    """The inputs a request to this view fills, in order."""
    first = TensorInfo(IMAGE_INPUT, "BYTES", [-1, 1]) if images else image_input(served)
    return [first, *served.task.oip_inputs(served.spec)]


def _described(tensor: TensorInfo) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}


def metadata(served: ServedModel, ref: ModelRef, versions: list[str]) -> dict[str, Any]:
    """The model metadata response (as the protocol's JSON)."""
    return {
        "name": ref.name,
        "versions": versions if ref.version is None else [served.stored.version],
        "platform": PLATFORM,
        "inputs": [_described(t) for t in inputs_of(served, ref.images)],
        "outputs": [_described(o) for o in served.outputs],
    }


def _config_type(datatype: str) -> str:
    return _TYPE_STRING if datatype == "BYTES" else f"TYPE_{datatype}"


def config(served: ServedModel, ref: ModelRef, settings: ServiceSettings) -> dict[str, Any]:
    """Triton's model configuration (its JSON form), which perf_analyzer reads: the batch axis
    is implicit (`max_batch_size` > 0), so `dims` leave it out."""
    return {
        "name": ref.name,
        "platform": PLATFORM,
        "max_batch_size": settings.max_images_per_request,
        "input": [
            {"name": t.name, "data_type": _config_type(t.datatype), "dims": t.shape[1:]}
            for t in inputs_of(served, ref.images)
        ],
        "output": [
            {
                "name": o.name,
                "data_type": _config_type(o.datatype),
                "dims": o.shape[1:],
                "label_filename": "",
            }
            for o in served.outputs
        ],  # fmt: skip
        # The batcher's real hold for a batch that is not full (0: it never waits).
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(settings.max_queue_delay_ms * 1000),
            "max_batch_size_images": served.batcher.max_batch_size,
        },
        "convserve": {"task": served.spec.task, "recipe": served.spec.input.describe()},
    }


@dataclass(frozen=True, slots=True)
class Inferred:
    """An inference's answer, before a transport encodes it."""

    model_name: str  # as the request named it (its view)
    model_version: str
    id: str | None
    outputs: list[tuple[RequestedOutput, np.ndarray]]  # each asked-for output and its rows
    labels: tuple[str, ...]


def requested_outputs(
    request: InferRequest, available: list[TensorInfo], labels: bool
) -> list[RequestedOutput]:
    """The outputs to answer: those asked for (each checked against the model's), or all of
    them. `labels`: the model's outputs are classes, so the classification extension applies."""
    names = [o.name for o in available]
    if request.outputs is None:
        return [RequestedOutput(name, request.binary_outputs, 0) for name in names]
    for out in request.outputs:
        if out.name not in names:
            raise bad_request(
                f"unknown output {out.name!r}; the model has {', '.join(map(repr, names))}"
            )
        if out.classification and not labels:
            raise bad_request("the classification extension needs a classifier's output")
    return request.outputs


def classification(tensor: np.ndarray, k: int, labels: tuple[str, ...]) -> tuple[int, list[str]]:
    """The classification extension: each row's k most likely classes, as
    "<probability>:<index>:<label>" (k capped at the number of classes), row after row."""
    k = min(k, tensor.shape[1])
    indices, scores = top_k(tensor, k)
    return k, [
        f"{float(p)}:{int(j)}:{labels[int(j)]}"
        for row_i, row_p in zip(indices, scores, strict=True)
        for j, p in zip(row_i, row_p, strict=True)
    ]


class Inference:
    """ModelInfer on a resolved model: its inputs checked against the view, the images decoded
    or the tensor checked, one batcher submission, the outputs asked for."""

    def __init__(self, decoder: Decoder, settings: ServiceSettings) -> None:
        self.decoder, self.settings = decoder, settings

    async def run(self, served: ServedModel, call: InferCall) -> Inferred:
        parsed = call.request
        by_name = {i.name: i for i in parsed.inputs}
        if len(by_name) != len(parsed.inputs):
            raise bad_request("an input is sent twice")
        expected = inputs_of(served, call.ref.images)
        first, extras = expected[0], expected[1:]
        given = self._first_input(by_name, first.name, call.ref)
        wanted = requested_outputs(parsed, served.outputs, served.spec.task == "classify")
        images = await self._model_input(served, given)
        rows: list[np.ndarray] = [images]
        for extra in extras:
            tensor = by_name.get(extra.name)
            if tensor is None or tensor.datatype != extra.datatype:
                raise bad_request(
                    f"model {call.ref.name!r} also takes {extra.name!r} ({extra.datatype} "
                    f"{extra.shape}); GET /v2/models/{call.ref.name} lists its inputs"
                )
            rows.append(_extra_rows(tensor, extra, len(images)))
        extra_names = {e.name for e in extras}
        unknown = [n for n in by_name if n != given.name and n not in extra_names]
        if unknown:
            names = ", ".join(repr(t.name) for t in expected)
            raise bad_request(f"unknown input(s) {unknown}; model {call.ref.name!r} takes {names}")
        outputs = await served.batcher.submit(rows[0] if len(rows) == 1 else tuple(rows))
        values = dict(
            zip(
                [o.name for o in served.outputs],
                outputs if isinstance(outputs, tuple) else (outputs,),
                strict=True,
            )
        )
        return Inferred(
            call.ref.name,
            served.stored.version,
            parsed.id,
            [(out, np.asarray(values[out.name])) for out in wanted],
            served.spec.labels,
        )

    def _first_input(self, by_name: dict[str, InferInput], name: str, ref: ModelRef) -> InferInput:
        """The images: the view's first input (the tensor view also takes `image`)."""
        given = by_name.get(name)
        if given is None and not ref.images:
            given = by_name.get(IMAGE_INPUT)
        if given is None:
            hint = (
                f"{IMAGE_INPUT!r} (encoded images, BYTES [N, 1])"
                if ref.images
                else f"{name!r} (the tensor), or {IMAGE_INPUT!r} (encoded images, BYTES), "
                f"which model {f'{ref.model}{IMAGE_VIEW}'!r} lists"
            )
            raise bad_request(f"model {ref.name!r} takes {hint}; got {sorted(by_name)}")
        if given.name == IMAGE_INPUT and given.datatype != "BYTES":
            raise bad_request(f"input {IMAGE_INPUT!r} is BYTES: encoded images")
        return given

    async def _model_input(self, served: ServedModel, tensor: InferInput) -> np.ndarray:
        """The images input as the model's input batch."""
        limit = self.settings.max_images_per_request
        if tensor.datatype != "BYTES":
            return to_model_input(np.asarray(tensor.value), served.spec.input, limit)
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise bad_request(f"BYTES input shape must be [N, 1] or [N]; got {list(tensor.shape)}")
        if not 0 < len(tensor.value) <= limit:
            raise InvalidInput(
                ErrorCode.TOO_MANY_IMAGES if tensor.value else ErrorCode.INVALID_REQUEST,
                f"{len(tensor.value)} images sent; send 1 to {limit} per request",
            )
        uploads: list[Upload] = [(None, data) for data in cast(list[bytes], tensor.value)]
        return (await self.decoder.decode(served.spec.input, uploads)).x


def _extra_rows(tensor: InferInput, info: TensorInfo, n: int) -> np.ndarray:
    """An input after the images, as rows: [n, *the model's dims], finite."""
    array = np.asarray(tensor.value, dtype=np.float32)
    expected = [n, *info.shape[1:]]
    if list(array.shape) != expected:
        raise InvalidInput(
            ErrorCode.INVALID_TENSOR,
            f"input {info.name!r}: shape {list(array.shape)}, expected {expected} "
            "(one row per image)",
        )
    if not np.isfinite(array).all():
        raise InvalidInput(ErrorCode.INVALID_TENSOR, f"input {info.name!r} is not finite")
    return array
