"""The service's worker threads yield the CPU to the event loop.

Decode and inference threads run a few nice levels below the loop's thread: when large uploads
or big batches keep every core busy, the loop (probes, admission, answers) still gets the CPU
first. Decode and inference share one level, so neither starves the other: a batch grows while
the previous one runs only if the next requests' images are decoded meanwhile. Linux schedules
threads on their own; elsewhere this is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import threading

NICENESS = 5


def yield_to_the_loop() -> None:
    """A thread pool's initializer: this thread runs `NICENESS` levels below the loop."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
