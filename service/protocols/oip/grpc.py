"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` as Triton publishes it
(its `grpc_service.proto` and `model_config.proto`, compiled in the `tritonclient` package:
KServe's `grpc_predict_v2.proto` with Triton's extensions, ModelConfig and the repository calls,
which perf_analyzer and tritonclient use).

This module only reads messages into the calls the HTTP protocol makes and writes answers back
as messages; the same `Inference`, models and views serve both (model.py). The transport
(the gRPC server, admission, tokens, metrics) is `service/grpc_door.py`.

    ModelInfer      inputs as `raw_input_contents` (little-endian numbers; BYTES elements each
                    after a 4-byte length) or typed contents (`fp32_contents`, `uint_contents`
                    for UINT8, `bytes_contents`); outputs always as `raw_output_contents`
    errors          a gRPC status (`STATUS`) with the message HTTP would send; the trailing
                    metadata carry `x-request-id`, `convserve-error-code` (the stable code) and,
                    when a retry may help, `retry-after` (seconds)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
import numpy as np
from google.protobuf import json_format

# tritonclient ships no type information; its generated modules are `Any` below.
from tritonclient.grpc import (  # pyright: ignore[reportMissingTypeStubs]
    model_config_pb2,
    service_pb2,
)

from convserve import __version__
from convserve.errors import ConvserveError, ErrorCode, InvalidInput
from convserve.service.protocols.base import Access, Operation, Protocol, retry_headers
from convserve.service.protocols.oip import model
from convserve.service.protocols.oip.model import Inference, Inferred, classification
from convserve.service.protocols.oip.repository import REFUSED_HINT, ModelControl, refused_keys
from convserve.service.protocols.oip.types import (
    EXTENSIONS,
    InferCall,
    InferInput,
    InferRequest,
    ModelRef,
    RequestedOutput,
    bad_request,
    bytes_payload,
    check_tensor,
    from_binary,
    from_elements,
    from_numbers,
)
from convserve.service.settings import ServiceSettings

if TYPE_CHECKING:
    from convserve.service.control import Models
    from convserve.service.loading import ServedModel

# protoc's generated modules make their message classes at run time: nothing to type-check.
pb: Any = service_pb2
config_pb: Any = model_config_pb2
SERVICE = "inference.GRPCInferenceService"

# Every domain error's status: a closed table, checked at import like REST's.
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.EMPTY_IMAGE: _INVALID,
    ErrorCode.INVALID_IMAGE: _INVALID,
    ErrorCode.MALFORMED_BODY: _INVALID,
    ErrorCode.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.WRONG_TASK: _INVALID,
    ErrorCode.INVALID_STYLE: _INVALID,
    ErrorCode.VERSION_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.BODY_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.HEADER_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    # gRPC's own answer to a message over the receive limit
    ErrorCode.BODY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.IMAGE_TOO_LARGE: _INVALID,
    ErrorCode.TOO_MANY_PIXELS: _INVALID,
    ErrorCode.UNSUPPORTED_IMAGE: _INVALID,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: _INVALID,
    ErrorCode.INVALID_REQUEST: _INVALID,
    ErrorCode.INVALID_TOP_K: _INVALID,
    ErrorCode.TOO_MANY_IMAGES: _INVALID,
    ErrorCode.IMAGE_TOO_SMALL: _INVALID,
    ErrorCode.BAD_ASPECT_RATIO: _INVALID,
    ErrorCode.INVALID_BASE64: _INVALID,
    ErrorCode.INVALID_TENSOR: _INVALID,
    ErrorCode.CONFLICTING_PARAMETERS: _INVALID,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.LOAD_FAILED: _INVALID,
    ErrorCode.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
    # Retryable, as Triton answers a full queue: clients' retry policies retry UNAVAILABLE.
    ErrorCode.BUSY: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.TOO_MANY_UPLOADS: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.QUEUE_FULL: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.OVERLOADED: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
}
assert set(STATUS) == set(ErrorCode), set(ErrorCode) - set(STATUS)


def error_metadata(error: ConvserveError, request_id: str) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of an error: its request id, its code and when to retry."""
    metadata = [("x-request-id", request_id), ("convserve-error-code", str(error.code))]
    retry = retry_headers(error).get("Retry-After")  # HTTP's rule for when a retry may help
    if retry is not None:
        metadata.append(("retry-after", retry))
    return tuple(metadata)


@dataclass(frozen=True, slots=True)
class Rpc:
    """One method of the service: its operation and its message types."""

    name: str
    operation: Operation
    request: type[Any]
    response: type[Any]
    streaming: bool = False  # a stream of requests, each answered on the response stream


# --- reading ModelInferRequest ------------------------------------------------------------------

_TYPED: Mapping[str, str] = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
_CONTENTS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
             "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")  # fmt: skip


def _typed_input(tensor: Any) -> InferInput:
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    check_tensor(name, datatype, shape)
    field = "bytes_contents" if datatype == "BYTES" else _TYPED[datatype]
    contents = tensor.contents
    stray = [f for f in _CONTENTS if f != field and len(getattr(contents, f))]
    if stray:
        raise bad_request(f"input {name!r}: {datatype} data goes in {field}, not {stray[0]}")
    if datatype == "BYTES":
        return from_elements(name, shape, list(contents.bytes_contents))
    return from_numbers(name, datatype, shape, np.asarray(getattr(contents, field)))


def _classification(parameters: Any) -> int:
    if "classification" not in parameters:
        return 0
    parameter = parameters["classification"]
    k = parameter.int64_param if parameter.WhichOneof("parameter_choice") == "int64_param" else -1
    if k < 0:
        raise bad_request("classification must be a non-negative integer (int64_param)")
    return k


def read_infer(message: Any) -> InferCall:
    """A ModelInferRequest as the call HTTP's JSON or binary body makes."""
    if not message.model_name:
        raise bad_request("model_name is required")
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise bad_request(
            f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: send one per input"
        )
    if not message.inputs:
        raise bad_request("inputs: send the model's input(s)")
    inputs: list[InferInput] = []
    for i, tensor in enumerate(message.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise bad_request(f"input {tensor.name!r}: both contents and raw_input_contents")
            inputs.append(from_binary(tensor.name, tensor.datatype, tuple(tensor.shape), raw[i]))
        else:
            inputs.append(_typed_input(tensor))
    outputs = [
        RequestedOutput(o.name, True, _classification(o.parameters)) for o in message.outputs
    ]
    request = InferRequest(message.id or None, inputs, outputs or None, binary_outputs=True)
    return InferCall(ModelRef.named(message.model_name, message.model_version or None), request)


def infer_response(inferred: Inferred, response: Any) -> Any:
    """`response` (a ModelInferResponse) filled: every output as raw contents (what Triton
    sends)."""
    response.model_name = inferred.model_name
    response.model_version = inferred.model_version
    response.id = inferred.id or ""
    for out, tensor in inferred.outputs:
        if out.classification:
            k, strings = classification(tensor, out.classification, inferred.labels)
            response.outputs.add(name=out.name, datatype="BYTES", shape=[len(tensor), k])
            response.raw_output_contents.append(bytes_payload([s.encode() for s in strings]))
        else:
            response.outputs.add(name=out.name, datatype="FP32", shape=list(tensor.shape))
            response.raw_output_contents.append(tensor.astype("<f4", copy=False).tobytes())
    return response


# --- the other calls' messages ------------------------------------------------------------------


def read_model(message: Any) -> ModelRef:
    """ModelMetadata, ModelReady, ModelConfig: the model and version they name."""
    if not message.name:
        raise bad_request("name is required")
    return ModelRef.named(message.name, message.version or None)


def read_nothing(message: Any) -> ModelRef:
    return ModelRef(None)


def read_load(message: Any) -> ModelRef:
    """RepositoryModelLoad: the model, and the version its `version` parameter names; a
    `config` or `file:` parameter refused, as over HTTP."""
    if not message.model_name:
        raise bad_request("model_name is required")
    refused = refused_keys(message.parameters)
    if refused:
        raise InvalidInput(ErrorCode.INVALID_REQUEST, f"{', '.join(refused)}: {REFUSED_HINT}")
    version: str | None = None
    if "version" in message.parameters:
        version = message.parameters["version"].string_param
        if not version:
            raise bad_request("parameters.version must be a version string (string_param)")
    return ModelRef(message.model_name, version)


def read_unload(message: Any) -> ModelRef:
    if not message.model_name:
        raise bad_request("model_name is required")
    return ModelRef(message.model_name)


class GrpcOip(Protocol):
    """The service's methods, as operations the server runs like HTTP's."""

    name: ClassVar[str] = "Open Inference Protocol (gRPC)"

    def __init__(
        self,
        settings: ServiceSettings,
        models: Models,
        control: ModelControl,
        inference: Inference,
        ready: Callable[[], bool],
    ) -> None:
        self.settings, self.models, self.control = settings, models, control
        self.inference, self.is_ready = inference, ready

    def rpcs(self) -> list[Rpc]:
        def op(read: Any, run: Any, **options: Any) -> Operation:
            return Operation("POST", self, read, run, **options)

        probe = {"resolves": False, "admitted": False, "access": Access.OPEN}
        described = {"admitted": False}
        admin = {"resolves": False, "admitted": False, "access": Access.ADMIN}
        table = [
            ("ServerLive", op(read_nothing, self.live, **probe)),
            ("ServerReady", op(read_nothing, self.server_ready, **probe)),
            ("ModelReady", op(read_model, self.model_ready, resolves=False, admitted=False)),
            (
                "ServerMetadata",
                op(read_nothing, self.server_metadata, resolves=False, admitted=False),
            ),  # fmt: skip
            ("ModelMetadata", op(read_model, self.metadata, **described)),
            ("ModelConfig", op(read_model, self.config, **described)),
            ("ModelInfer", op(read_infer, self.infer)),
            ("ModelStreamInfer", op(read_infer, self.stream_infer)),
            ("RepositoryIndex", op(read_nothing, self.index, **admin)),
            ("RepositoryModelLoad", op(read_load, self.load, **admin)),
            ("RepositoryModelUnload", op(read_unload, self.unload, **admin)),
        ]
        methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
        return [
            Rpc(
                name,
                operation,
                getattr(pb, methods[name].input_type.name),
                getattr(pb, methods[name].output_type.name),
                methods[name].client_streaming,
            )
            for name, operation in table
        ]

    # --- health and metadata -----------------------------------------------------------------

    async def live(self, served: None, call: ModelRef) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, served: None, call: ModelRef) -> Any:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def model_ready(self, served: None, call: ModelRef) -> Any:
        # Triton's answer for a model it does not serve: not ready (no error).
        try:
            self.models.get(call.model, call.version)
        except ConvserveError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.models.ready)

    async def server_metadata(self, served: None, call: ModelRef) -> Any:
        return pb.ServerMetadataResponse(
            name="convserve", version=__version__, extensions=EXTENSIONS
        )

    async def metadata(self, served: ServedModel, call: ModelRef) -> Any:
        described = model.metadata(served, call, self.models.versions(served.stored.name))
        return json_format.ParseDict(described, pb.ModelMetadataResponse())

    async def config(self, served: ServedModel, call: ModelRef) -> Any:
        described = model.config(served, call, self.settings)
        batching = described.pop("dynamic_batching")
        extra = described.pop("convserve")
        message = json_format.ParseDict(described, config_pb.ModelConfig())
        message.dynamic_batching.max_queue_delay_microseconds = batching[
            "max_queue_delay_microseconds"
        ]
        message.dynamic_batching.preferred_batch_size.append(batching["max_batch_size_images"])
        for key, value in (("task", extra["task"]), ("recipe", extra["recipe"])):
            message.parameters[key].string_value = str(value)
        return pb.ModelConfigResponse(config=message)

    # --- inference and the repository --------------------------------------------------------

    async def infer(self, served: ServedModel, call: InferCall) -> Any:
        return infer_response(await self.inference.run(served, call), pb.ModelInferResponse())

    async def stream_infer(self, served: ServedModel, call: InferCall) -> Any:
        # filled in place: a message given to a constructor would be copied
        response = pb.ModelStreamInferResponse()
        infer_response(await self.inference.run(served, call), response.infer_response)
        return response

    async def index(self, served: None, call: ModelRef) -> Any:
        return json_format.ParseDict({"models": self.control.index()}, pb.RepositoryIndexResponse())

    async def load(self, served: None, call: ModelRef) -> Any:
        assert call.model is not None
        await self.control.load(call.model, call.version)
        return pb.RepositoryModelLoadResponse()

    async def unload(self, served: None, call: ModelRef) -> Any:
        assert call.model is not None
        await self.control.unload(call.model)
        return pb.RepositoryModelUnloadResponse()
