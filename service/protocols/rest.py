"""The REST protocol, one object: every task's routes read the same way, errors rendered as
`{"error": {"code": ..., "message": ..., "request_id": ...}}`, and `GET /models`.

A task's route takes images three ways (multipart parts, one image as the whole body, or JSON
with base64) or a tensor (.npy, or raw bytes with `shape` and `dtype`), and its parameters from
the query string or the JSON body, both validated by the route's one parameter model
(`tasks/base.Route.params`). A parameter given in both places must agree. The reading is here
once; what a route does with what it read is its task's `run`.

multipart/form-data (RFC 7578) is split here with `bytes.find`, for bodies already read whole:
python-multipart walks headers byte by byte in Python, which costs more than decoding a 28 px
PNG. Bodies are bounded (the admission body limit) before they arrive here; the number of
parts is bounded too. Anything malformed is `malformed_body`; nothing is guessed.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, unquote_to_bytes

from fastapi import APIRouter
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header

from convserve.errors import ConvserveError, ErrorCode, InvalidInput
from convserve.service.decoding import Upload
from convserve.service.messages import Answer, Request
from convserve.service.protocols.base import (
    Named,
    Operation,
    WireError,
    WireProtocol,
    retry_headers,
)
from convserve.service.schemas import (
    ErrorResponse,
    ModelsResponse,
    ModelVersion,
    ServedModelInfo,
)
from convserve.service.settings import ServiceSettings
from convserve.service.tasks.base import (
    TENSOR,
    ImageParts,
    ImagesCall,
    ModelParams,
    Route,
    Task,
    TensorCall,
)
from convserve.service.tensors import parse_dtype, parse_shape, read_npy, read_raw
from convserve.service.wire import decode_base64

if TYPE_CHECKING:
    from convserve.service.control import Models

# Every code, and its REST status: a code missing here fails at import.
STATUS: dict[ErrorCode, int] = {
    ErrorCode.EMPTY_IMAGE: 400,
    ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.MALFORMED_BODY: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.WRONG_TASK: 422,
    ErrorCode.INVALID_STYLE: 422,
    ErrorCode.VERSION_NOT_FOUND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.BODY_TIMEOUT: 408,
    ErrorCode.HEADER_TIMEOUT: 408,
    ErrorCode.BODY_TOO_LARGE: 413,
    ErrorCode.IMAGE_TOO_LARGE: 413,
    ErrorCode.TOO_MANY_PIXELS: 413,
    ErrorCode.UNSUPPORTED_IMAGE: 415,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.INVALID_TOP_K: 422,
    ErrorCode.TOO_MANY_IMAGES: 422,
    ErrorCode.IMAGE_TOO_SMALL: 422,
    ErrorCode.BAD_ASPECT_RATIO: 422,
    ErrorCode.INVALID_BASE64: 422,
    ErrorCode.INVALID_TENSOR: 422,
    ErrorCode.CONFLICTING_PARAMETERS: 422,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.LOAD_FAILED: 422,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.BUSY: 503,
    ErrorCode.TOO_MANY_UPLOADS: 503,
    ErrorCode.QUEUE_FULL: 503,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}
assert set(STATUS) == set(ErrorCode), set(ErrorCode) - set(STATUS)

UNSUPPORTED = (
    "send multipart/form-data with `images` parts, an image as the body (image/png, image/jpeg, "
    "image/webp, image/gif), or application/json"
)
TENSOR_TYPES = "send application/x-npy, or application/octet-stream with shape and dtype"
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def status_of(error: ConvserveError) -> int:
    """The REST status of a domain error."""
    return STATUS[error.code]


def describe(err: Mapping[str, Any]) -> str:
    """A pydantic validation error as `where: what`, without the offending value."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}"


def _invalid(exc: ValidationError) -> InvalidInput:
    problems = "; ".join(describe(e) for e in exc.errors(include_input=False))
    return InvalidInput(ErrorCode.INVALID_REQUEST, problems or "invalid request")


def same_or_conflict(name: str, query: object, body: object) -> object:
    if query is not None and body is not None and query != body:
        raise InvalidInput(
            ErrorCode.CONFLICTING_PARAMETERS,
            f"{name} is {query!r} in the query but {body!r} in the body",
        )
    return query if query is not None else body


class Rest(WireProtocol):
    name = "REST"
    prefix = "/"
    # The tensor route's own query parameters (they describe the body, not the answer).
    TENSOR_QUERY: ClassVar[tuple[str, ...]] = ("shape", "dtype")

    def __init__(self, tasks: list[Task], settings: ServiceSettings, models: Models) -> None:
        self.tasks, self.settings, self.models = tasks, settings, models

    @classmethod
    def render_error(cls, error: ConvserveError, request_id: str | None) -> WireError:
        body = {"error": {"code": error.code, "message": error.message, "request_id": request_id}}
        return WireError(status_of(error), json.dumps(body).encode(), retry_headers(error))

    def operations(self) -> list[tuple[str, Operation]]:
        ops = [
            (
                route.path,
                Operation(
                    "POST",
                    self,
                    read=functools.partial(self.read, route),
                    run=functools.partial(route.run, task),
                    task=task.name,
                ),
            )
            for task in self.tasks
            for route in task.routes
        ]
        models = Operation(
            "GET", self, self._no_call, self.list_models, resolves=False, admitted=False
        )
        return [*ops, ("/models", models)]

    # --- reading ---------------------------------------------------------------------------

    def read(self, route: Route, request: Request) -> ImagesCall[Any] | TensorCall[Any]:
        """The route's call: parameters (query string, or JSON body) and payload."""
        query = dict(parse_qsl(request.query_string.decode("latin-1"), keep_blank_values=True))
        if route.payload == TENSOR:
            return self._tensor(route, request, query)
        assert isinstance(route.payload, ImageParts)
        return self._images(route, route.payload, request, query)

    def _check_count(self, n: int) -> None:
        limit = self.settings.max_images_per_request
        if n > limit:
            raise InvalidInput(
                ErrorCode.TOO_MANY_IMAGES, f"{n} images sent; at most {limit} per request"
            )
        if n == 0:
            raise InvalidInput(ErrorCode.INVALID_REQUEST, "images: at least one image is required")

    def _params(self, route: Route, query: dict[str, str]) -> ModelParams:
        try:
            return route.params.model_validate(query)
        except ValidationError as exc:
            raise _invalid(exc) from None

    def _images(
        self, route: Route, parts: ImageParts, request: Request, query: dict[str, str]
    ) -> ImagesCall[Any]:
        kind = media_type(request.content_type)
        params = self._params(route, query)
        uploads: list[Upload]
        if kind in FORMS:
            uploads = self._form(request, parts)
        elif kind.startswith("image/") and parts.raw_body:  # curl --data-binary
            uploads = [(None, request.body)]
        elif kind == "application/json" and route.json_body is not None:
            params, uploads = self._json(route, request.body, params)
        else:
            raise InvalidInput(ErrorCode.UNSUPPORTED_MEDIA_TYPE, UNSUPPORTED)
        if parts.most is not None and len(uploads) > parts.most:
            raise InvalidInput(
                ErrorCode.INVALID_REQUEST,
                f"{parts.fields[0]}: at most {parts.most} image(s); got {len(uploads)}",
            )
        self._check_count(len(uploads))
        return ImagesCall(params, uploads)

    def _json(
        self, route: Route, body: bytes, query: ModelParams
    ) -> tuple[ModelParams, list[Upload]]:
        assert route.json_body is not None
        try:
            sent = route.json_body.model_validate_json(body)
        except ValidationError as exc:
            raise _invalid(exc) from None
        merged: dict[str, Any] = {}
        for name in type(query).model_fields:  # only what each place was given, not defaults
            chosen = same_or_conflict(
                name,
                getattr(query, name) if name in query.model_fields_set else None,
                getattr(sent, name) if name in sent.model_fields_set else None,
            )
            if chosen is not None:
                merged[name] = chosen
        items = sent.images
        self._check_count(len(items))
        uploads: list[Upload] = [
            (None, decode_base64(it, f"images[{n}]"))
            if isinstance(it, str)
            else (it.filename, decode_base64(it.data, f"images[{n}]"))
            for n, it in enumerate(items)
        ]
        return route.params.model_construct(**merged), uploads

    def _form(self, request: Request, parts: ImageParts) -> list[Upload]:
        """The form's file parts of each of `fields`, in order. Text in their place, and any
        part of another name, is refused: nothing the client sent is silently dropped."""
        body, fields = request.body, parts.fields
        if media_type(request.content_type) == "application/x-www-form-urlencoded":
            names = [name for name, _ in parse_qsl(body.decode("latin-1"), keep_blank_values=True)]
            sent = [Part(name, None, b"") for name in names]
        else:
            limit = self.settings.max_images_per_request
            # One file past the limit is parsed, so the count check names the limit.
            sent = split(body, request.content_type or "", max_files=limit + 1)
        found: dict[str, list[Upload]] = {name: [] for name in fields}
        for part in sent:
            if part.name not in found:
                takes = " and ".join(f"`{name}`" for name in fields)
                raise InvalidInput(
                    ErrorCode.INVALID_REQUEST,
                    f"unexpected form field {part.name!r}: this route takes {takes} parts only "
                    "(parameters go in the query string)",
                )
            if part.filename is None:
                raise InvalidInput(
                    ErrorCode.INVALID_REQUEST,
                    f"{part.name}: must be an uploaded file (text and URLs are not accepted)",
                )
            found[part.name].append((part.filename, part.data))
        if parts.one_each and any(len(found[name]) != 1 for name in fields):
            counts = ", ".join(f"{len(found[name])} {name}" for name in fields)
            wanted = " and ".join(f"`{name}`" for name in fields)
            raise InvalidInput(
                ErrorCode.INVALID_REQUEST, f"send one image each as parts {wanted}; got {counts}"
            )
        return [upload for name in fields for upload in found[name]]

    def _tensor(self, route: Route, request: Request, query: dict[str, str]) -> TensorCall[Any]:
        shape, dtype = (query.pop(name, None) for name in self.TENSOR_QUERY)
        params = self._params(route, query)
        kind = media_type(request.content_type)
        if kind == "application/x-npy":
            if shape is not None or dtype is not None:
                raise InvalidInput(
                    ErrorCode.CONFLICTING_PARAMETERS, "shape and dtype come from the .npy header"
                )
            array = read_npy(request.body)
        elif kind == "application/octet-stream":
            if shape is None or dtype is None:
                raise InvalidInput(
                    ErrorCode.INVALID_TENSOR,
                    "raw tensors need the shape and dtype query parameters",
                )
            array = read_raw(request.body, parse_shape(shape), parse_dtype(dtype))
        else:
            raise InvalidInput(ErrorCode.UNSUPPORTED_MEDIA_TYPE, TENSOR_TYPES)
        return TensorCall(params, array)

    # --- GET /models -------------------------------------------------------------------------

    @staticmethod
    def _no_call(request: Request) -> Named:
        return Named(None, None)

    async def list_models(self, served: None, call: Named) -> Answer:
        models = self.models
        infos: dict[str, list[ModelVersion]] = {}
        for one in models.all:
            stored, spec = one.stored, one.spec
            infos.setdefault(stored.name, []).append(
                ModelVersion(
                    version=stored.version,
                    tag=stored.tag,
                    default=models.get(stored.name) is one,
                    created=stored.created,
                    task=spec.task,
                    # The routes that take its images (the tensor route takes inputs).
                    routes=[r.path for r in one.task.routes if r.payload != TENSOR],
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
                    provider=one.model.provider,
                    sha256=stored.sha256,
                    metrics=spec.metrics,
                )
            )
        answer = ModelsResponse(
            default=models.default.stored.tag,
            models=[ServedModelInfo(name=n, versions=v) for n, v in infos.items()],
        )
        return Answer(answer.model_dump_json().encode())


# --- multipart/form-data ----------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    """`multipart/form-data; boundary=...` -> `multipart/form-data`."""
    return (content_type or "").split(";")[0].strip().lower()


CRLF = b"\r\n"


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None: a text field, not a file
    data: bytes


def _malformed(why: str) -> InvalidInput:
    return InvalidInput(ErrorCode.MALFORMED_BODY, f"the multipart body could not be parsed: {why}")


# What browsers and HTTP libraries send, read with one match; anything else (quoting, escapes,
# RFC 5987 names, other spellings) goes to python-multipart's header parser. The parser's two
# calls cost ~16 µs of a 28 px PNG's request (py-spy, docs/bench/profile-core).
_SIMPLE_BOUNDARY = re.compile(r"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,./:=?-]{1,200})")
_SIMPLE_DISPOSITION = re.compile(rb'form-data; name="([^"\\]*)"(?:; filename="([^"\\]*)")?')


def boundary_of(content_type: str) -> bytes:
    simple = _SIMPLE_BOUNDARY.fullmatch(content_type)
    if simple is not None:
        return simple[1].encode()
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise _malformed("no boundary in Content-Type")
    return boundary


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _headers(block: bytes) -> tuple[str, str | None]:
    """The part's name and filename, from its Content-Disposition."""
    for line in block.split(CRLF):
        key, sep, value = line.partition(b":")
        if not sep:
            raise _malformed("a part header has no colon")
        if key.strip().lower() == b"content-disposition":
            simple = _SIMPLE_DISPOSITION.fullmatch(value.strip())
            if simple is not None:
                name, filename = simple.groups()
                return _text(name), None if filename is None else _text(filename)
            kind, params = parse_options_header(value.strip())
            if kind != b"form-data" or b"name" not in params:
                raise _malformed("a part is not form-data with a name")
            filename = params.get(b"filename")
            if filename is None and b"filename*=" in value:  # RFC 5987: charset'lang'%XX
                encoded = value.split(b"filename*=", 1)[1].split(b";", 1)[0].strip()
                filename = unquote_to_bytes(encoded.split(b"'", 2)[-1])
            return _text(params[b"name"]), None if filename is None else _text(filename)
    raise _malformed("a part has no Content-Disposition")


def split(body: bytes, content_type: str, max_files: int, max_parts: int = 1000) -> list[Part]:
    """Every part of the form, in order. More than `max_files` files: `too_many_images`; more
    than `max_parts` parts in all: malformed."""
    delimiter = b"--" + boundary_of(content_type)
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble before the first delimiter is allowed, and ignored
        start = body.find(CRLF + delimiter)
        if start < 0:
            raise _malformed("no boundary in the body")
        pos = start + 2 + len(delimiter)
    parts: list[Part] = []
    files = 0
    close = CRLF + delimiter
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter; an epilogue after it is ignored
        line_end = body.find(CRLF, pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise _malformed("a delimiter is not followed by a line break")
        head_end = body.find(CRLF + CRLF, line_end)
        if head_end < 0:
            raise _malformed("a part's headers do not end")
        name, filename = _headers(body[line_end + 2 : head_end])
        data_start = head_end + 4
        data_end = body.find(close, data_start)
        if data_end < 0:
            raise _malformed("the body ends inside a part")
        if len(parts) == max_parts:
            raise _malformed(f"more than {max_parts} parts")
        parts.append(Part(name, filename, body[data_start:data_end]))
        files += filename is not None
        if files > max_files:
            raise InvalidInput(ErrorCode.TOO_MANY_IMAGES, f"at most {max_files} images per request")
        pos = data_end + len(close)


# --- the OpenAPI document ----------------------------------------------------------------------
# The routes above are answered by the server's front door; FastAPI writes their documentation
# from the same route declarations and parameter models (`documentation`), with no handler.


def documented_errors(*statuses: int, model: type = ErrorResponse) -> dict[int | str, Any]:
    """OpenAPI `responses` for these statuses, each with the error schema (`model`)."""
    text = {
        400: "an image is empty, truncated or corrupt; a malformed body",
        401: "no token, or not this route's token, when the server has one "
        "(CONVSERVE_API_TOKEN; model control: CONVSERVE_ADMIN_TOKEN)",
        403: "model control is off (no CONVSERVE_ADMIN_TOKEN)",
        404: "unknown model or version",
        408: "the head or the body did not arrive within its timeout (the connection is closed)",
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


INFERENCE_ERRORS = documented_errors(400, 401, 404, 408, 413, 415, 422, 503, 504)
BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_BODIES = {f"image/{kind}": BINARY for kind in ("png", "jpeg", "webp", "gif")}


def query_parameters(params: type[BaseModel]) -> list[dict[str, Any]]:
    """The OpenAPI query parameters of a parameter model: one per field, optional."""
    schema = params.model_json_schema()
    out: list[dict[str, Any]] = []
    for name, prop in schema["properties"].items():
        options = prop.get("anyOf", [prop])
        typed = next((o for o in options if o.get("type") != "null"), prop)
        typed = {k: v for k, v in typed.items() if k not in ("title", "default")}
        out.append(
            {"name": name, "in": "query", "required": False,
             "description": prop.get("description", ""), "schema": typed}
        )  # fmt: skip
    return out


def multipart_schema(parts: ImageParts) -> dict[str, Any]:
    """A multipart form whose parts are image files (`images`: one or more), and nothing else:
    a part of another name is refused, never dropped."""
    file = {"type": "string", "format": "binary"}
    array: dict[str, Any] = {
        "type": "array",
        "items": file,
        "minItems": 1,
        "description": "one or more image files (repeat the part)",
    }
    if parts.most is not None:
        array = {
            **array,
            "maxItems": parts.most,
            "description": f"at most {parts.most} image file(s)",
        }
    one = {**file, "description": "an image file"}
    properties = {name: one if parts.one_each else array for name in parts.fields}
    return {"type": "object", "required": list(parts.fields), "properties": properties,
            "additionalProperties": False}  # fmt: skip


def _request_body(route: Route) -> dict[str, Any]:
    from convserve.service.schemas import json_body_schema

    if route.payload == TENSOR:
        content: dict[str, Any] = {
            "application/x-npy": BINARY,
            "application/octet-stream": BINARY,
        }
    else:
        assert isinstance(route.payload, ImageParts)
        content = {"multipart/form-data": {"schema": multipart_schema(route.payload)}}
        if route.payload.raw_body:
            content.update(IMAGE_BODIES)
        if route.json_body is not None:
            content["application/json"] = {"schema": json_body_schema(route.json_body)}
    return {"required": True, "content": content}


TENSOR_PARAMETERS = [
    {"name": "shape", "in": "query", "required": False,
     "description": "raw bytes only: e.g. 4,1,28,28", "schema": {"type": "string"},
     "examples": {"four": {"value": "4,1,28,28"}}},
    {"name": "dtype", "in": "query", "required": False,
     "description": "raw bytes only: float32 (normalized) or uint8 (pixels)",
     "schema": {"type": "string"}},
]  # fmt: skip


def _undocumented_handler() -> Callable[[], None]:
    def served_by_the_front_door() -> None:  # never called: the document's placeholder
        raise AssertionError("answered by the server's front door")

    served_by_the_front_door.__signature__ = inspect.Signature()
    return served_by_the_front_door


def documentation(tasks: list[type[Task]]) -> APIRouter:
    """The REST operations of `tasks` and GET /models, for the OpenAPI document only."""
    router = APIRouter()
    for task in tasks:
        for route in task.routes:
            responses: dict[int | str, Any] = {**INFERENCE_ERRORS, **route.responses}
            if route.response is not None:
                responses[200] = {"model": route.response, "description": route.answer}
            extra_params = TENSOR_PARAMETERS if route.payload == TENSOR else []
            router.add_api_route(
                route.path,
                _undocumented_handler(),
                methods=["POST"],
                response_model=None,
                responses=responses,
                summary=route.summary,
                operation_id=route.path.strip("/").replace("/", "_"),
                openapi_extra={
                    "parameters": [*query_parameters(route.params), *extra_params],
                    "requestBody": _request_body(route),
                },
            )
    router.add_api_route(
        "/models",
        _undocumented_handler(),
        methods=["GET"],
        response_model=ModelsResponse,
        summary="Served models and versions",
        operation_id="list_models",
        responses={
            200: {"description": "every served model", "links": MODEL_LINKS},
            **documented_errors(401),
        },
    )
    return router


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
