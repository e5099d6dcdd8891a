"""The documentation app's own errors (an unknown path, a wrong method, an unexpected failure)
answered in the format of the protocol whose paths they fall under, as the operations' are.

The operations' errors are rendered by their own protocol (`protocols/`), by the server.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from convserve.errors import ConvserveError, ErrorCode, InvalidInput
from convserve.service.metrics import refused
from convserve.service.protocols.base import INTERNAL, WireProtocol
from convserve.service.protocols.oip.http import Oip
from convserve.service.protocols.rest import Rest, describe
from convserve.service.requests_log import current

log = logging.getLogger("convserve.errors")

PROTOCOLS: tuple[type[WireProtocol], ...] = (Oip, Rest)  # the most specific first
CODE_OF_STATUS = {400: ErrorCode.MALFORMED_BODY, 404: ErrorCode.NOT_FOUND,
                  405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.BODY_TOO_LARGE,
                  415: ErrorCode.UNSUPPORTED_MEDIA_TYPE}  # fmt: skip


def protocol_of(path: str) -> type[WireProtocol]:
    return next(p for p in PROTOCOLS if p.owns(path))


def response(path: str, error: ConvserveError, headers: dict[str, str] | None = None) -> Response:
    refused(error.code)
    wire = protocol_of(path).render_error(error, current.get())
    return Response(
        wire.body,
        status_code=wire.status,
        headers={**wire.headers, **(headers or {})},
        media_type="application/json",
    )


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Name the offending fields, never echo their values (they may be large or binary).
    problems = "; ".join(describe(err) for err in exc.errors())
    error = InvalidInput(ErrorCode.INVALID_REQUEST, problems or "invalid request")
    return response(request.url.path, error)


async def _http(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) in the protocol's format."""
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail or "request refused"
    code = CODE_OF_STATUS.get(exc.status_code, ErrorCode.MALFORMED_BODY)
    # Starlette's own headers: Allow on a 405, as RFC 9110 requires.
    return response(request.url.path, ConvserveError(code, message), dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return response(request.url.path, INTERNAL)


def install(app: FastAPI) -> None:
    """Every error the app can raise, answered in the format of the protocol it belongs to."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
