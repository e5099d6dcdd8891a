"""The Open Inference Protocol (KServe v2, as Triton and MLServer speak it) over REST.

Routes and wire format together: parse an inference request (JSON, or JSON followed by binary
tensors with `Inference-Header-Content-Length`), run it through the same request path as the
REST routes (decoding, limits, batcher), build the response. Errors are `{"error": "<message>"}`.

One input per request, named as the model's input (`input`):
  FP32  [N, C, H, W]  normalized, as the model takes it (its layout: NHWC models take N, H, W, C)
  UINT8 [N, C, H, W]  pixels 0..255, normalized by the server
  BYTES [N] or [N, 1] encoded images (PNG, JPEG, WebP, GIF), through the REST decoder;
                      in JSON each element is the image's base64
The outputs are the model's task's (`Task.oip_outputs`): a classifier's `probabilities` FP32
[N, classes], with `parameters.classification = k` BYTES [N, k] of
"<probability>:<index>:<label>", most likely first; a detector's raw `boxes` and `scores`
(in the model input's pixels); an embedding network's `embedding`. Stylizers take two inputs
and are served by POST /stylize only.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from convserve import __version__
from convserve.errors import InvalidInput
from convserve.runtime import top_k
from convserve.service.errors import OIP
from convserve.service.inference import Inference, current
from convserve.service.pool import ServedModel
from convserve.service.rest import HEADER_LENGTH, documented_errors, plain
from convserve.service.task import Answer, OutputInfo
from convserve.service.task import Request as TaskRequest
from convserve.service.tensors import to_model_input
from convserve.service.wire import decode_base64

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["classification", "binary_tensor_data"]
NUMERIC = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
KNOWN_DATATYPES = {
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
}  # fmt: skip


def bad_request(message: str) -> InvalidInput:
    return InvalidInput("invalid_request", message)


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class _RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Tensor] = Field(min_length=1)
    outputs: list[_RequestedOutput] | None = None


@dataclass(frozen=True)
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    value: np.ndarray | list[bytes]  # numeric array, or the BYTES elements


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int  # 0: the tensor itself


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None  # None: every output of the model, as JSON
    binary_outputs: bool = False  # binary_data_output: the default for every output


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise bad_request(f"{HEADER_LENGTH} is not an integer") from None
    if n <= 0 or n > len(body):
        raise bad_request(f"{HEADER_LENGTH} {n} is beyond the body's {len(body)} bytes")
    return body[:n], body[n:]


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor in binary: each element is a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad_request("BYTES tensor data is truncated")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise bad_request("BYTES tensor data is truncated")
        out.append(raw[pos : pos + n])
        pos += n
    return out


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _b64(text: Any, name: str) -> bytes:
    if not isinstance(text, str):
        raise bad_request(f"input {name!r}: BYTES elements in JSON must be base64 strings")
    return decode_base64(text, f"input {name!r}: a BYTES element")


def _decode_input(tensor: _Tensor, binary: bytes, offset: int) -> tuple[InferInput, int]:
    name, datatype = tensor.name, tensor.datatype
    if datatype not in KNOWN_DATATYPES:
        raise bad_request(f"input {name!r}: unknown datatype {datatype!r}")
    if datatype not in NUMERIC and datatype != "BYTES":
        raise bad_request(
            f"input {name!r}: datatype {datatype} not accepted; use FP32, UINT8 or BYTES"
        )
    if any(d < 0 for d in tensor.shape):
        raise bad_request(f"input {name!r}: shape {tensor.shape} has a negative dimension")
    count = math.prod(tensor.shape)
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise bad_request(f"input {name!r}: binary_data_size {size} is beyond the body")
        raw, offset = binary[offset : offset + size], offset + size
        if datatype == "BYTES":
            value: np.ndarray | list[bytes] = _bytes_elements(raw)
        else:
            dtype = NUMERIC[datatype]
            if len(raw) != count * dtype.itemsize:
                raise bad_request(
                    f"input {name!r}: shape {tensor.shape} of {datatype} needs "
                    f"{count * dtype.itemsize} bytes, got {len(raw)}"
                )
            value = np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)
    else:
        if tensor.data is None:
            raise bad_request(f"input {name!r} has neither data nor binary_data_size")
        flat = _flatten(tensor.data)
        if datatype == "BYTES":
            value = [_b64(x, name) for x in flat]
        else:
            try:
                array = np.asarray(flat, dtype=np.float64)
            except (TypeError, ValueError):
                raise bad_request(f"input {name!r}: data must be numbers") from None
            if datatype == "UINT8" and ((array < 0) | (array > 255) | (array % 1 != 0)).any():
                raise bad_request(f"input {name!r}: UINT8 data must be integers 0..255")
            if len(array) != count:
                raise bad_request(
                    f"input {name!r}: shape {tensor.shape} needs {count} values, got {len(array)}"
                )
            value = array.astype(NUMERIC[datatype]).reshape(tensor.shape)
    if datatype == "BYTES" and len(value) != count:
        raise bad_request(
            f"input {name!r}: shape {tensor.shape} needs {count} elements, got {len(value)}"
        )
    return InferInput(name, datatype, tuple(tensor.shape), value), offset


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    header, binary = _split_body(body, header_length)
    try:
        request = _InferRequest.model_validate_json(header)
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise bad_request(f"invalid inference request: {where}: {first['msg']}") from None
    inputs, offset = [], 0
    for tensor in request.inputs:
        decoded, offset = _decode_input(tensor, binary, offset)
        inputs.append(decoded)
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data belong to no input")
    binary_all = bool(request.parameters.get("binary_data_output", False))
    outputs = None
    if request.outputs:
        outputs = []
        for out in request.outputs:
            k = out.parameters.get("classification", 0)
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise bad_request("classification must be a non-negative integer")
            binary = bool(out.parameters.get("binary_data", binary_all))
            outputs.append(RequestedOutput(out.name, binary, k))
    return InferRequest(request.id, inputs, outputs, binary_all)


def requested_outputs(request: InferRequest, available: list[OutputInfo], labels: bool):
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


def _bytes_payload(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def build_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs_requested: list[RequestedOutput],
    values: dict[str, np.ndarray],
    labels: tuple[str, ...],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    outputs, blobs = [], []
    for out in outputs_requested:
        tensor = np.asarray(values[out.name])
        if out.classification:
            k = min(out.classification, tensor.shape[1])
            indices, scores = top_k(tensor, k)
            strings = [
                f"{float(p)}:{int(j)}:{labels[int(j)]}"
                for row_i, row_p in zip(indices, scores, strict=True)
                for j, p in zip(row_i, row_p, strict=True)
            ]
            entry: dict[str, Any] = {
                "name": out.name,
                "datatype": "BYTES",
                "shape": [len(tensor), k],
            }
            if out.binary:
                blob = _bytes_payload([s.encode() for s in strings])
            else:
                entry["data"] = strings
        else:
            entry = {"name": out.name, "datatype": "FP32", "shape": list(tensor.shape)}
            if out.binary:
                blob = tensor.astype("<f4").tobytes()
            else:
                entry["data"] = tensor.astype(np.float32).ravel().tolist()
        if out.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        outputs.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": outputs,
    }
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


# --- routes --------------------------------------------------------------------------------


class OipError(BaseModel):
    """The protocol's error body: its message, and convserve's request id."""

    error: str
    request_id: str | None = None


router = APIRouter(prefix=OIP.prefix, tags=["v2"])
# Malformed requests are all 400 in this protocol (415 and 422 are REST's).
INFER_ERRORS = documented_errors(400, 404, 408, 413, 503, 504, model=OipError)
MODEL_ERRORS = documented_errors(404, model=OipError)
READY_ERRORS = documented_errors(404, 503, model=OipError)
# A request carries one input: `input` (FP32 or UINT8 [N, C, H, W], or BYTES), or `image`
# (BYTES [N]: encoded images). Metadata lists both, so a client that reads it finds the
# encoded-image form as well as the tensor form.
IMAGE_INPUT = "image"
INFER_TEMPLATE = OIP.prefix + "/models/{name}/infer"
INFER_VERSION_TEMPLATE = OIP.prefix + "/models/{name}/versions/{version}/infer"


def _tensor_input(served: ServedModel) -> dict:
    spec = served.spec
    datatype = "UINT8" if spec.input.dtype == "uint8" else "FP32"
    return {"name": served.model.input_name, "datatype": datatype,
            "shape": [-1, *spec.input.shape(1)[1:]]}  # fmt: skip


def _outputs(served: ServedModel) -> list[OutputInfo]:
    return served.task.oip_outputs(served.spec, served.model)


def _metadata(request: Request, name: str, version: str | None) -> dict:
    pool = current(request).pool
    served = pool.get(name, version)
    versions = [m.stored.version for m in pool.models if m.stored.name == name]
    return {
        "name": name,
        "versions": versions if version is None else [served.stored.version],
        "platform": PLATFORM,
        "inputs": [
            _tensor_input(served),
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": o.name, "datatype": o.datatype, "shape": o.shape} for o in _outputs(served)
        ],
    }


def _ready(request: Request, name: str, version: str | None) -> JSONResponse:
    inference = current(request)
    inference.pool.get(name, version)
    ready = inference.pool.ready
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@router.get("", summary="Open Inference Protocol: server metadata")
async def server_metadata() -> dict:
    return {"name": "convserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Open Inference Protocol: liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Open Inference Protocol: readiness", responses=READY_ERRORS)
async def ready(request: Request) -> JSONResponse:
    is_ready = current(request).pool.ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get(
    "/models/{name}",
    summary="Open Inference Protocol: model metadata",
    responses=MODEL_ERRORS,
    operation_id="oip_model_metadata",
)
async def model_metadata(request: Request, name: str) -> dict:
    return _metadata(request, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    responses=MODEL_ERRORS,
    operation_id="oip_model_version_metadata",
)
async def model_version_metadata(request: Request, name: str, version: str) -> dict:
    return _metadata(request, name, version)


@router.get("/models/{name}/ready", responses=READY_ERRORS, operation_id="oip_model_ready")
async def model_ready(request: Request, name: str) -> JSONResponse:
    return _ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    responses=READY_ERRORS,
    operation_id="oip_model_version_ready",
)
async def model_version_ready(request: Request, name: str, version: str) -> JSONResponse:
    return _ready(request, name, version)


@router.get(
    "/models/{name}/config",
    summary="Triton-style model configuration",
    responses=MODEL_ERRORS,
    operation_id="oip_model_config",
)
async def model_config(request: Request, name: str) -> dict:
    inference = current(request)
    served = inference.pool.get(name, None)
    spec = served.spec
    tensor = _tensor_input(served)
    return {
        "name": name,
        "platform": PLATFORM,
        "max_batch_size": inference.settings.max_images_per_request,
        "input": [
            {
                "name": tensor["name"],
                "data_type": f"TYPE_{tensor['datatype']}",
                "dims": tensor["shape"][1:],
            },
            {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1]},
        ],  # fmt: skip
        "output": [
            {
                "name": o.name,
                "data_type": f"TYPE_{o.datatype}",
                "dims": o.shape[1:],
                "label_filename": "",
            }
            for o in _outputs(served)
        ],
        # The batcher's real hold for a batch that is not full (0: it never waits).
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(inference.settings.max_queue_delay_ms * 1000),
            "max_batch_size_images": served.batcher.max_batch_size,
        },
        "convserve": {"task": spec.task, "recipe": spec.input.describe()},
    }


async def _model_input(inference: Inference, served: ServedModel, tensor: InferInput) -> np.ndarray:
    """The one input tensor as the model's input batch."""
    if tensor.datatype != "BYTES":
        limit = inference.settings.max_images_per_request
        return to_model_input(np.asarray(tensor.value), served.spec.input, limit)
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise bad_request(f"BYTES input shape must be [N] or [N, 1]; got {list(tensor.shape)}")
    inference.check_count(len(tensor.value))
    return (await inference.decode(served, [(None, data) for data in tensor.value])).x


async def infer(
    inference: Inference, name: str, version: str | None, header_length: str | None, body: bytes
) -> tuple[bytes, int | None]:
    """An inference request, whole: the response body, and the JSON header's length when
    binary data follows it. Raw ASGI (`hotpath.py`) and the routes below both call this."""
    served = inference.pool.get(name, version)
    parsed = parse_infer_request(body, header_length)
    model = served.model
    if len(model.input_names) != 1:
        raise bad_request(
            f"model {name!r} takes {len(model.input_names)} inputs; use its REST route "
            f"({', '.join(served.task.routes)})"
        )
    input_name = model.input_name
    names = [i.name for i in parsed.inputs]
    if len(names) != 1 or names[0] not in (input_name, IMAGE_INPUT):
        raise bad_request(
            f"send one input, {input_name!r} (a tensor or BYTES) or {IMAGE_INPUT!r} "
            f"(encoded images, BYTES); got {names}"
        )
    if names[0] == IMAGE_INPUT and parsed.inputs[0].datatype != "BYTES":
        raise bad_request(f"input {IMAGE_INPUT!r} is BYTES: encoded images")
    wanted = requested_outputs(parsed, _outputs(served), served.spec.task == "classify")
    batch = await _model_input(inference, served, parsed.inputs[0])
    outputs = await inference.run(served, batch)
    return build_response(
        model_name=name,
        model_version=served.stored.version,
        request_id=parsed.id,
        outputs_requested=wanted,
        values=served.task.oip_values(served.spec, model, outputs),
        labels=served.spec.labels,
    )


def answer(body: bytes, header_length: int | None) -> Answer:
    if header_length is None:
        return Answer(body)
    return Answer(body, b"application/octet-stream", {HEADER_LENGTH: str(header_length)})


async def handle_infer(
    inference: Inference, request: TaskRequest, name: str, version: str | None = None
) -> Answer:
    """POST .../infer on plain bytes: what the raw hot path calls."""
    return answer(*await infer(inference, name, version, request.header_length, request.body))


def match_infer(path: str) -> tuple[str, dict[str, str]] | None:
    """(the route template, its parameters) when `path` is an inference route, else None."""
    head, tail = OIP.prefix + "/models/", "/infer"
    if not (path.startswith(head) and path.endswith(tail)):
        return None
    parts = path[len(head) : -len(tail)].split("/")
    if len(parts) == 1 and parts[0]:
        return INFER_TEMPLATE, {"name": parts[0]}
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return INFER_VERSION_TEMPLATE, {"name": parts[0], "version": parts[2]}
    return None


def _response(result: Answer) -> Response:
    return Response(result.body, media_type=result.media_type.decode(), headers=result.headers)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["name", "shape", "datatype"],
                        "properties": {"name": {"type": "string"},
                                       "shape": {"type": "array", "items": {"type": "integer"}},
                                       "datatype": {"type": "string"},
                                       "parameters": {"type": "object"}, "data": {}}}},
                    "outputs": {"type": "array", "items": {
                        "type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string"},
                                       "parameters": {"type": "object"}}}},
                },
            }},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"the JSON header, then binary tensors ({HEADER_LENGTH})",
            },
        },
    }
}  # fmt: skip


# Served by the raw ASGI path in the running service; these routes document the operation and
# answer it the same way wherever the app runs without that path.
@router.post(
    "/models/{name}/infer",
    summary="Open Inference Protocol: inference (JSON or binary tensor data)",
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
    operation_id="oip_infer",
)
async def infer_route(request: Request, name: str) -> Response:
    return _response(await handle_infer(current(request), await plain(request), name))


@router.post(
    "/models/{name}/versions/{version}/infer",
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
    operation_id="oip_infer_version",
)
async def infer_version_route(request: Request, name: str, version: str) -> Response:
    return _response(await handle_infer(current(request), await plain(request), name, version))
