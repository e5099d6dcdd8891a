"""Request ids and logs.

X-Request-ID: taken from the request when it is a sane token (1 to 128 characters of
letters, digits and `._:/+=@-`), else generated (32 hex digits); echoed in the response
header, in every error body (`request_id`) and in every log line written while the request
is handled (a context variable, so any logger sees it).

CONVSERVE_LOG_FORMAT=json makes every log line of the worker one JSON object: time, level,
logger, message, request_id when there is one, and the exception's type and message (never a
stack trace: those stay in text logs). With CONVSERVE_ACCESS_LOG on, one line per request:
method, path, status, milliseconds, request_id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_TOKEN = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
access = logging.getLogger("convserve.access")


def request_id_of(scope: Scope) -> str:
    """The client's sane X-Request-ID, or a new one."""
    return _incoming(scope) or os.urandom(16).hex()


def _incoming(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == HEADER:
            return value.decode("ascii") if _TOKEN.fullmatch(value) else None
    return None


class RequestIds:
    """ASGI, outermost of convserve's layers: one id per HTTP request, set before anything
    else runs and echoed on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)


def log_access(method: str, path: str, status: int, seconds: float) -> None:
    """The access line of one request (RequestMetrics, which already has its status and time,
    writes it while the request id is still set)."""
    ms = 1000 * seconds
    fields = {"method": method, "path": path, "status": status, "ms": round(ms, 2)}
    access.info("%s %s %d %.1f ms", method, path, status, ms, extra=fields)


class WithRequestId(logging.Filter):
    """Puts the current request's id on every record (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True


EXTRA_FIELDS = ("method", "path", "status", "ms", "code")


class JsonFormatter(logging.Formatter):
    converter = time.gmtime  # the "Z" below

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current.get()
        if request_id:
            line["request_id"] = request_id
        for field in EXTRA_FIELDS:
            if hasattr(record, field):
                line[field] = getattr(record, field)
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(line, default=str)


def configure(log_format: str) -> None:
    """Request ids on every record of this worker; JSON lines when asked. Applied to the
    handlers BentoML installed on the root logger, so its own lines follow too."""
    handlers = logging.getLogger().handlers
    for handler in handlers:
        if not any(isinstance(f, WithRequestId) for f in handler.filters):
            handler.addFilter(WithRequestId())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
