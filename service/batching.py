"""Adaptive batching of images across requests, on BentoML's own CORK dispatcher.

BentoML's batchable API batches the raw arguments of its own HTTP endpoint, so decoding would
run inside the shared batch and one corrupt upload would fail its neighbours. Here each request
decodes its own images first, then submits an N x C x H x W array; the dispatcher counts rows,
so a request with 16 images takes 16 places in a batch (and is split across batches if need be).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio.to_thread
import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher

from service.errors import ApiError

RETRY_AFTER = {"Retry-After": "1"}


def _overloaded() -> np.ndarray:
    # The dispatcher calls this when a queued request can no longer meet max_latency_ms.
    raise ApiError(503, "overloaded", "the server is overloaded; retry shortly", RETRY_AFTER)


def _consume(task: asyncio.Future) -> None:
    # Retrieve an abandoned task's outcome so asyncio does not log it as never retrieved.
    if not task.cancelled():
        task.exception()


class BatchObserver(Protocol):
    def on_batch(self, images: int, queue_waits_s: Sequence[float]) -> None: ...


class _Stamped(np.ndarray):
    """An array that remembers when it was queued; slices (split requests) keep the stamp."""

    enqueued_at: float

    def __array_finalize__(self, obj: object) -> None:
        self.enqueued_at = getattr(obj, "enqueued_at", time.perf_counter())


class Batcher:
    """Contract: `await submit(x)` returns `infer(x')[rows of x]` for a batch x' holding x.

    Admission is bounded: at most `max_queued_images` images wait or run at once (503
    `queue_full` beyond), and a request older than `timeout_s` fails with 504.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_latency_ms: int,
        max_queued_images: int | None = None,
        timeout_s: float | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.max_queued_images = max_queued_images
        self.timeout_s = timeout_s
        self._observer = observer
        self.pending_images = 0
        self._dispatcher: CorkDispatcher[np.ndarray, np.ndarray] = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=_overloaded,
            get_batch_size=lambda x: int(x.shape[0]),
            batch_dim=(0, 0),
        )
        self._call = self._dispatcher(self._run)

    async def _run(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._observer is not None:
            now = time.perf_counter()
            waits = [now - getattr(p, "enqueued_at", now) for p in parts]
            self._observer.on_batch(sum(len(p) for p in parts), waits)
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        batch = batch.view(np.ndarray)
        # ONNX Runtime releases the GIL: inference runs off the event loop.
        out = await anyio.to_thread.run_sync(self._infer, batch)
        bounds = list(itertools.accumulate(len(p) for p in parts))
        return np.split(out, bounds[:-1])

    async def submit(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if self.max_queued_images is not None and self.pending_images + n > self.max_queued_images:
            raise ApiError(
                503,
                "queue_full",
                f"{self.pending_images} images are already queued; retry shortly",
                RETRY_AFTER,
            )
        self.pending_images += n
        try:
            return await self._submit(x)
        finally:
            self.pending_images -= n

    async def _submit(self, x: np.ndarray) -> np.ndarray:
        stamped = x.view(_Stamped)
        stamped.enqueued_at = time.perf_counter()
        task = asyncio.ensure_future(self._call(stamped))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        except asyncio.CancelledError:  # the client went away: free its place in the queue
            task.cancel()
            raise
        if not done:
            task.cancel()  # the dispatcher answers a cancelled job with its fallback error
            task.add_done_callback(_consume)
            raise ApiError(
                504,
                "deadline_exceeded",
                f"inference did not finish within {self.timeout_s:g} s; retry later",
                RETRY_AFTER,
            )
        return task.result()

    async def warm_up(self, example: np.ndarray, requests: int = 12) -> None:
        """Run the dispatcher's latency-model training on our own requests, not users'.

        Until it has timed a few batches the CORK dispatcher releases one request at a time and
        sheds queued ones, which is where BentoML's 503s under a cold burst come from.
        """
        for _ in range(requests):
            await self.submit(example)
        # Concurrent ones too, so the model has seen batches larger than one.
        await asyncio.gather(*(self.submit(example) for _ in range(requests)))

    def shutdown(self) -> None:
        self._dispatcher.shutdown()
