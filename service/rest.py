"""The REST protocol's shared parts: reading images and parameters from a request body, the
documented error responses, and `GET /models`.

Every task's REST route takes images the same three ways (multipart `images` parts, one image
as the whole body, or JSON with base64), so they are read here once, for every task; each task
module (`service/tasks/`) owns its route, its parameters and its answer. Errors are the REST
error body (`errors.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from convserve.errors import InvalidInput
from convserve.service import multipart
from convserve.service.errors import ErrorResponse, describe
from convserve.service.inference import Inference, Upload, current
from convserve.service.schemas import ModelsResponse, ModelVersion, ServedModelInfo
from convserve.service.task import Request as TaskRequest
from convserve.service.wire import decode_base64, media_type

router = APIRouter()
HEADER_LENGTH = "Inference-Header-Content-Length"
JsonBody = TypeVar("JsonBody", bound=BaseModel)
Target = TypeVar("Target")


def documented_errors(*statuses: int, model: type = ErrorResponse) -> dict:
    """OpenAPI `responses` for these statuses, each with the error schema (`model`)."""
    text = {
        400: "an image is empty, truncated or corrupt; a malformed body",
        404: "unknown model or version",
        408: "the body did not arrive within the body timeout (the connection is closed)",
        413: "the body is over the size limit, or an image has too many pixels",
        415: "an image is not PNG, JPEG, WebP or GIF; an unsupported body type",
        422: "invalid parameters, images too small or too elongated, too many images, "
        "bad base64, a tensor of the wrong shape or dtype or with NaN/infinity, a model of "
        "another task",
        503: "busy, too many slow uploads, queue full or overloaded, or not ready: retry after "
        "Retry-After seconds",
        504: "inference missed the request deadline",
    }
    return {s: {"model": model, "description": text[s]} for s in statuses}


INFERENCE_ERRORS = documented_errors(400, 404, 408, 413, 415, 422, 503, 504)
MODEL_PARAMETERS = [
    {"name": "model", "in": "query", "required": False, "description":
     "model name (default: the first served model of the route's task)",
     "schema": {"type": "string", "minLength": 1}},
    {"name": "version", "in": "query", "required": False, "description":
     "model version, or 'latest'", "schema": {"type": "string", "minLength": 1}},
]  # fmt: skip
BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_BODIES = {f"image/{kind}": BINARY for kind in ("png", "jpeg", "webp", "gif")}


def multipart_schema(*fields: str, many: bool = True, most: int | None = None) -> dict:
    """A multipart form whose `fields` are image files (`images`: one or more), and nothing
    else: a part of another name is refused (`form_files`), never dropped."""
    file = {"type": "string", "format": "binary"}
    array: dict = {"type": "array", "items": file, "minItems": 1,
                   "description": "one or more image files (repeat the part)"}  # fmt: skip
    if most is not None:
        array = {**array, "maxItems": most, "description": f"at most {most} image file(s)"}
    properties = {
        name: array if many else {**file, "description": "an image file"} for name in fields
    }
    return {"type": "object", "required": list(fields), "properties": properties,
            "additionalProperties": False}  # fmt: skip


def query(query_string: bytes) -> dict[str, str]:
    """The query's parameters (the last of repeated ones)."""
    return dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))


def same_or_conflict(name: str, query: object, body: object) -> object:
    if query is not None and body is not None and query != body:
        raise InvalidInput(
            "conflicting_parameters", f"{name} is {query!r} in the query but {body!r} in the body"
        )
    return query if query is not None else body


def parse_json(body: bytes, schema: type[JsonBody]) -> JsonBody:
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(describe(e) for e in exc.errors(include_input=False))
        raise InvalidInput("invalid_request", problems or "invalid JSON body") from None


def form_files(
    body: bytes, content_type: str, inference: Inference, fields: tuple[str, ...]
) -> dict[str, list[Upload]]:
    """The form's file parts of each of `fields`, in order. Text in their place, and any part
    of another name, is refused: nothing the client sent is silently dropped."""
    limit = inference.settings.max_images_per_request
    if media_type(content_type) == "application/x-www-form-urlencoded":  # no files possible
        names = [name for name, _ in parse_qsl(body.decode("latin-1"), keep_blank_values=True)]
        parts = [multipart.Part(name, None, b"") for name in names]
    else:
        parts = multipart.split(body, content_type, max_files=limit + 1)
    found: dict[str, list[Upload]] = {name: [] for name in fields}
    for part in parts:
        if part.name not in found:
            takes = " and ".join(f"`{name}`" for name in fields)
            raise InvalidInput(
                "invalid_request",
                f"unexpected form field {part.name!r}: this route takes {takes} parts only "
                "(parameters go in the query string)",
            )
        if part.filename is None:
            raise InvalidInput(
                "invalid_request",
                f"{part.name}: must be an uploaded file (text and URLs are not accepted)",
            )
        found[part.name].append((part.filename, part.data))
    return found


UNSUPPORTED = (
    "send multipart/form-data with `images` parts, an image as the body (image/png, image/jpeg, "
    "image/webp, image/gif), or application/json"
)


async def read_images(
    inference: Inference,
    content_type: str | None,
    body: bytes,
    schema: type[JsonBody],
    resolve: Callable[[JsonBody | None], Target],
) -> tuple[Target, list[Upload]]:
    """A task's request, its images sent any of the three ways: (what `resolve` made of its
    parameters, called with the JSON body when it came as JSON, else None; the images in the
    order sent, counted against the request limit). `schema` has `images`: base64 strings or
    {data, filename} objects. The parameters are resolved before the images are read, so a
    request naming an unknown model is refused before its images cost anything. A large body
    is taken apart on a decode thread (`Inference.off_loop`)."""

    def read() -> tuple[Target, list[Upload]]:
        kind = media_type(content_type)
        images: list[Upload]
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            target = resolve(None)
            images = form_files(body, content_type or "", inference, ("images",))["images"]
        elif kind.startswith("image/"):  # the image itself as the body (curl --data-binary)
            target = resolve(None)
            images = [(None, body)]
        elif kind == "application/json":
            request = parse_json(body, schema)
            target = resolve(request)
            items = request.images  # type: ignore[attr-defined]
            inference.check_count(len(items))
            images = [
                (None, decode_base64(it, f"images[{n}]"))
                if isinstance(it, str)
                else (it.filename, decode_base64(it.data, f"images[{n}]"))
                for n, it in enumerate(items)
            ]
        else:
            raise InvalidInput("unsupported_media_type", UNSUPPORTED)
        inference.check_count(len(images))
        return target, images

    return await inference.off_loop(len(body), read)


async def plain(request: Request) -> TaskRequest:
    """A FastAPI request as the task handlers take it (what the raw path hands them)."""
    return TaskRequest(
        request.scope["query_string"],
        request.headers.get("content-type"),
        await request.body(),
        request.headers.get(HEADER_LENGTH),
    )


def number(params: dict[str, str], name: str, kind: type, low: float, high: float):  # noqa: ANN201
    """A numeric query parameter within [low, high], or None when absent."""
    text = params.get(name)
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InvalidInput("invalid_request", f"{name}: must be {what}") from None
    return in_range(name, value, low, high)


def in_range(name: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:  # NaN fails this too
        raise InvalidInput("invalid_request", f"{name}: must be between {low:g} and {high:g}")
    return value


# OpenAPI links: a client (or a stateful fuzzer) that lists the models can go on to each one's
# Open Inference Protocol routes with a name and version that exist.
_NAME = "$response.body#/models/0/name"
_VERSION = "$response.body#/models/0/versions/0/version"
MODEL_LINKS = {
    operation: {"operationId": operation, "parameters": params}
    for operation, params in {
        "oip_model_metadata": {"name": _NAME},
        "oip_model_ready": {"name": _NAME},
        "oip_model_config": {"name": _NAME},
        "oip_infer": {"name": _NAME},
        "oip_model_version_metadata": {"name": _NAME, "version": _VERSION},
        "oip_model_version_ready": {"name": _NAME, "version": _VERSION},
        "oip_infer_version": {"name": _NAME, "version": _VERSION},
    }.items()
}


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="Served models and versions",
    responses={200: {"description": "every served model", "links": MODEL_LINKS}},
)
async def list_models(request: Request) -> ModelsResponse:
    pool = current(request).pool
    infos: dict[str, list[ModelVersion]] = {}
    for served in pool.models:
        stored, spec = served.stored, served.spec
        infos.setdefault(stored.name, []).append(
            ModelVersion(
                version=stored.version,
                tag=stored.tag,
                default=pool.get(stored.name) is served,
                created=stored.created,
                task=spec.task,
                routes=list(served.task.routes),
                architecture=spec.architecture,
                dataset=spec.dataset,
                precision=stored.precision,
                input=spec.input,
                recipe=spec.input.describe(),
                output=spec.output if spec.task == "classify" else None,
                labels=list(spec.labels),
                detect=spec.detect,
                embed=spec.embed,
                stylize=spec.stylize,
                provider=served.model.provider,
                sha256=stored.sha256,
                metrics=spec.metrics,
            )
        )
    return ModelsResponse(
        default=pool.default.stored.tag,
        models=[ServedModelInfo(name=n, versions=v) for n, v in infos.items()],
    )
