"""Classification: `POST /classify` (images), `POST /classify/tensor` (preprocessed tensors).

Each image gets its top-k `{label, index, probability}`, most likely first, in the order sent.
The runner gives probabilities (a softmax over the logits, unless the graph already ends in
one); the Open Inference Protocol shows them as `probabilities`, and its classification
extension turns them into top-k strings.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query
from fastapi import Request as HttpRequest
from fastapi.responses import Response

from convserve.errors import InvalidInput
from convserve.runtime import OnnxClassifier, OnnxModel, top_k_lists
from convserve.service import rest
from convserve.service.inference import Inference, current
from convserve.service.pool import ServedModel
from convserve.service.schemas import ClassifyJsonRequest, ClassifyResponse, json_body_schema
from convserve.service.task import Answer, Infer, OutputInfo, Request, Rows, Task
from convserve.service.tensors import parse_dtype, parse_shape, read_npy, read_raw, to_model_input
from convserve.service.wire import media_type
from convserve.spec import ModelSpec

OUTPUT_NAME = "probabilities"


def classify_payload(
    served: ServedModel, probabilities: np.ndarray, k: int, names: list[str | None]
) -> bytes:
    """probabilities: N x classes -> the ClassifyResponse JSON: each image's top-k, most likely
    first, in the order sent. Built as plain data and serialized once."""
    indices, probs = top_k_lists(probabilities, k)
    labels = served.spec.labels
    results = [
        {
            "filename": name,
            "predictions": [
                {"label": labels[j], "index": j, "probability": p}
                for j, p in zip(row_i, row_p, strict=True)
            ],
        }
        for name, row_i, row_p in zip(names, indices, probs, strict=True)
    ]
    return json.dumps({"model": served.stored.tag, "results": results}).encode()


def _top_k(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        k = int(text)
    except ValueError:
        raise InvalidInput("invalid_request", "top_k: must be an integer") from None
    if k < 1:
        raise InvalidInput("invalid_request", "top_k: must be at least 1")
    return k


class ClassifyTask(Task):
    name = "classify"
    routes = {"/classify": "classify"}

    def runner(self, model: OnnxModel, spec: ModelSpec) -> Infer:
        assert isinstance(model, OnnxClassifier)
        return model.probabilities  # type: ignore[return-value]

    def oip_outputs(self, spec: ModelSpec, model: OnnxModel) -> list[OutputInfo]:
        return [OutputInfo(OUTPUT_NAME, "FP32", [-1, spec.num_classes])]

    def oip_values(self, spec: ModelSpec, model: OnnxModel, outputs: Rows) -> dict[str, Any]:
        return {OUTPUT_NAME: outputs}

    def resolve(
        self, inference: Inference, model: str | None, version: str | None, k: int | None
    ) -> tuple[ServedModel, int]:
        """The served classifier a request names, and its top-k (the default when absent)."""
        served = inference.resolve(model, version, self.name)
        if k is None:  # the default asks for at most what the model has: a 3-class model gives 3
            return served, min(inference.settings.default_top_k, served.spec.num_classes)
        if k > served.spec.num_classes:
            raise InvalidInput(
                "invalid_top_k",
                f"top_k must be at most {served.spec.num_classes} for {served.stored.tag}",
            )
        return served, k

    async def classify(self, inference: Inference, request: Request) -> Answer:
        """POST /classify, whole: the ClassifyResponse JSON, or a domain error."""
        params = rest.query(request.query_string)
        k, model, version = _top_k(params.get("top_k")), params.get("model"), params.get("version")

        def resolve(body: ClassifyJsonRequest | None) -> tuple[ServedModel, int]:
            if body is None:
                return self.resolve(inference, model, version, k)
            return self.resolve(
                inference,
                rest.same_or_conflict("model", model, body.model),  # type: ignore[arg-type]
                rest.same_or_conflict("version", version, body.version),  # type: ignore[arg-type]
                rest.same_or_conflict("top_k", k, body.top_k),  # type: ignore[arg-type]
            )

        (served, k_), images = await rest.read_images(
            inference, request.content_type, request.body, ClassifyJsonRequest, resolve
        )
        batch = await inference.decode(served, images)
        probabilities = await inference.run(served, batch.x)
        payload = classify_payload(served, probabilities, k_, [name for name, _ in images])  # type: ignore[arg-type]
        return Answer(payload)

    def router(self) -> APIRouter:
        return _router(self)


TOP_K = {
    "name": "top_k",
    "in": "query",
    "required": False,
    "description": "predictions per image (default 5)",
    "schema": {"type": "integer", "minimum": 1},
}


def _router(task: ClassifyTask) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/classify",
        response_model=None,
        responses={
            200: {"model": ClassifyResponse, "description": "one result per image"},
            **rest.INFERENCE_ERRORS,
        },
        summary="Classify images: multipart upload, the image as the body, or JSON with base64",
        openapi_extra={
            "parameters": [TOP_K, *rest.MODEL_PARAMETERS],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": rest.multipart_schema("images")},
                    **rest.IMAGE_BODIES,
                    "application/json": {"schema": json_body_schema(ClassifyJsonRequest)},
                },
            },
        },
    )
    async def classify_route(request: HttpRequest) -> Response:
        """Served by the raw ASGI path (`hotpath.py`) in the running service; this route
        documents the operation and answers it the same way wherever the app runs without
        that path."""
        answer = await task.classify(current(request), await rest.plain(request))
        return Response(answer.body, media_type=answer.media_type.decode())

    @router.post(
        "/classify/tensor",
        response_model=ClassifyResponse,
        responses=rest.INFERENCE_ERRORS,
        summary="Classify preprocessed tensors (N x C x H x W): .npy, or raw bytes + shape/dtype",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def classify_tensor(
        request: HttpRequest,
        top_k_: Annotated[int | None, Query(alias="top_k", ge=1)] = None,
        model: Annotated[str | None, Query()] = None,
        version: Annotated[str | None, Query()] = None,
        shape: Annotated[
            str | None,
            Query(description="raw bytes only: e.g. 4,1,28,28", examples=["4,1,28,28"]),
        ] = None,
        dtype: Annotated[
            str | None,
            Query(description="raw bytes only: float32 (normalized) or uint8 (pixels)"),
        ] = None,
    ) -> ClassifyResponse:
        inference = current(request)
        served, k = task.resolve(inference, model, version, top_k_)
        kind = media_type(request.headers.get("content-type"))
        data = await request.body()
        if kind == "application/x-npy":
            if shape is not None or dtype is not None:
                raise InvalidInput(
                    "conflicting_parameters", "shape and dtype come from the .npy header"
                )
            array = read_npy(data)
        elif kind == "application/octet-stream":
            if shape is None or dtype is None:
                raise InvalidInput(
                    "invalid_tensor", "raw tensors need the shape and dtype query parameters"
                )
            array = read_raw(data, parse_shape(shape), parse_dtype(dtype))
        else:
            raise InvalidInput(
                "unsupported_media_type",
                "send application/x-npy, or application/octet-stream with shape and dtype",
            )
        batch = to_model_input(array, served.spec.input, inference.settings.max_images_per_request)
        probabilities = await inference.run(served, batch)
        payload = classify_payload(served, probabilities, k, [None] * len(batch))  # type: ignore[arg-type]
        return Response(payload, media_type="application/json")  # type: ignore[return-value]

    return router
