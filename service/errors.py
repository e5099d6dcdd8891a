"""Where domain errors become HTTP answers, for each protocol, in one place.

REST (`/classify`, `/models`, ...):  {"error": {"code": ..., "message": ...}}, status by code.
Open Inference Protocol (`/v2/...`): {"error": "<message>"}, 400 for every malformed request.
Messages never hold stack traces, paths or addresses; 503s and 504s carry Retry-After.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from convserve.errors import ConvserveError, DeadlineExceeded, InvalidInput, Overloaded
from convserve.service.requests_log import current

log = logging.getLogger("convserve.errors")

# Every code the API documents, and its REST status. An unknown code is a bug: 500.
STATUS: dict[str, int] = {
    "empty_image": 400,
    "invalid_image": 400,
    "malformed_body": 400,
    "model_not_found": 404,
    "version_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_timeout": 408,
    "body_too_large": 413,
    "image_too_large": 413,
    "too_many_pixels": 413,
    "unsupported_image": 415,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "invalid_top_k": 422,
    "too_many_images": 422,
    "image_too_small": 422,
    "bad_aspect_ratio": 422,
    "invalid_base64": 422,
    "invalid_tensor": 422,
    "conflicting_parameters": 422,
    "internal_error": 500,
    "busy": 503,
    "too_many_uploads": 503,
    "queue_full": 503,
    "overloaded": 503,
    "deadline_exceeded": 504,
}
CODE_OF_STATUS = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed",
                  413: "body_too_large", 415: "unsupported_media_type"}  # fmt: skip
INTERNAL = ConvserveError("internal_error", "internal error; the server log has details")
OIP_PREFIX = "/v2"


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None  # the X-Request-ID of the request


class ErrorResponse(BaseModel):
    error: ErrorBody


@dataclass(frozen=True)
class WireError:
    status: int
    body: bytes  # JSON
    headers: dict[str, str]


def status_of(error: ConvserveError) -> int:
    """The REST status of a domain error."""
    return STATUS.get(error.code, 500)


def _retry_headers(error: ConvserveError) -> dict[str, str]:
    if isinstance(error, Overloaded | DeadlineExceeded):
        return {"Retry-After": str(error.retry_after_s)}
    return {}


def rest(error: ConvserveError) -> WireError:
    body = {"error": {"code": error.code, "message": error.message, "request_id": current.get()}}
    return WireError(status_of(error), json.dumps(body).encode(), _retry_headers(error))


def oip(error: ConvserveError) -> WireError:
    """The Open Inference Protocol's error: its message (and the request id); 400 for any
    malformed request."""
    status = status_of(error)
    status = 400 if status in (415, 422) else status
    body = {"error": error.message, "request_id": current.get()}
    return WireError(status, json.dumps(body).encode(), _retry_headers(error))


def for_path(path: str, error: ConvserveError) -> WireError:
    """The wire format of the protocol `path` belongs to."""
    return oip(error) if path.startswith(OIP_PREFIX) else rest(error)


def response(path: str, error: ConvserveError) -> Response:
    wire = for_path(path, error)
    return Response(
        wire.body, status_code=wire.status, headers=wire.headers, media_type="application/json"
    )


def _count(request: Request, code: str) -> None:
    # The service puts a metrics hook on app.state; the handlers also work without one.
    if hook := getattr(request.app.state, "on_error", None):
        hook(code)


async def _domain(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConvserveError)
    _count(request, exc.code)
    return response(request.url.path, exc)


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Name the offending fields, never echo their values (they may be large or binary).
    problems = "; ".join(describe(err) for err in exc.errors())
    return await _domain(request, InvalidInput("invalid_request", problems or "invalid request"))


def describe(err: dict) -> str:
    """A pydantic/FastAPI validation error as `where: what`, without the offending value."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}"


async def _http(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) in the protocol's format."""
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    code = CODE_OF_STATUS.get(exc.status_code, "malformed_body")
    return await _domain(request, ConvserveError(code, message))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return await _domain(request, INTERNAL)


def install(app: FastAPI) -> None:
    """Every error the app can raise, answered in the format of the protocol it belongs to."""
    app.add_exception_handler(ConvserveError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
