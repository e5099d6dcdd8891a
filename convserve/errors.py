"""Domain errors: what went wrong, in words safe to show a client, with a stable code.

Nothing here knows HTTP. Each protocol (`service/errors.py`) maps an error's `code` to its own
wire format and status in one place, so the core, the pool and the batcher stay protocol-free.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every code a client can see: a closed set. Each protocol maps every one to its status
    (`service/protocols/`); a code outside it cannot be raised."""

    EMPTY_IMAGE = "empty_image"
    INVALID_IMAGE = "invalid_image"
    MALFORMED_BODY = "malformed_body"
    MODEL_NOT_FOUND = "model_not_found"
    WRONG_TASK = "wrong_task"
    INVALID_STYLE = "invalid_style"
    VERSION_NOT_FOUND = "version_not_found"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TIMEOUT = "body_timeout"
    HEADER_TIMEOUT = "header_timeout"
    BODY_TOO_LARGE = "body_too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED_IMAGE = "unsupported_image"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_REQUEST = "invalid_request"
    INVALID_TOP_K = "invalid_top_k"
    TOO_MANY_IMAGES = "too_many_images"
    IMAGE_TOO_SMALL = "image_too_small"
    BAD_ASPECT_RATIO = "bad_aspect_ratio"
    INVALID_BASE64 = "invalid_base64"
    INVALID_TENSOR = "invalid_tensor"
    CONFLICTING_PARAMETERS = "conflicting_parameters"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    LOAD_FAILED = "load_failed"
    INTERNAL_ERROR = "internal_error"
    BUSY = "busy"
    TOO_MANY_UPLOADS = "too_many_uploads"
    QUEUE_FULL = "queue_full"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class ConvserveError(Exception):
    """An error whose message is safe to show the client; `code` is stable and documented."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


class InvalidInput(ConvserveError):
    """The request itself is wrong: an image, a tensor, a parameter. Retrying will not help."""


class NotServed(ConvserveError):
    """The model or version a request names is not served (`model_not_found`, ...)."""


class Overloaded(ConvserveError):
    """The server cannot take this request now; a retry after `retry_after_s` may succeed."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: int = 1) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ConvserveError):
    """The request was accepted but could not be answered within its deadline."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(ErrorCode.DEADLINE_EXCEEDED, message)
        self.retry_after_s = retry_after_s
