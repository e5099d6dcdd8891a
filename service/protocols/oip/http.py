"""The Open Inference Protocol over HTTP, one object (KServe's `V2Endpoints`): its operations,
each one handler registered for the versioned and unversioned paths, its answers and its errors
(`{"error": "<message>"}`, 400 for every malformed request).

The outputs are the model's task's (`Task.oip_outputs`: the runner's outputs, in order): a
classifier's `probabilities` FP32 [N, classes], with `parameters.classification = k` BYTES [N, k] of
"<probability>:<index>:<label>", most likely first; a detector's raw `boxes` and `scores`
(in the model input's pixels); an embedding network's `embedding`. Stylizers take two inputs
and are served by POST /stylize only.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from convserve import __version__
from convserve.errors import ConvserveError, ErrorCode, InvalidInput
from convserve.service.decoding import Decoder, Upload
from convserve.service.messages import Answer, Request, json_answer
from convserve.service.protocols.base import (
    Access,
    Named,
    Operation,
    WireError,
    WireProtocol,
    retry_headers,
)
from convserve.service.protocols.oip.repository import ModelControl, Repository
from convserve.service.protocols.oip.repository import documentation as repository_docs
from convserve.service.protocols.oip.types import (
    EXTENSIONS,
    HEADER_LENGTH,
    PLATFORM,
    InferCall,
    InferInput,
    InferRequest,
    RequestedOutput,
    bad_request,
    bytes_payload,
    read_infer,
)
from convserve.service.protocols.rest import documented_errors, status_of
from convserve.service.settings import ServiceSettings
from convserve.service.tasks.base import OutputInfo
from convserve.service.tasks.classify import top_k
from convserve.service.tensors import to_model_input

if TYPE_CHECKING:
    from convserve.service.control import Models
    from convserve.service.loading import ServedModel

PREFIX = "/v2"
# A request carries one input: `input` (FP32 or UINT8 [N, C, H, W], or BYTES), or `image`
# (BYTES [N]: encoded images). Metadata lists both, so a client that reads it finds the
# encoded-image form as well as the tensor form.
IMAGE_INPUT = "image"
MODEL = PREFIX + "/models/{name}"
VERSION = MODEL + "/versions/{version}"


def read_names(request: Request) -> Named:
    return Named(request.path_params.get("name"), request.path_params.get("version"))


def requested_outputs(
    request: InferRequest, available: list[OutputInfo], labels: bool
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
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs_requested:
        tensor = np.asarray(values[out.name])
        blob = b""
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
                blob = bytes_payload([s.encode() for s in strings])
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


def _tensor_input(served: ServedModel) -> dict[str, Any]:
    spec = served.spec
    datatype = "UINT8" if spec.input.dtype == "uint8" else "FP32"
    return {"name": served.model.input_name, "datatype": datatype,
            "shape": [-1, *spec.input.shape(1)[1:]]}  # fmt: skip


class Oip(WireProtocol):
    name = "Open Inference Protocol"
    prefix = PREFIX

    def __init__(
        self, decoder: Decoder, settings: ServiceSettings, models: Models, control: ModelControl
    ) -> None:
        self.decoder, self.settings, self.models, self.control = decoder, settings, models, control

    @classmethod
    def render_error(cls, error: ConvserveError, request_id: str | None) -> WireError:
        """The protocol's error: its message (and the request id); 400 for any malformed
        request."""
        status = status_of(error)
        status = 400 if status in (415, 422) else status
        body = {"error": error.message, "request_id": request_id}
        return WireError(status, json.dumps(body).encode(), retry_headers(error))

    def operations(self) -> list[tuple[str, Operation]]:
        def get(run: Any, resolves: bool = True, access: Access = Access.INFERENCE) -> Operation:
            return Operation(
                "GET", self, read_names, run, resolves=resolves, admitted=False, access=access
            )

        infer = Operation("POST", self, read_infer, self.infer)
        metadata, ready, config = get(self.metadata), get(self.ready), get(self.config)
        return [
            (PREFIX, get(self.server_metadata, resolves=False)),
            (PREFIX + "/health/live", get(self.live, resolves=False, access=Access.OPEN)),
            (PREFIX + "/health/ready", get(self.server_ready, resolves=False, access=Access.OPEN)),
            (MODEL, metadata),
            (VERSION, metadata),
            (MODEL + "/ready", ready),
            (VERSION + "/ready", ready),
            (MODEL + "/config", config),
            (MODEL + "/infer", infer),
            (VERSION + "/infer", infer),
            *Repository(self.control).operations(self),
        ]

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, served: ServedModel, call: InferCall) -> Answer:
        """An inference request, whole: the response (JSON, or JSON then binary data)."""
        name, parsed, model = call.model, call.request, served.model
        if len(model.input_names) != 1:
            raise bad_request(
                f"model {name!r} takes {len(model.input_names)} inputs; use its REST route "
                f"({', '.join(route.path for route in served.task.routes)})"
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
        wanted = requested_outputs(parsed, served.outputs, served.spec.task == "classify")
        batch = await self._model_input(served, parsed.inputs[0])
        outputs = await served.batcher.submit(batch)
        body, header_length = build_response(
            model_name=name,
            model_version=served.stored.version,
            request_id=parsed.id,
            outputs_requested=wanted,
            values=dict(
                zip(
                    [o.name for o in served.outputs],
                    outputs if isinstance(outputs, tuple) else (outputs,),
                    strict=True,
                )
            ),
            labels=served.spec.labels,
        )
        if header_length is None:
            return Answer(body)
        return Answer(body, b"application/octet-stream", {HEADER_LENGTH: str(header_length)})

    async def _model_input(self, served: ServedModel, tensor: InferInput) -> np.ndarray:
        """The one input tensor as the model's input batch."""
        if tensor.datatype != "BYTES":
            limit = self.settings.max_images_per_request
            return to_model_input(np.asarray(tensor.value), served.spec.input, limit)
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise bad_request(f"BYTES input shape must be [N] or [N, 1]; got {list(tensor.shape)}")
        limit = self.settings.max_images_per_request
        if not 0 < len(tensor.value) <= limit:
            raise InvalidInput(
                ErrorCode.TOO_MANY_IMAGES if tensor.value else ErrorCode.INVALID_REQUEST,
                f"{len(tensor.value)} images sent; send 1 to {limit} per request",
            )
        uploads: list[Upload] = [(None, data) for data in cast(list[bytes], tensor.value)]
        return (await self.decoder.decode(served.spec.input, uploads)).x

    # --- metadata and health -----------------------------------------------------------------

    async def server_metadata(self, served: None, call: Named) -> Answer:
        return json_answer({"name": "convserve", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, served: None, call: Named) -> Answer:
        return json_answer({"live": True})

    async def server_ready(self, served: None, call: Named) -> Answer:
        ready = self.models.ready
        return json_answer({"ready": ready}, 200 if ready else 503)

    async def metadata(self, served: ServedModel, call: Named) -> Answer:
        name = served.stored.name
        versions = self.models.versions(name)
        return json_answer(
            {
                "name": name,
                "versions": versions if call.version is None else [served.stored.version],
                "platform": PLATFORM,
                "inputs": [
                    _tensor_input(served),
                    {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                ],
                "outputs": [
                    {"name": o.name, "datatype": o.datatype, "shape": o.shape}
                    for o in served.outputs
                ],
            }
        )

    async def ready(self, served: ServedModel, call: Named) -> Answer:
        ready = self.models.ready
        return json_answer({"name": served.stored.name, "ready": ready}, 200 if ready else 503)

    async def config(self, served: ServedModel, call: Named) -> Answer:
        spec, tensor = served.spec, _tensor_input(served)
        return json_answer(
            {
                "name": served.stored.name,
                "platform": PLATFORM,
                "max_batch_size": self.settings.max_images_per_request,
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
                    for o in served.outputs
                ],  # fmt: skip
                # The batcher's real hold for a batch that is not full (0: it never waits).
                "dynamic_batching": {
                    "max_queue_delay_microseconds": round(self.settings.max_queue_delay_ms * 1000),
                    "max_batch_size_images": served.batcher.max_batch_size,
                },
                "convserve": {"task": spec.task, "recipe": spec.input.describe()},
            }
        )


# --- the OpenAPI document ----------------------------------------------------------------------
# Answered by the server's front door (`Oip.operations`); FastAPI writes the documentation of
# the same paths from the declarations below, which have no handler body.


class OipError(BaseModel):
    """The protocol's error body: its message, and convserve's request id."""

    error: str
    request_id: str | None = None


# Malformed requests are all 400 in this protocol (415 and 422 are REST's).
INFER_ERRORS = documented_errors(400, 404, 408, 413, 503, 504, model=OipError)
MODEL_ERRORS = documented_errors(404, model=OipError)
READY_ERRORS = documented_errors(404, 503, model=OipError)
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


def documentation() -> APIRouter:
    router = APIRouter(tags=["v2"])
    never = "answered by the server's front door"

    @router.get(PREFIX, summary="Open Inference Protocol: server metadata")
    async def server_metadata() -> dict[str, Any]:
        raise AssertionError(never)

    @router.get(PREFIX + "/health/live", summary="Open Inference Protocol: liveness")
    async def live() -> dict[str, Any]:
        raise AssertionError(never)

    @router.get(
        PREFIX + "/health/ready",
        summary="Open Inference Protocol: readiness",
        responses=READY_ERRORS,
    )
    async def ready() -> JSONResponse:
        raise AssertionError(never)

    @router.get(
        MODEL,
        summary="Open Inference Protocol: model metadata",
        responses=MODEL_ERRORS,
        operation_id="oip_model_metadata",
    )
    async def model_metadata(name: str) -> dict[str, Any]:
        raise AssertionError(never)

    @router.get(VERSION, responses=MODEL_ERRORS, operation_id="oip_model_version_metadata")
    async def model_version_metadata(name: str, version: str) -> dict[str, Any]:
        raise AssertionError(never)

    @router.get(MODEL + "/ready", responses=READY_ERRORS, operation_id="oip_model_ready")
    async def model_ready(name: str) -> JSONResponse:
        raise AssertionError(never)

    @router.get(VERSION + "/ready", responses=READY_ERRORS, operation_id="oip_model_version_ready")
    async def model_version_ready(name: str, version: str) -> JSONResponse:
        raise AssertionError(never)

    @router.get(
        MODEL + "/config",
        summary="Triton-style model configuration",
        responses=MODEL_ERRORS,
        operation_id="oip_model_config",
    )
    async def model_config(name: str) -> dict[str, Any]:
        raise AssertionError(never)

    @router.post(
        MODEL + "/infer",
        summary="Open Inference Protocol: inference (JSON or binary tensor data)",
        responses=INFER_ERRORS,
        openapi_extra=INFER_BODY,
        operation_id="oip_infer",
    )
    async def infer(name: str) -> JSONResponse:
        raise AssertionError(never)

    @router.post(
        VERSION + "/infer",
        responses=INFER_ERRORS,
        openapi_extra=INFER_BODY,
        operation_id="oip_infer_version",
    )
    async def infer_version(name: str, version: str) -> JSONResponse:
        raise AssertionError(never)

    router.routes.extend(
        repository_docs(documented_errors(400, 401, 403, 404, model=OipError)).routes
    )
    return router
