"""Adaptive batching of images across requests, on BentoML's own CORK dispatcher.

BentoML's batchable API batches the raw arguments of its own HTTP endpoint, so decoding would
run inside the shared batch and one corrupt upload would fail its neighbours. Here each request
decodes its own images first, then submits an N x C x H x W array; the dispatcher counts rows,
so a request with 16 images takes 16 places in a batch (and is split across batches if need be).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence

import anyio.to_thread
import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher

from service.errors import ApiError


def _overloaded() -> np.ndarray:
    # The dispatcher calls this when a queued request can no longer meet max_latency_ms.
    raise ApiError(
        503, "overloaded", "the server is overloaded; retry shortly", headers={"Retry-After": "1"}
    )


class Batcher:
    """Contract: `await submit(x)` returns `infer(x')[rows of x]` for a batch x' holding x."""

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_latency_ms: int,
    ) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self._dispatcher: CorkDispatcher[np.ndarray, np.ndarray] = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=_overloaded,
            get_batch_size=lambda x: int(x.shape[0]),
            batch_dim=(0, 0),
        )
        self._call = self._dispatcher(self._run)

    async def _run(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # ONNX Runtime releases the GIL: inference runs off the event loop.
        out = await anyio.to_thread.run_sync(self._infer, batch)
        bounds = list(itertools.accumulate(len(p) for p in parts))
        return np.split(out, bounds[:-1])

    async def submit(self, x: np.ndarray) -> np.ndarray:
        return await self._call(x)

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
