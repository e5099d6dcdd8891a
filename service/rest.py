"""The REST protocol: `POST /classify`, `POST /classify/tensor`, `GET /models`.

Bodies are parsed here (multipart, JSON with base64, .npy or raw tensors), then go through the
shared request path (`inference.py`); answers are `ClassifyResponse`, errors the REST error body.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from convserve.errors import InvalidInput
from convserve.runtime import top_k
from convserve.service.errors import ErrorResponse
from convserve.service.inference import Inference, Upload, current
from convserve.service.pool import ServedModel
from convserve.service.schemas import (
    ClassifyJsonRequest,
    ClassifyResponse,
    EncodedImage,
    ImageResult,
    ModelsResponse,
    ModelVersion,
    Prediction,
    ServedModelInfo,
)
from convserve.service.tensors import parse_dtype, parse_shape, read_npy, read_raw, to_model_input
from convserve.service.wire import decode_base64, media_type

router = APIRouter()


def documented_errors(*statuses: int) -> dict:
    """OpenAPI `responses` for these statuses, each with the error schema."""
    text = {
        400: "an image is empty, truncated or corrupt; a malformed body",
        404: "unknown model or version",
        413: "the body is over the size limit, or an image has too many pixels",
        415: "an image is not PNG, JPEG, WebP or GIF; an unsupported body type",
        422: "invalid parameters, images too small or too elongated, too many images, "
        "bad base64, a tensor of the wrong shape or dtype or with NaN/infinity",
        503: "busy, queue full or overloaded: retry after Retry-After seconds",
        504: "inference missed the request deadline",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


INFERENCE_ERRORS = documented_errors(400, 404, 413, 415, 422, 503, 504)
MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "one or more image files (repeat the part)",
        }
    },
}


def classify_response(
    served: ServedModel, probabilities: np.ndarray, k: int, names: list[str | None]
) -> ClassifyResponse:
    """probabilities: N x classes -> each image's top-k, most likely first, in order sent."""
    indices, probs = top_k(probabilities, k)
    labels = served.spec.labels
    return ClassifyResponse(
        model=served.stored.tag,
        results=[
            ImageResult(
                filename=name,
                predictions=[
                    Prediction(label=labels[int(j)], index=int(j), probability=float(p))
                    for j, p in zip(row_i, row_p, strict=True)
                ],
            )
            for name, row_i, row_p in zip(names, indices, probs, strict=True)
        ],
    )


def _same_or_conflict(name: str, query: object, body: object) -> object:
    if query is not None and body is not None and query != body:
        raise InvalidInput(
            "conflicting_parameters", f"{name} is {query!r} in the query but {body!r} in the body"
        )
    return query if query is not None else body


async def _form_images(request: Request, inference: Inference) -> list[Upload]:
    limit = inference.settings.max_images_per_request
    try:
        form = await request.form(max_files=limit + 1)
    except MultiPartException as exc:
        if "Too many files" in str(exc):
            raise InvalidInput("too_many_images", f"at most {limit} images per request") from None
        raise InvalidInput("malformed_body", "the multipart body could not be parsed") from None
    try:
        parts = form.getlist("images")
        if any(not isinstance(p, UploadFile) for p in parts):
            raise InvalidInput(
                "invalid_request",
                "images: must be an uploaded file (text and URLs are not accepted)",
            )
        inference.check_count(len(parts))
        return [(p.filename, await p.read()) for p in parts]  # type: ignore[union-attr]
    finally:
        await form.close()


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=INFERENCE_ERRORS,
    summary="Classify images: multipart upload or JSON with base64",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                "application/json": {
                    "schema": ClassifyJsonRequest.model_json_schema(
                        ref_template="#/components/schemas/{model}"
                    )
                },
            },
        }
    },
)
async def classify(
    request: Request,
    top_k_: Annotated[
        int | None, Query(alias="top_k", ge=1, description="predictions per image (default 5)")
    ] = None,
    model: Annotated[str | None, Query(description="model name (default model if absent)")] = None,
    version: Annotated[str | None, Query(description="model version, or 'latest'")] = None,
) -> ClassifyResponse:
    inference = current(request)
    kind = media_type(request.headers.get("content-type"))
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        served, k = inference.resolve(model, version, top_k_)
        images = await _form_images(request, inference)
    elif kind == "application/json":
        try:
            body = ClassifyJsonRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_input=False)) from None
        served, k = inference.resolve(
            _same_or_conflict("model", model, body.model),  # type: ignore[arg-type]
            _same_or_conflict("version", version, body.version),  # type: ignore[arg-type]
            _same_or_conflict("top_k", top_k_, body.top_k),  # type: ignore[arg-type]
        )
        inference.check_count(len(body.images))
        items = [EncodedImage(data=i) if isinstance(i, str) else i for i in body.images]
        images = [
            (it.filename, decode_base64(it.data, f"images[{n}]")) for n, it in enumerate(items)
        ]
    else:
        raise InvalidInput(
            "unsupported_media_type",
            "send multipart/form-data with `images` parts, or application/json",
        )
    batch = await inference.decode(served, images)
    probabilities = await inference.probabilities(served, batch)
    return classify_response(served, probabilities, k, [name for name, _ in images])


@router.post(
    "/classify/tensor",
    response_model=ClassifyResponse,
    responses=INFERENCE_ERRORS,
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
    request: Request,
    top_k_: Annotated[int | None, Query(alias="top_k", ge=1)] = None,
    model: Annotated[str | None, Query()] = None,
    version: Annotated[str | None, Query()] = None,
    shape: Annotated[
        str | None, Query(description="raw bytes only: e.g. 4,1,28,28", examples=["4,1,28,28"])
    ] = None,
    dtype: Annotated[
        str | None, Query(description="raw bytes only: float32 (normalized) or uint8 (pixels)")
    ] = None,
) -> ClassifyResponse:
    inference = current(request)
    served, k = inference.resolve(model, version, top_k_)
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
    probabilities = await inference.probabilities(served, batch)
    return classify_response(served, probabilities, k, [None] * len(batch))


@router.get("/models", response_model=ModelsResponse, summary="Served models and versions")
async def list_models(request: Request) -> ModelsResponse:
    pool = current(request).pool
    infos: dict[str, list[ModelVersion]] = {}
    for served in pool.models:
        stored = served.stored
        infos.setdefault(stored.name, []).append(
            ModelVersion(
                version=stored.version,
                tag=stored.tag,
                default=pool.get(stored.name) is served,
                created=stored.created,
                architecture=served.spec.architecture,
                precision=stored.precision,
                input=served.spec.input,
                labels=list(served.spec.labels),
                provider=served.classifier.provider,
                sha256=stored.sha256,
                metrics=served.spec.metrics,
            )
        )
    return ModelsResponse(
        default=pool.default.stored.tag,
        models=[ServedModelInfo(name=n, versions=v) for n, v in infos.items()],
    )
