"""One clock for the deadlines and connection watches of every request in a worker.

A timer per request (`asyncio.timeout`, `call_later`) costs microseconds on the hot path, and a
watching task more. Instead, each request registers a `Ticket` (a set insertion), and every
`tick_s` the clock looks at the tickets it holds:

- a deadline that has passed (a body still arriving after `CONVSERVE_BODY_TIMEOUT_S`): the
  request's task is cancelled with `Ticket.expired` set, and the reader answers 408;
- a request that has waited a tick for its answer: a task starts watching its connection, and
  when the client hangs up the request's task is cancelled with `Ticket.gone` set, so its
  images never reach ONNX Runtime. A request answered within a tick never costs a task; one
  still waiting is queued behind others, which is when dropping its work pays;
- a callback whose time has come (`later`): the batcher's inference deadlines, which would
  otherwise cost a timer per request.

Precision is one tick (0.1 s). `on_tick` runs on every tick too: the service samples its
gauges there instead of on every request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive

TICK_S = 0.1


@dataclass(eq=False, slots=True)
class Ticket:
    task: asyncio.Task[Any] | None
    due: float  # time.monotonic(): the deadline, or when watching starts
    receive: Receive | None = None  # a watch: the request's ASGI receive
    expired: bool = False
    gone: bool = False
    watcher: asyncio.Task[None] | None = None
    callback: Callable[[], None] | None = None  # `later`: what to call when due


class Clock:
    def __init__(self, tick_s: float = TICK_S, on_tick: Callable[[], None] | None = None) -> None:
        self.tick_s = tick_s
        self.on_tick = on_tick
        self._deadlines: set[Ticket] = set()
        self._watches: set[Ticket] = set()
        self._callbacks: set[Ticket] = set()
        self._ticker: asyncio.Task[None] | None = None

    def _ensure_running(self) -> None:
        # Started by the first request on whichever loop serves it (a test may run several).
        ticker = self._ticker
        if ticker is None or ticker.done() or ticker.get_loop() is not asyncio.get_running_loop():
            self._ticker = asyncio.get_running_loop().create_task(self._run())

    def deadline(self, seconds: float) -> Ticket:
        """The current task is cancelled, `expired` set, `seconds` from now (+ up to a tick),
        unless `clear` comes first."""
        self._ensure_running()
        ticket = Ticket(asyncio.current_task(), time.monotonic() + seconds)
        self._deadlines.add(ticket)
        return ticket

    def watch(self, receive: Receive) -> Ticket:
        """From a tick on, the current task is cancelled, `gone` set, if its client hangs up,
        unless `clear` comes first."""
        self._ensure_running()
        ticket = Ticket(asyncio.current_task(), time.monotonic() + self.tick_s, receive)
        self._watches.add(ticket)
        return ticket

    def later(self, seconds: float, callback: Callable[[], None]) -> Ticket:
        """`callback()` on the loop `seconds` from now (+ up to a tick), unless `clear` comes
        first."""
        self._ensure_running()
        ticket = Ticket(None, time.monotonic() + seconds, callback=callback)
        self._callbacks.add(ticket)
        return ticket

    def clear(self, ticket: Ticket | None) -> None:
        if ticket is None:  # nothing was watched
            return
        self._deadlines.discard(ticket)
        self._watches.discard(ticket)
        self._callbacks.discard(ticket)
        if ticket.watcher is not None:
            ticket.watcher.cancel()
            ticket.watcher = None

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self._deadlines if t.due <= now]:
            self._deadlines.discard(ticket)
            ticket.expired = True
            if ticket.task is not None:
                ticket.task.cancel()
        for ticket in self._watches:
            if ticket.watcher is None and ticket.due <= now:
                ticket.watcher = asyncio.ensure_future(self._watch(ticket))
        for ticket in [t for t in self._callbacks if t.due <= now]:
            self._callbacks.discard(ticket)
            assert ticket.callback is not None
            ticket.callback()
        if self.on_tick is not None:
            self.on_tick()

    async def _watch(self, ticket: Ticket) -> None:
        assert ticket.receive is not None
        message = await ticket.receive()
        if message["type"] == "http.disconnect" and ticket in self._watches:
            self._watches.discard(ticket)
            ticket.gone = True
            if ticket.task is not None:
                ticket.task.cancel()
