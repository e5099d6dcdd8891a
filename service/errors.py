"""Where failures become HTTP answers: a stable `code`, a plain message, no internals."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("convserve.errors")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An error whose message is safe to show the client."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


V2_PREFIX = "/v2"


def error_payload(path: str, status: int, code: str, message: str) -> tuple[int, dict]:
    """The status and body of an error, in the format of the API the path belongs to.

    The Open Inference Protocol (/v2) answers `{"error": "<message>"}` and uses 400 for every
    malformed request; the rest of the API answers `{"error": {"code", "message"}}`.
    """
    if path.startswith(V2_PREFIX):
        return (400 if status in (415, 422) else status), {"error": message}
    return status, ErrorResponse(error=ErrorBody(code=code, message=message)).model_dump()


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, path: str = ""
) -> JSONResponse:
    status, body = error_payload(path, status, code, message)
    return JSONResponse(body, status_code=status, headers=headers)


def _count(request: Request, code: str) -> None:
    # The service puts a metrics hook on app.state; the handlers also work without one.
    if hook := getattr(request.app.state, "on_error", None):
        hook(code)


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    _count(request, exc.code)
    return error_response(exc.status, exc.code, exc.message, exc.headers, request.url.path)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count(request, "invalid_request")
    # Name the offending fields, never echo their values (they may be large or binary).
    problems = "; ".join(_describe(err) for err in exc.errors())
    return error_response(
        422, "invalid_request", problems or "invalid request", None, request.url.path
    )


def _describe(err: dict) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "request"
    return f"{where}: {err.get('msg', 'invalid')}"


HTTP_CODES = {
    400: "malformed_body",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (bad multipart framing, unknown route) in our format."""
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    _count(request, code)
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    return error_response(exc.status_code, code, message, exc.headers, request.url.path)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    message = "internal error; the server log has details"
    return error_response(500, "internal_error", message, None, request.url.path)
