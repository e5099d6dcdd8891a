"""Admission control in front of the inference routes, as plain ASGI middleware.

- Body limit: a declared Content-Length over the limit is refused before any byte is read; a
  body without one (chunked) is counted as it streams and refused the moment it passes the
  limit. Either way 413 `body_too_large`, and the body is never held whole in memory.
- In-flight limit: at most `max_in_flight` inference requests are handled at once; the next
  is answered 503 `busy` with Retry-After at once instead of queueing without bound.

Probes (/livez, /readyz) and /metrics are BentoML's own routes, outside this app, so they
stay cheap and answer while inference is saturated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convserve.errors import ConvserveError, InvalidInput, Overloaded
from convserve.service.errors import for_path

COUNTED_METHODS = {"POST", "PUT", "PATCH"}


@dataclass(frozen=True)
class AdmissionLimits:
    max_body_bytes: int
    max_in_flight: int
    on_reject: Callable[[str], None] | None = None  # called with the error code


class _BodyTooLarge(Exception):
    pass


async def send_error(scope: Scope, send: Send, error: ConvserveError) -> None:
    """Answer with `error` in the wire format of the protocol the path belongs to."""
    wire = for_path(scope.get("path", ""), error)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(wire.body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in wire.headers.items()),
    ]
    await send({"type": "http.response.start", "status": wire.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": wire.body})


class AdmissionMiddleware:
    """Limits come from `app.state.admission` (an AdmissionLimits), set by the service when it
    starts; until then requests pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits: AdmissionLimits | None = (
            getattr(scope["app"].state, "admission", None) if "app" in scope else None
        )
        if scope["type"] != "http" or scope["method"] not in COUNTED_METHODS or limits is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limits.max_body_bytes:
            await self._reject_body(scope, send, limits)
            return
        if self.in_flight >= limits.max_in_flight:
            if limits.on_reject:
                limits.on_reject("busy")
            message = f"{self.in_flight} requests are in progress; retry shortly"
            await send_error(scope, send, Overloaded("busy", message))
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send, limits)
        finally:
            self.in_flight -= 1

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, limits: AdmissionLimits
    ) -> None:
        seen = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limits.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app made of the aborted body, the answer is 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if exceeded and not started:
            await self._reject_body(scope, send, limits)

    @staticmethod
    async def _reject_body(scope: Scope, send: Send, limits: AdmissionLimits) -> None:
        if limits.on_reject:
            limits.on_reject("body_too_large")
        message = f"the request body is over the limit of {limits.max_body_bytes} bytes"
        await send_error(scope, send, InvalidInput("body_too_large", message))


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
