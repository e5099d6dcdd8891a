"""Admission control for the inference routes: the body limit and the in-flight limit.

- Body limit: a declared Content-Length over the limit is refused before any byte is read; a
  body without one (chunked) is counted as it streams and refused the moment it passes the
  limit. Either way 413 `body_too_large`, and no more than the limit is ever held.
- In-flight limit: at most `max_in_flight` requests whose body has arrived are handled at once;
  the next is answered 503 `busy` with Retry-After at once instead of queueing without bound.
  A request counts only once its whole body is in, so slow uploads cannot take the places of
  requests that are ready to run.

The raw inference routes (`hotpath.py`) use `Admission` directly; `AdmissionMiddleware` applies
the same rules to the app's other POST routes. Probes (/livez, /readyz) and /metrics are
BentoML's own routes, outside both, so they stay cheap and answer while inference is saturated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convserve.errors import ConvserveError, InvalidInput, Overloaded
from convserve.service.errors import for_path

COUNTED_METHODS = {"POST", "PUT", "PATCH"}


class ClientGone(Exception):
    """The client disconnected before its request was complete: nobody to answer."""


@dataclass
class Admission:
    max_body_bytes: int
    max_in_flight: int
    on_reject: Callable[[str], None] | None = None  # called with the error code
    in_flight: int = 0

    def _reject(self, error: ConvserveError) -> ConvserveError:
        if self.on_reject:
            self.on_reject(error.code)
        return error

    def _too_large(self) -> ConvserveError:
        message = f"the request body is over the limit of {self.max_body_bytes} bytes"
        return self._reject(InvalidInput("body_too_large", message))

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, within the limit; `ClientGone` if the client hangs up first."""
        declared = content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def enter(self) -> None:
        """Take an in-flight place, or raise 503 `busy`; pair with `leave`."""
        if self.in_flight >= self.max_in_flight:
            message = f"{self.in_flight} requests are in progress; retry shortly"
            raise self._reject(Overloaded("busy", message))
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    async def admit(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The body, with an in-flight place taken (pair with `leave`); or None when the
        request was refused (answered here) or its client hung up."""
        try:
            body = await self.read_body(scope, receive)
            self.enter()
        except ClientGone:
            return None
        except ConvserveError as error:
            await send_error(scope, send, error)
            return None
        return body


async def send_error(scope: Scope, send: Send, error: ConvserveError) -> None:
    """Answer with `error` in the wire format of the protocol the path belongs to."""
    wire = for_path(scope.get("path", ""), error)
    await send_bytes(send, wire.status, wire.body, wire.headers)


async def send_bytes(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None,
    media_type: bytes = b"application/json",
) -> None:  # fmt: skip
    raw_headers = [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    """The same rules for the app's other POST routes: the body is read within the limit first,
    then the request takes an in-flight place and the app gets the body replayed. The
    `Admission` comes from `app.state.admission`, set when the service starts; until then
    requests pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission: Admission | None = (
            getattr(scope["app"].state, "admission", None) if "app" in scope else None
        )
        if scope["type"] != "http" or scope["method"] not in COUNTED_METHODS or admission is None:
            await self.app(scope, receive, send)
            return
        body = await admission.admit(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only a disconnect can come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            await self.app(scope, replay, send)
        finally:
            admission.leave()


def content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
