"""The REST protocol: `POST /classify`, `POST /classify/tensor`, `GET /models`.

Bodies are parsed here (multipart, an image as the body, JSON with base64, .npy or raw
tensors), then go through the shared request path (`inference.py`); answers are the
`ClassifyResponse` JSON, errors the REST error body. `classify()` is the whole of POST
/classify on plain bytes, so the raw ASGI path (`hotpath.py`) and the documented FastAPI route
run the same code.
"""

from __future__ import annotations

import json
from typing import Annotated
from urllib.parse import parse_qsl

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from convserve.errors import InvalidInput
from convserve.runtime import top_k
from convserve.service import multipart
from convserve.service.errors import ErrorResponse, describe
from convserve.service.inference import Inference, Upload, current
from convserve.service.pool import ServedModel
from convserve.service.schemas import (
    ClassifyJsonRequest,
    ClassifyResponse,
    EncodedImage,
    ModelsResponse,
    ModelVersion,
    ServedModelInfo,
)
from convserve.service.tensors import parse_dtype, parse_shape, read_npy, read_raw, to_model_input
from convserve.service.wire import decode_base64, media_type

router = APIRouter()


def documented_errors(*statuses: int, model: type = ErrorResponse) -> dict:
    """OpenAPI `responses` for these statuses, each with the error schema (`model`)."""
    text = {
        400: "an image is empty, truncated or corrupt; a malformed body",
        404: "unknown model or version",
        408: "the body did not arrive within the body timeout (the connection is closed)",
        413: "the body is over the size limit, or an image has too many pixels",
        415: "an image is not PNG, JPEG, WebP or GIF; an unsupported body type",
        422: "invalid parameters, images too small or too elongated, too many images, "
        "bad base64, a tensor of the wrong shape or dtype or with NaN/infinity",
        503: "busy, too many slow uploads, queue full or overloaded, or not ready: retry after "
        "Retry-After seconds",
        504: "inference missed the request deadline",
    }
    return {s: {"model": model, "description": text[s]} for s in statuses}


INFERENCE_ERRORS = documented_errors(400, 404, 408, 413, 415, 422, 503, 504)
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


def classify_payload(
    served: ServedModel, probabilities: np.ndarray, k: int, names: list[str | None]
) -> bytes:
    """probabilities: N x classes -> the ClassifyResponse JSON: each image's top-k, most likely
    first, in the order sent. Built as plain data and serialized once."""
    indices, probs = top_k(probabilities, k)
    labels = served.spec.labels
    results = [
        {
            "filename": name,
            "predictions": [
                {"label": labels[j], "index": j, "probability": p}
                for j, p in zip(row_i, row_p, strict=True)
            ],
        }
        for name, row_i, row_p in zip(names, indices.tolist(), probs.tolist(), strict=True)
    ]
    return json.dumps({"model": served.stored.tag, "results": results}).encode()


def _same_or_conflict(name: str, query: object, body: object) -> object:
    if query is not None and body is not None and query != body:
        raise InvalidInput(
            "conflicting_parameters", f"{name} is {query!r} in the query but {body!r} in the body"
        )
    return query if query is not None else body


def _query(query_string: bytes) -> tuple[int | None, str | None, str | None]:
    """top_k, model and version from the query string (the last of repeated ones)."""
    query = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    top_k_text = query.get("top_k")
    k = None
    if top_k_text is not None:
        try:
            k = int(top_k_text)
        except ValueError:
            raise InvalidInput("invalid_request", "top_k: must be an integer") from None
        if k < 1:
            raise InvalidInput("invalid_request", "top_k: must be at least 1")
    return k, query.get("model"), query.get("version")


def _form_images(body: bytes, content_type: str, inference: Inference) -> list[Upload]:
    limit = inference.settings.max_images_per_request
    if media_type(content_type) == "application/x-www-form-urlencoded":  # no files possible
        fields = [name for name, _ in parse_qsl(body.decode("latin-1"), keep_blank_values=True)]
        parts = [multipart.Part(name, None, b"") for name in fields]
    else:
        parts = multipart.split(body, content_type, max_files=limit + 1)
    images = [p for p in parts if p.name == "images"]
    if any(p.filename is None for p in images):
        raise InvalidInput(
            "invalid_request", "images: must be an uploaded file (text and URLs are not accepted)"
        )
    inference.check_count(len(images))
    return [(p.filename, p.data) for p in images]


async def classify(
    inference: Inference, query_string: bytes, content_type: str | None, body: bytes
) -> bytes:
    """POST /classify, whole: the ClassifyResponse JSON, or a domain error."""
    top_k_, model, version = _query(query_string)
    kind = media_type(content_type)
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        served, k = inference.resolve(model, version, top_k_)
        images = _form_images(body, content_type or "", inference)
    elif kind.startswith("image/"):  # the image itself as the body (curl --data-binary)
        served, k = inference.resolve(model, version, top_k_)
        images = [(None, body)]
    elif kind == "application/json":
        try:
            request = ClassifyJsonRequest.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(describe(e) for e in exc.errors(include_input=False))
            raise InvalidInput("invalid_request", problems or "invalid JSON body") from None
        served, k = inference.resolve(
            _same_or_conflict("model", model, request.model),  # type: ignore[arg-type]
            _same_or_conflict("version", version, request.version),  # type: ignore[arg-type]
            _same_or_conflict("top_k", top_k_, request.top_k),  # type: ignore[arg-type]
        )
        inference.check_count(len(request.images))
        items = [EncodedImage(data=i) if isinstance(i, str) else i for i in request.images]
        images = [
            (it.filename, decode_base64(it.data, f"images[{n}]")) for n, it in enumerate(items)
        ]
    else:
        raise InvalidInput(
            "unsupported_media_type",
            "send multipart/form-data with `images` parts, an image as the body (image/png, "
            "image/jpeg, image/webp, image/gif), or application/json",
        )
    batch = await inference.decode(served, images)
    probabilities = await inference.probabilities(served, batch)
    return classify_payload(served, probabilities, k, [name for name, _ in images])


QUERY_PARAMETERS = [
    {"name": "top_k", "in": "query", "required": False, "description":
     "predictions per image (default 5)", "schema": {"type": "integer", "minimum": 1}},
    {"name": "model", "in": "query", "required": False, "description":
     "model name (default model if absent)", "schema": {"type": "string"}},
    {"name": "version", "in": "query", "required": False, "description":
     "model version, or 'latest'", "schema": {"type": "string"}},
]  # fmt: skip
BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.post(
    "/classify",
    response_model=None,
    responses={200: {"model": ClassifyResponse, "description": "one result per image"},
               **INFERENCE_ERRORS},
    summary="Classify images: multipart upload, the image as the body, or JSON with base64",
    openapi_extra={
        "parameters": QUERY_PARAMETERS,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                **{f"image/{kind}": BINARY for kind in ("png", "jpeg", "webp", "gif")},
                "application/json": {
                    "schema": ClassifyJsonRequest.model_json_schema(
                        ref_template="#/components/schemas/{model}"
                    )
                },
            },
        },
    },
)  # fmt: skip
async def classify_route(request: Request) -> Response:
    """Served by the raw ASGI path (`hotpath.py`) in the running service; this route documents
    the operation and answers it the same way wherever the app runs without that path."""
    payload = await classify(
        current(request),
        request.scope["query_string"],
        request.headers.get("content-type"),
        await request.body(),
    )
    return Response(payload, media_type="application/json")


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
    payload = classify_payload(served, probabilities, k, [None] * len(batch))
    return Response(payload, media_type="application/json")  # type: ignore[return-value]


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
