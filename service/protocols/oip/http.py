"""The Open Inference Protocol over HTTP, one object (KServe's `V2Endpoints`): its operations,
each one handler registered for the versioned and unversioned paths, its answers and its errors
(`{"error": "<message>"}`, 400 for every malformed request).

Each model is served under two names, its tensor view and its encoded-image view (`model.py`).
The outputs are the model's task's (`Task.oip_outputs`: the runner's outputs, in order): a
classifier's `probabilities` FP32 [N, classes], with `parameters.classification = k` BYTES [N, k] of
"<probability>:<index>:<label>", most likely first; a detector's raw `boxes` and `scores`
(in the model input's pixels); an embedding network's `embedding`; a stylizer's image, FP32
[N, 3, H, W] (padded as the model took it).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from convserve import __version__
from convserve.errors import ConvserveError
from convserve.service.messages import Answer, Request, json_answer
from convserve.service.protocols.base import (
    Access,
    Operation,
    WireError,
    WireProtocol,
    retry_headers,
)
from convserve.service.protocols.oip import model
from convserve.service.protocols.oip.model import Inference, Inferred, classification
from convserve.service.protocols.oip.repository import ModelControl, Repository
from convserve.service.protocols.oip.repository import documentation as repository_docs
from convserve.service.protocols.oip.types import (
    EXTENSIONS,
    HEADER_LENGTH,
    InferCall,
    ModelRef,
    bytes_payload,
    read_infer,
)
from convserve.service.protocols.rest import documented_errors, status_of
from convserve.service.settings import ServiceSettings

if TYPE_CHECKING:
    from convserve.service.control import Models
    from convserve.service.loading import ServedModel

PREFIX = "/v2"
MODEL = PREFIX + "/models/{name}"
VERSION = MODEL + "/versions/{version}"


def read_names(request: Request) -> ModelRef:
    return ModelRef.named(request.path_params.get("name"), request.path_params.get("version"))


def build_response(inferred: Inferred) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out, tensor in inferred.outputs:
        blob = b""
        if out.classification:
            k, strings = classification(tensor, out.classification, inferred.labels)
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
        "model_name": inferred.model_name,
        "model_version": inferred.model_version,
        "outputs": outputs,
    }
    if inferred.id is not None:
        response["id"] = inferred.id
    header = json.dumps(response).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


class Oip(WireProtocol):
    name = "Open Inference Protocol"
    prefix = PREFIX

    def __init__(
        self, inference: Inference, settings: ServiceSettings, models: Models, control: ModelControl
    ) -> None:
        self.inference, self.settings, self.models, self.control = (
            inference, settings, models, control
        )  # fmt: skip

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
        body, header_length = build_response(await self.inference.run(served, call))
        if header_length is None:
            return Answer(body)
        return Answer(body, b"application/octet-stream", {HEADER_LENGTH: str(header_length)})

    # --- metadata and health -----------------------------------------------------------------

    async def server_metadata(self, served: None, call: ModelRef) -> Answer:
        return json_answer({"name": "convserve", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, served: None, call: ModelRef) -> Answer:
        return json_answer({"live": True})

    async def server_ready(self, served: None, call: ModelRef) -> Answer:
        ready = self.models.ready
        return json_answer({"ready": ready}, 200 if ready else 503)

    async def metadata(self, served: ServedModel, call: ModelRef) -> Answer:
        versions = self.models.versions(served.stored.name)
        return json_answer(model.metadata(served, call, versions))

    async def ready(self, served: ServedModel, call: ModelRef) -> Answer:
        ready = self.models.ready
        return json_answer({"name": call.name, "ready": ready}, 200 if ready else 503)

    async def config(self, served: ServedModel, call: ModelRef) -> Answer:
        return json_answer(model.config(served, call, self.settings))


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
