"""Drain on SIGTERM, the way a load balancer or Kubernetes needs it.

SIGTERM turns `/readyz` to 503 at once, so the balancer stops sending, while the server keeps
answering everything that still arrives for `drain_s` (clients that have not yet seen the
change). Then the server's own shutdown runs: it stops listening, lets in-flight requests
finish, and the process exits 0. A second SIGTERM skips the rest of the drain. SIGINT (Ctrl-C
at a terminal) is left alone: it stops at once, as it always has.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

log = logging.getLogger("convserve.drain")


class Drain:
    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.draining = False

    def install(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Put the drain in front of the server's SIGTERM handler (uvicorn's, which stops the
        server). Call on the event loop's thread, after the server installed its handlers.
        False (nothing done) where there is no Python handler to defer to."""
        stop = signal.getsignal(signal.SIGTERM)
        if not callable(stop):
            return False

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if self.draining or self.period_s == 0:
                self.draining = True
                stop(signum, frame)
                return
            self.draining = True
            log.info("SIGTERM: /readyz now 503; serving %g s more, then stopping", self.period_s)
            # A signal handler runs between two bytecodes of whatever was running: only hand
            # the stop to the loop from here.
            loop.call_soon_threadsafe(loop.call_later, self.period_s, stop, signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        return True
