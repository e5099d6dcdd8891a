"""The Open Inference Protocol's wire types and request codec (KServe's `infer_type.py`): no
web framework here.

An inference request over HTTP is JSON, or JSON followed by binary tensors whose header length
is given by `Inference-Header-Content-Length`; over gRPC it is a `ModelInferRequest`. Either way
it becomes one `InferRequest`, whose inputs are:
  FP32  [N, C, H, W]  normalized, as the model takes it (its layout: NHWC models take N, H, W, C)
  UINT8 [N, C, H, W]  pixels 0..255, normalized by the server
  BYTES [N, 1] or [N] encoded images (PNG, JPEG, WebP, GIF); in JSON each element is base64
Which inputs a model takes is its view's (model.py).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from convserve.errors import ErrorCode, InvalidInput
from convserve.service.messages import Request
from convserve.service.wire import decode_base64

HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["classification", "binary_tensor_data"]
NUMERIC = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
KNOWN_DATATYPES = {
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
}  # fmt: skip


def bad_request(message: str) -> InvalidInput:
    return InvalidInput(ErrorCode.INVALID_REQUEST, message)


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
    out: list[bytes] = []
    pos = 0
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


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in cast(list[Any], data) for x in _flatten(item)]
    return [data]


def _b64(text: Any, name: str) -> bytes:
    if not isinstance(text, str):
        raise bad_request(f"input {name!r}: BYTES elements in JSON must be base64 strings")
    return decode_base64(text, f"input {name!r}: a BYTES element")


def check_tensor(name: str, datatype: str, shape: list[int] | tuple[int, ...]) -> None:
    """A tensor's datatype and shape, before its data is looked at."""
    if datatype not in KNOWN_DATATYPES:
        raise bad_request(f"input {name!r}: unknown datatype {datatype!r}")
    if datatype not in NUMERIC and datatype != "BYTES":
        raise bad_request(
            f"input {name!r}: datatype {datatype} not accepted; use FP32, UINT8 or BYTES"
        )
    if any(d < 0 for d in shape):
        raise bad_request(f"input {name!r}: shape {list(shape)} has a negative dimension")


def from_binary(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> InferInput:
    """A tensor's binary data (HTTP's binary extension, gRPC's `raw_input_contents`):
    little-endian numbers, or BYTES elements each after its 4-byte length."""
    check_tensor(name, datatype, shape)
    if datatype == "BYTES":
        return _counted(InferInput(name, datatype, shape, _bytes_elements(raw)))
    dtype = NUMERIC[datatype]
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise bad_request(
            f"input {name!r}: shape {list(shape)} of {datatype} needs "
            f"{count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return InferInput(name, datatype, shape, np.frombuffer(raw, dtype=dtype).reshape(shape))


def from_numbers(name: str, datatype: str, shape: tuple[int, ...], flat: Any) -> InferInput:
    """A numeric tensor's values, flat (JSON's numbers, gRPC's typed contents)."""
    check_tensor(name, datatype, shape)
    try:
        array = np.asarray(flat, dtype=np.float64)
    except (TypeError, ValueError):
        raise bad_request(f"input {name!r}: data must be numbers") from None
    if array.ndim != 1:
        raise bad_request(f"input {name!r}: data must be numbers")
    if datatype == "UINT8" and ((array < 0) | (array > 255) | (array % 1 != 0)).any():
        raise bad_request(f"input {name!r}: UINT8 data must be integers 0..255")
    count = math.prod(shape)
    if len(array) != count:
        raise bad_request(
            f"input {name!r}: shape {list(shape)} needs {count} values, got {len(array)}"
        )
    return InferInput(name, datatype, shape, array.astype(NUMERIC[datatype]).reshape(shape))


def from_elements(name: str, shape: tuple[int, ...], elements: list[bytes]) -> InferInput:
    """A BYTES tensor's elements."""
    check_tensor(name, "BYTES", shape)
    return _counted(InferInput(name, "BYTES", shape, elements))


def _counted(tensor: InferInput) -> InferInput:
    count = math.prod(tensor.shape)
    if len(tensor.value) != count:
        raise bad_request(
            f"input {tensor.name!r}: shape {list(tensor.shape)} needs {count} elements, "
            f"got {len(tensor.value)}"
        )
    return tensor


def _decode_input(tensor: _Tensor, binary: bytes, offset: int) -> tuple[InferInput, int]:
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    check_tensor(name, datatype, shape)
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise bad_request(f"input {name!r}: binary_data_size {size} is beyond the body")
        raw, offset = binary[offset : offset + size], offset + size
        return from_binary(name, datatype, shape, raw), offset
    if tensor.data is None:
        raise bad_request(f"input {name!r} has neither data nor binary_data_size")
    flat = _flatten(tensor.data)
    if datatype == "BYTES":
        return from_elements(name, shape, [_b64(x, name) for x in flat]), offset
    return from_numbers(name, datatype, shape, flat), offset


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    header, binary = _split_body(body, header_length)
    try:
        request = _InferRequest.model_validate_json(header)
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise bad_request(f"invalid inference request: {where}: {first['msg']}") from None
    inputs: list[InferInput] = []
    offset = 0
    for tensor in request.inputs:
        decoded, offset = _decode_input(tensor, binary, offset)
        inputs.append(decoded)
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data belong to no input")
    binary_all = bool(request.parameters.get("binary_data_output", False))
    outputs: list[RequestedOutput] | None = None
    if request.outputs:
        outputs = []
        for out in request.outputs:
            k = out.parameters.get("classification", 0)
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise bad_request("classification must be a non-negative integer")
            binary = bool(out.parameters.get("binary_data", binary_all))
            outputs.append(RequestedOutput(out.name, binary, k))
    return InferRequest(request.id, inputs, outputs, binary_all)


IMAGE_VIEW = ".image"  # `<model>.image`: the model's encoded-image view (model.py)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """The model (and version) a request names, and which of its views: `<model>.image` names
    the encoded-image view of `<model>`. `model` None: no model (server-wide calls)."""

    model: str | None
    version: str | None = None
    images: bool = False

    @classmethod
    def named(cls, name: str | None, version: str | None = None) -> ModelRef:
        if name is not None and name.endswith(IMAGE_VIEW) and len(name) > len(IMAGE_VIEW):
            return cls(name.removesuffix(IMAGE_VIEW), version, True)
        return cls(name, version)

    @property
    def name(self) -> str:
        """The name as the request gave it."""
        assert self.model is not None
        return self.model + IMAGE_VIEW if self.images else self.model


@dataclass(frozen=True, slots=True)
class InferCall:
    """An inference request read, and the model, version and view it names."""

    ref: ModelRef
    request: InferRequest

    @property
    def model(self) -> str | None:
        return self.ref.model

    @property
    def version(self) -> str | None:
        return self.ref.version


def read_infer(request: Request) -> InferCall:
    """POST /v2/models/{name}[/versions/{version}]/infer, read."""
    parsed = parse_infer_request(request.body, request.header_length)
    ref = ModelRef.named(request.path_params["name"], request.path_params.get("version"))
    return InferCall(ref, parsed)


def bytes_payload(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)
