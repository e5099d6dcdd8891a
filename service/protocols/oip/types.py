"""The Open Inference Protocol's wire types and request codec (KServe's `infer_type.py`): no
web framework here.

An inference request is JSON, or JSON followed by binary tensors whose header length is given by
`Inference-Header-Content-Length`. One input per request, named as the model's input:
  FP32  [N, C, H, W]  normalized, as the model takes it (its layout: NHWC models take N, H, W, C)
  UINT8 [N, C, H, W]  pixels 0..255, normalized by the server
  BYTES [N] or [N, 1] encoded images (PNG, JPEG, WebP, GIF); in JSON each element is base64
or `image` (BYTES [N]: encoded images).
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


@dataclass(frozen=True, slots=True)
class InferCall:
    """An inference request read, and the model and version its path names."""

    model: str
    version: str | None
    request: InferRequest


def read_infer(request: Request) -> InferCall:
    """POST /v2/models/{name}[/versions/{version}]/infer, read."""
    parsed = parse_infer_request(request.body, request.header_length)
    return InferCall(request.path_params["name"], request.path_params.get("version"), parsed)


def bytes_payload(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)
