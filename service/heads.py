"""Request heads that cannot starve a worker.

uvicorn waits for a request's head (its request line and headers) without a deadline, and an
ASGI app sees nothing before the head is complete, so connections that send a head a byte at a
time hold a file descriptor each for as long as they like: 24,000 of them (past the 20,000 a
process may open) left no normal request answered. nginx closes such heads after
`client_header_timeout`, HAProxy after `timeout http-request`.

Here a connection still sending its head is closed, with a 408, when the head is not complete
within CONVSERVE_HEADER_TIMEOUT_S of its first byte (or of the connection, for the first
request); and at most CONVSERVE_MAX_PENDING_HEADS connections may be sending a head at once:
past that, the oldest of them is closed first. A complete head costs nothing more than a
dictionary entry and a timer while it arrives.

The worker's uvicorn takes its HTTP protocol class from uvicorn's own protocol table, which the
service fills in when it loads (`install`), before BentoML's worker builds its uvicorn
configuration: the class is uvicorn's httptools protocol with the head deadline added.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from convserve.errors import ErrorCode
from convserve.service.metrics import service_metrics

log = logging.getLogger("convserve.heads")
_BODY = (
    b'{"error": {"code": "%s", "message": "the request head did not arrive in time"}}'
    % ErrorCode.HEADER_TIMEOUT.value.encode()
)
TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class Heads:
    """The connections of this worker still sending a request head, oldest first."""

    def __init__(self, timeout_s: float, most: int) -> None:
        self.timeout_s, self.most = timeout_s, most
        self.pending: dict[GuardedHttpTools, asyncio.TimerHandle] = {}

    def start(self, connection: GuardedHttpTools) -> None:
        if connection in self.pending:
            return
        while len(self.pending) >= self.most:
            oldest = next(iter(self.pending))
            self.expire(oldest)
        self.pending[connection] = connection.loop.call_later(
            self.timeout_s, self.expire, connection
        )

    def done(self, connection: GuardedHttpTools) -> None:
        timer = self.pending.pop(connection, None)
        if timer is not None:
            timer.cancel()

    def expire(self, connection: GuardedHttpTools) -> None:
        self.done(connection)
        service_metrics().heads_closed.inc()
        transport = connection.transport
        if not transport.is_closing():
            transport.write(TIMED_OUT)
            transport.close()


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, its request heads under `heads`' deadline and cap."""

    heads: Heads = Heads(timeout_s=30.0, most=1000)  # set by `install`

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.heads.start(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.heads.start(self)  # the next request of a kept-alive connection

    def on_headers_complete(self) -> None:
        self.heads.done(self)
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.heads.done(self)
        super().connection_lost(exc)


def install(timeout_s: float, most: int) -> None:
    """Make this process's uvicorn serve HTTP with `GuardedHttpTools` (its "auto" and
    "httptools" choices), heads closed past `timeout_s` and at most `most` pending."""
    GuardedHttpTools.heads = Heads(timeout_s, most)
    path = f"{__name__}:{GuardedHttpTools.__name__}"
    uvicorn.config.HTTP_PROTOCOLS["auto"] = path
    uvicorn.config.HTTP_PROTOCOLS["httptools"] = path
