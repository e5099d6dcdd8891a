"""Where domain errors become HTTP answers, for each protocol, in one place.

REST (`/classify`, `/models`, ...):  {"error": {"code": ..., "message": ...}}, status by code.
Open Inference Protocol (`/v2/...`): {"error": "<message>"}, 400 for every malformed request.
Messages never hold stack traces, paths or addresses; 503s and 504s carry Retry-After; 405s
carry Allow.

Each protocol is one `Protocol` object: the paths it owns and how it renders an error. Whoever
answers an error (the FastAPI handlers below, admission, the raw hot path) asks `protocol_of`,
never the path itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    "wrong_task": 422,
    "invalid_style": 422,
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


@dataclass(frozen=True)
class Protocol:
    """A wire protocol, as errors see it: the paths it owns and its error format."""

    name: str
    prefix: str  # it owns this path and everything under it ("/": every path)
    render: Callable[[ConvserveError], WireError] = field(repr=False)

    def owns(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix.rstrip("/") + "/")


REST = Protocol("REST", "/", rest)
OIP = Protocol("Open Inference Protocol", "/v2", oip)
PROTOCOLS = (OIP, REST)  # the most specific first


def protocol_of(path: str) -> Protocol:
    return next(p for p in PROTOCOLS if p.owns(path))


def for_path(path: str, error: ConvserveError) -> WireError:
    """The error in the wire format of the protocol `path` belongs to."""
    return protocol_of(path).render(error)


def response(path: str, error: ConvserveError, headers: dict[str, str] | None = None) -> Response:
    wire = for_path(path, error)
    return Response(
        wire.body,
        status_code=wire.status,
        headers={**wire.headers, **(headers or {})},
        media_type="application/json",
    )


def _count(request: Request, code: str) -> None:
    # The service puts a metrics hook on app.state; the handlers also work without one.
    if hook := getattr(request.app.state, "on_error", None):
        hook(code)


async def _domain(
    request: Request, exc: Exception, headers: dict[str, str] | None = None
) -> Response:
    assert isinstance(exc, ConvserveError)
    _count(request, exc.code)
    return response(request.url.path, exc, headers)


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Name the offending fields, never echo their values (they may be large or binary).
    problems = "; ".join(describe(err) for err in exc.errors())
    return await _domain(request, InvalidInput("invalid_request", problems or "invalid request"))


def describe(err: Mapping[str, Any]) -> str:
    """A pydantic/FastAPI validation error as `where: what`, without the offending value."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}"


async def _http(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) in the protocol's format."""
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    code = CODE_OF_STATUS.get(exc.status_code, "malformed_body")
    # Starlette's own headers: Allow on a 405, as RFC 9110 requires.
    return await _domain(request, ConvserveError(code, message), dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return await _domain(request, INTERNAL)


def install(app: FastAPI) -> None:
    """Every error the app can raise, answered in the format of the protocol it belongs to."""
    app.add_exception_handler(ConvserveError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
