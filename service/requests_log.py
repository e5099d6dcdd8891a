"""Request ids in logs, and the log format.

The request's id (X-Request-ID, taken or made by the server's front door) is in a context
variable while the request is handled, so every log line written then carries it.

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

current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# A client's request id is taken when it is a sane token (1 to 128 characters of letters,
# digits and `._:/+=@-`), else a new one is made.
SANE_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def new_request_id() -> str:
    return os.urandom(16).hex()  # 32 hex digits


access = logging.getLogger("convserve.access")


def log_access(method: str, path: str, status: int, seconds: float) -> None:
    """The access line of one request (written by the front door, which has its status and time,
    while the request id is still set)."""
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
