"""Domain errors: what went wrong, in words safe to show a client, with a stable code.

Nothing here knows HTTP. Each protocol (`service/errors.py`) maps an error's `code` to its own
wire format and status in one place, so the core, the pool and the batcher stay protocol-free.
"""

from __future__ import annotations


class ConvserveError(Exception):
    """An error whose message is safe to show the client; `code` is stable and documented."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidInput(ConvserveError):
    """The request itself is wrong: an image, a tensor, a parameter. Retrying will not help."""


class NotServed(ConvserveError):
    """The model or version a request names is not served (`model_not_found`, ...)."""


class Overloaded(ConvserveError):
    """The server cannot take this request now; a retry after `retry_after_s` may succeed."""

    def __init__(self, code: str, message: str, retry_after_s: int = 1) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ConvserveError):
    """The request was accepted but could not be answered within its deadline."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__("deadline_exceeded", message)
        self.retry_after_s = retry_after_s
