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

The server's front door (`server.py`) admits every operation that takes a body, and renders a
refusal in the operation's protocol; nothing here knows a wire format. Probes (/livez, /readyz)
and /metrics are outside it, so they stay cheap and answer while inference is saturated.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from starlette.types import Message, Receive, Scope

from convserve.errors import ConvserveError, ErrorCode, InvalidInput, Overloaded
from convserve.service.clock import Clock

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
        return BodyRefused(error, close=close)

    def _too_large(self) -> BodyRefused:
        message = f"the request body is over the limit of {self.max_body_bytes} bytes"
        return self._reject(InvalidInput(ErrorCode.BODY_TOO_LARGE, message))

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
            current = asyncio.current_task()
            assert current is not None  # a request is a task
            current.uncancel()
            message = f"the request body did not arrive within {self.body_timeout_s:g} s"
            raise self._reject(InvalidInput(ErrorCode.BODY_TIMEOUT, message)) from None
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
            raise self._reject(Overloaded(ErrorCode.BUSY, message), close=False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _take_pending_place(self) -> None:
        if self.pending_bodies >= self.max_pending_bodies:
            message = f"{self.pending_bodies} slow uploads are in progress; retry shortly"
            raise self._reject(Overloaded(ErrorCode.TOO_MANY_UPLOADS, message))
        self.pending_bodies += 1

    def release(self, body: bytes) -> None:
        self.held_bytes -= len(body)

    def enter(self) -> None:
        """Take an in-flight place, or raise 503 `busy`; pair with `leave`."""
        if self.in_flight >= self.max_in_flight:
            message = f"{self.in_flight} requests are in progress; retry shortly"
            raise Overloaded(ErrorCode.BUSY, message)
        self.in_flight += 1

    def leave(self, body: bytes) -> None:
        """The request is answered: its place and its body's bytes are free again."""
        self.in_flight -= 1
        self.held_bytes -= len(body)

    def admit_message(self, nbytes: int) -> None:
        """A message already received whole (gRPC reads it, within `max_body_bytes`, before
        the call starts): its bytes held and an in-flight place taken, or `Overloaded`
        (503 `busy`); pair with `leave_message(nbytes)`."""
        if not self._can_hold(nbytes):
            message = f"{self.held_bytes} bytes of requests are held; retry shortly"
            raise Overloaded(ErrorCode.BUSY, message)
        try:
            self.enter()
        except ConvserveError:
            self.held_bytes -= nbytes
            raise

    def leave_message(self, nbytes: int) -> None:
        self.in_flight -= 1
        self.held_bytes -= nbytes

    async def admit(self, scope: Scope, receive: Receive) -> bytes:
        """The body, with an in-flight place taken (pair with `leave(body)`). `ClientGone` when
        its client hung up, `BodyRefused` when a body limit refused it (`close`: the connection
        must close), `Overloaded` when no place is free."""
        body = await self.read_body(scope, receive)
        try:
            self.enter()
        except ConvserveError:
            self.release(body)
            raise
        return body


def _is_slow(size: int, elapsed_s: float) -> bool:
    return elapsed_s > SLOW_AFTER_S and size < SLOW_BYTES_PER_S * elapsed_s


def _chunk(message: Message) -> bytes:
    if message["type"] == "http.disconnect":
        raise ClientGone
    return message.get("body", b"")


def content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
