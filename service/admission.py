"""Admission control for the inference routes: what a request may hold before it runs.

- Body size: a declared Content-Length over `max_body_bytes` is refused before any byte is
  read; a body without one (chunked) is counted as it streams and refused the moment it passes
  the limit. Either way 413 `body_too_large`, and no more than the limit is ever held.
- Body time: the whole body must arrive within `body_timeout_s`, else 408 `body_timeout`.
- Slow bodies: a body still arriving `SLOW_AFTER_S` after its first bytes, slower than
  `SLOW_BYTES_PER_S`, takes one of `max_pending_bodies` places until it is complete; with none
  free, 503 `too_many_uploads`.
  A trickling client therefore holds a place for at most `body_timeout_s`, and never one of
  the in-flight places that requests ready to run need; bodies that arrive at network speed
  never wait for one.
- Bytes held: bodies held at once, from the first byte to the answer, stay within
  `max_held_bytes` (a declared length is reserved up front); past it, 503 `busy`, after the
  body has been read to its end and dropped.
- In flight: at most `max_in_flight` requests whose body has arrived are handled at once;
  the next is answered 503 `busy` with Retry-After at once instead of queueing without bound.

Answers given before the body is read whole (413, 408, 503 `too_many_uploads`) carry
`Connection: close`: the rest of that body is never read, so the connection cannot carry
another request.

The raw inference routes (`hotpath.py`) use `Admission` directly; `AdmissionMiddleware` applies
the same rules to the app's other POST routes. Probes (/livez, /readyz) and /metrics are
BentoML's own routes, outside both, so they stay cheap and answer while inference is saturated.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convserve.errors import ConvserveError, InvalidInput, Overloaded
from convserve.service.clock import Clock
from convserve.service.errors import for_path

COUNTED_METHODS = {"POST", "PUT", "PATCH"}
# A body still arriving SLOW_AFTER_S after its first bytes, at under SLOW_BYTES_PER_S on
# average, is a slow upload: from then on it needs one of the pending-body places. A rate, not
# a time alone: on a saturated server every body is read late, but then in large pieces.
SLOW_AFTER_S = 1.0
SLOW_BYTES_PER_S = 8 * 1024
# Bulk bodies (a piece of BULK_PIECE bytes or more just came) are read at most BULK_READERS at a
# time. Each read wakes its connection, and the event loop reads every woken connection's next
# ~256 KiB in one pass: 300 clients uploading 1.6 MB each at once made passes of ~100 ms, and
# probes waited behind them. The others wait with their connection paused, their bytes in the
# kernel's buffers. A reader holds its turn for one piece, at most BULK_TURN_S: a client that
# stops sending mid-body does not keep it.
BULK_PIECE = 64 * 1024
BULK_READERS = 8
BULK_TURN_S = 0.05
CLOSE = {"Connection": "close"}


class ClientGone(Exception):
    """The client disconnected before its request was complete: nobody to answer."""


class BodyRefused(Exception):
    """The body was refused. `close`: before it was read whole, so the connection must close;
    otherwise it was read (and dropped) to its end, and the connection can carry another."""

    def __init__(self, error: ConvserveError, *, close: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.close = close


@dataclass
class Admission:
    max_body_bytes: int
    max_in_flight: int
    max_held_bytes: int = 256 * 1024 * 1024
    max_pending_bodies: int = 64
    body_timeout_s: float = 10.0
    on_reject: Callable[[str], None] | None = None  # called with the error code
    clock: Clock = field(default_factory=Clock)  # body deadlines (and the routes' watches)
    in_flight: int = 0
    held_bytes: int = 0
    pending_bodies: int = 0
    _bulk: asyncio.Semaphore = field(
        init=False, repr=False, default_factory=lambda: asyncio.Semaphore(BULK_READERS)
    )

    async def _next_piece(self, receive: Receive, bulk: bool) -> Message:
        """The body's next ASGI message; after a bulk piece, in turn with the other bulk
        readers (`BULK_READERS`)."""
        if not bulk:
            return await receive()
        async with self._bulk:
            try:
                async with asyncio.timeout(BULK_TURN_S):
                    return await receive()
            except TimeoutError:
                pass  # the client paused: the turn goes to the next reader
        return await receive()

    def _reject(self, error: ConvserveError, *, close: bool = True) -> BodyRefused:
        if self.on_reject:
            self.on_reject(error.code)
        return BodyRefused(error, close=close)

    def _too_large(self) -> BodyRefused:
        message = f"the request body is over the limit of {self.max_body_bytes} bytes"
        return self._reject(InvalidInput("body_too_large", message))

    def _can_hold(self, nbytes: int) -> bool:
        if self.held_bytes + nbytes > self.max_held_bytes:
            return False
        self.held_bytes += nbytes
        return True

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, within the limits, its bytes held (give them back with `release`);
        `ClientGone` if the client hangs up first, `BodyRefused` if a limit refuses it.

        When the bytes-held bound refuses a body, the body is still read to its end and
        dropped, so the client gets its 503 on a sound connection (a client still sending
        when the server closes sees a reset, not the answer)."""
        declared = content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            raise self._too_large()
        held = 0
        full = False  # the bytes-held bound refused: read on, keep nothing
        if declared and self._can_hold(declared):
            held = declared
        elif declared:
            full = True
        chunks: list[bytes] = []
        size, started, slow = 0, 0.0, False
        deadline = self.clock.deadline(self.body_timeout_s)
        bulk = False
        try:
            while True:
                message = await self._next_piece(receive, bulk)
                chunk = _chunk(message)
                bulk = len(chunk) >= BULK_PIECE
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise self._too_large()
                if not full:
                    if size > held:
                        if self._can_hold(size - held):
                            held = size
                        else:
                            full = True
                            chunks.clear()
                    if not full:
                        chunks.append(chunk)
                if not message.get("more_body", False):
                    break
                if not started:
                    started = time.monotonic()
                elif not slow and _is_slow(size, time.monotonic() - started):
                    self._take_pending_place()
                    slow = True
        except asyncio.CancelledError:
            self.held_bytes -= held
            if not deadline.expired:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            message = f"the request body did not arrive within {self.body_timeout_s:g} s"
            raise self._reject(InvalidInput("body_timeout", message)) from None
        except BaseException:
            self.held_bytes -= held
            raise
        finally:
            self.clock.clear(deadline)
            if slow:
                self.pending_bodies -= 1
        if full:
            self.held_bytes -= held
            message = f"{self.held_bytes} bytes of request bodies are held; retry shortly"
            raise self._reject(Overloaded("busy", message), close=False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _take_pending_place(self) -> None:
        if self.pending_bodies >= self.max_pending_bodies:
            message = f"{self.pending_bodies} slow uploads are in progress; retry shortly"
            raise self._reject(Overloaded("too_many_uploads", message))
        self.pending_bodies += 1

    def release(self, body: bytes) -> None:
        self.held_bytes -= len(body)

    def enter(self) -> None:
        """Take an in-flight place, or raise 503 `busy`; pair with `leave`."""
        if self.in_flight >= self.max_in_flight:
            message = f"{self.in_flight} requests are in progress; retry shortly"
            if self.on_reject:
                self.on_reject("busy")
            raise Overloaded("busy", message)
        self.in_flight += 1

    def leave(self, body: bytes) -> None:
        """The request is answered: its place and its body's bytes are free again."""
        self.in_flight -= 1
        self.held_bytes -= len(body)

    async def admit(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The body, with an in-flight place taken (pair with `leave(body)`); or None when the
        request was refused (answered here) or its client hung up."""
        try:
            body = await self.read_body(scope, receive)
        except ClientGone:
            return None
        except BodyRefused as refused:
            await send_error(scope, send, refused.error, CLOSE if refused.close else None)
            return None
        try:
            self.enter()
        except ConvserveError as error:
            self.release(body)
            await send_error(scope, send, error)
            return None
        return body


def _is_slow(size: int, elapsed_s: float) -> bool:
    return elapsed_s > SLOW_AFTER_S and size < SLOW_BYTES_PER_S * elapsed_s


def _chunk(message: Message) -> bytes:
    if message["type"] == "http.disconnect":
        raise ClientGone
    return message.get("body", b"")


async def send_error(
    scope: Scope, send: Send, error: ConvserveError, headers: dict[str, str] | None = None
) -> None:
    """Answer with `error` in the wire format of the protocol the path belongs to."""
    wire = for_path(scope.get("path", ""), error)
    await send_bytes(send, wire.status, wire.body, {**wire.headers, **(headers or {})})


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
            admission.leave(body)


def content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
