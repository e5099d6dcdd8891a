"""Adaptive batching across requests, counted in images: convserve's own dynamic batcher.

Per model, a FIFO of jobs (one job = one request's N images: one array of N rows, or a tuple of
arrays of N rows each when a model takes several inputs):
- A batch forms as soon as the model is free, from whatever has queued, in arrival order, up
  to `max_batch_size` images. A job larger than the room left is split; its rows finish in
  later batches and its answer is put together in order.
- `max_queue_delay_ms` (Triton's `max_queue_delay_microseconds`): while a batch is not full and
  its oldest job has waited less than this, the batch is held back. 0 (the CPU default) never
  waits: on a CPU the next batch grows while the current one runs.
- One batch in flight per model, on the model's own inference thread (ONNX Runtime releases
  the GIL, so the event loop keeps parsing and decoding meanwhile).
- Jobs whose client has gone (cancelled) or whose deadline has passed never reach inference:
  they are dropped before a batch forms, and counted.

Admission, all answered at once: more than `max_queued_images` waiting or running -> 503
`queue_full`; a predicted finish past `max_latency_ms` (from a cost model of recent batches)
-> 503 `overloaded`; no answer within `timeout_s` -> 504 `deadline_exceeded`.
Contract: `await submit(x)` returns `infer(batch)[rows of x]`, rows in x's order (for a tuple
of outputs, the rows of each).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from convserve.errors import DeadlineExceeded, ErrorCode, Overloaded
from convserve.service.clock import Clock
from convserve.service.threads import yield_to_the_loop

log = logging.getLogger("convserve.batching")

Rows = np.ndarray | tuple[np.ndarray, ...]  # arrays sharing their first axis
Infer = Callable[[Rows], Rows]


def _count(x: Rows) -> int:
    return len(x[0]) if isinstance(x, tuple) else len(x)


def _slice(x: Rows, a: int, b: int) -> Rows:
    return tuple(part[a:b] for part in x) if isinstance(x, tuple) else x[a:b]


def _concat(pieces: list[Rows]) -> Rows:
    if isinstance(pieces[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*pieces, strict=True))
    return np.concatenate(pieces)


class BatchObserver(Protocol):
    def on_batch(self, images: int, queue_waits_s: Sequence[float], seconds: float) -> None: ...

    def on_dropped(self, images: int, reason: str) -> None: ...


def _reason(future: asyncio.Future[Rows]) -> str:
    """Why a settled job's remaining rows were dropped, for the metrics."""
    if future.cancelled():
        return "cancelled"  # its client went away
    return "expired" if isinstance(future.exception(), DeadlineExceeded) else "failed"


@dataclass(eq=False)
class _Job:
    x: Rows  # N rows (N x C x H x W images, and any inputs beside them)
    n: int
    future: asyncio.Future[Rows]
    enqueued: float
    taken: int = 0  # rows handed to batches so far
    done: int = 0  # rows answered so far
    out: list[np.ndarray] | None = None  # the answer's parts, only for a job split over batches

    @property
    def dead(self) -> bool:
        return self.future.done()  # cancelled, timed out or failed: nobody awaits its rows


@dataclass
class CostModel:
    """Seconds per batch of n images as a + b * n, fitted by least squares with exponential
    forgetting, so it follows the machine's current speed."""

    decay: float = 0.9
    _s: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0
    batches: int = 0

    def update(self, n: int, seconds: float) -> None:
        d = self.decay
        self._s = d * self._s + 1
        self._sx = d * self._sx + n
        self._sy = d * self._sy + seconds
        self._sxx = d * self._sxx + n * n
        self._sxy = d * self._sxy + n * seconds
        self.batches += 1

    def predict(self, n: int) -> float:
        if self.batches == 0 or n <= 0:
            return 0.0
        mean_x, mean_y = self._sx / self._s, self._sy / self._s
        var = self._sxx / self._s - mean_x * mean_x
        if var <= 1e-9:  # one batch size seen so far: time per image, no fixed part
            return mean_y / max(mean_x, 1.0) * n
        b = max(0.0, (self._sxy / self._s - mean_x * mean_y) / var)
        a = max(0.0, mean_y - b * mean_x)
        return a + b * n


@dataclass
class Batcher:
    infer: Infer
    max_batch_size: int
    max_latency_ms: int
    max_queue_delay_ms: float = 0.0
    max_queued_images: int | None = None
    timeout_s: float | None = None
    observer: BatchObserver | None = None
    name: str = "model"
    # The worker's request clock: deadlines checked on its tick, not a timer per request.
    clock: Clock | None = None
    cost: CostModel = field(default_factory=CostModel)
    pending_images: int = 0  # waiting or in flight
    queued_images: int = 0  # waiting
    _queue: deque[_Job] = field(default_factory=deque[_Job])
    _in_flight: int = 0  # images in the running batch (0: the model is free)
    _started: float = 0.0
    _timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=f"infer-{self.name}", initializer=yield_to_the_loop
        )

    # --- admission ---------------------------------------------------------------------------

    def predicted_wait(self, n: int) -> float:
        """Seconds until `n` more images would be answered: the running batch's remainder,
        then everything queued ahead in full batches, then their own."""
        running = max(
            0.0, self.cost.predict(self._in_flight) - (time.perf_counter() - self._started)
        )
        total = self.queued_images + n
        full, rest = divmod(total, self.max_batch_size)
        return running + full * self.cost.predict(self.max_batch_size) + self.cost.predict(rest)

    async def submit(self, x: Rows, *, shed: bool = True) -> Rows:
        """x: N rows (e.g. N x C x H x W) -> the model's N rows (e.g. N x classes). Domain
        errors as the module says. `shed=False` skips the latency prediction (warm-up
        requests, which exist to train it)."""
        n = _count(x)
        if self.max_queued_images is not None and self.pending_images + n > self.max_queued_images:
            raise Overloaded(
                ErrorCode.QUEUE_FULL,
                f"{self.pending_images} images are already queued; retry shortly",
            )
        if shed and self.cost.batches and self.predicted_wait(n) * 1000 > self.max_latency_ms:
            if self.observer:
                self.observer.on_dropped(n, "overloaded")
            raise Overloaded(ErrorCode.OVERLOADED, "the server is overloaded; retry shortly")
        future: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        job = _Job(x, n, future, time.perf_counter())
        job.future.add_done_callback(lambda _: self._release(job))
        self._queue.append(job)
        self.queued_images += n
        self.pending_images += n
        self._dispatch()
        if self.timeout_s is None:
            return await job.future
        # Past the deadline the job's future fails (and the job, if still queued, is dropped
        # before inference): on the worker's clock when it has one, else a timer of its own.
        if self.clock is not None:
            ticket = self.clock.later(self.timeout_s, lambda: self._expire(job))
            try:
                return await job.future
            finally:
                self.clock.clear(ticket)
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, job)
        try:
            return await job.future
        finally:
            timer.cancel()

    def _expire(self, job: _Job) -> None:
        if not job.future.done():
            job.future.set_exception(
                DeadlineExceeded(
                    f"inference did not finish within {self.timeout_s:g} s; retry later"
                )
            )

    def _release(self, job: _Job) -> None:
        """A job's future is settled: rows it never handed to a batch leave the queue's count.
        For a cancelled or timed-out job they will never reach inference."""
        untaken = job.n - job.taken
        if untaken:
            self.queued_images -= untaken
            self.pending_images -= untaken
            job.taken = job.n
            if self.observer:
                self.observer.on_dropped(untaken, _reason(job.future))

    # --- batches -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Form and start the next batch if the model is free (runs on the event loop)."""
        if self._in_flight:
            return
        while self._queue and self._queue[0].dead:
            self._queue.popleft()
        if not self._queue:
            return
        now = time.perf_counter()
        if self.max_queue_delay_ms > 0 and self.queued_images < self.max_batch_size:
            if self._timer is not None:
                return  # already holding for the oldest job
            hold = self._queue[0].enqueued + self.max_queue_delay_ms / 1000 - now
            if hold > 0:
                self._timer = asyncio.get_running_loop().call_later(hold, self._held)
                return
        if self._timer is not None:  # the batch filled up before the delay ran out
            self._timer.cancel()
            self._timer = None
        parts: list[tuple[_Job, int, int]] = []  # (job, first row, end row)
        room = self.max_batch_size
        while self._queue and room:
            job = self._queue[0]
            if job.dead:
                self._queue.popleft()
                continue
            take = min(room, job.n - job.taken)
            parts.append((job, job.taken, job.taken + take))
            job.taken += take
            room -= take
            if job.taken == job.n:
                self._queue.popleft()
        images = self.max_batch_size - room
        self.queued_images -= images
        if len(parts) == 1:
            job, a, b = parts[0]
            batch = job.x if (a, b) == (0, job.n) else _slice(job.x, a, b)
        else:
            batch = _concat([_slice(job.x, a, b) for job, a, b in parts])  # images rows
        self._in_flight, self._started = images, now
        waits = [now - job.enqueued for job, _, _ in parts]
        future = asyncio.get_running_loop().run_in_executor(self._executor, self.infer, batch)
        future.add_done_callback(lambda f: self._finished(f, parts, images, waits))

    def _held(self) -> None:
        self._timer = None
        self._dispatch()

    def _finished(
        self,
        future: asyncio.Future[Rows],
        parts: list[tuple[_Job, int, int]],
        images: int,
        waits: list[float],
    ) -> None:
        seconds = time.perf_counter() - self._started
        self._in_flight = 0
        self.pending_images -= images
        try:
            error = future.exception() if not future.cancelled() else asyncio.CancelledError()
            if error is None:
                self.cost.update(images, seconds)
                self._deliver(future.result(), parts)
                if self.observer:
                    self.observer.on_batch(images, waits, seconds)
        except Exception as exc:
            log.exception("batch of %d images for %s failed", images, self.name)
            error = exc
        if error is not None:
            for job, _, _ in parts:
                if not job.future.done():
                    job.future.set_exception(error)
        self._dispatch()

    @staticmethod
    def _deliver(out: Rows, parts: list[tuple[_Job, int, int]]) -> None:
        """out: the batch's rows (one array, or a tuple of arrays), in the order of `parts`."""
        offset = 0
        for job, a, b in parts:
            rows = _slice(out, offset, offset + (b - a))
            offset += b - a
            if job.future.done():
                continue
            if a == 0 and b == job.n:  # the whole job in this batch: the usual case
                job.future.set_result(rows)
                continue
            pieces = rows if isinstance(rows, tuple) else (rows,)
            if job.out is None:
                job.out = [np.empty((job.n, *p.shape[1:]), p.dtype) for p in pieces]
            for whole, piece in zip(job.out, pieces, strict=True):
                whole[a:b] = piece
            job.done += b - a
            if job.done == job.n:
                job.future.set_result(tuple(job.out) if isinstance(out, tuple) else job.out[0])

    # --- lifecycle ---------------------------------------------------------------------------

    async def warm_up(self, example: Rows, requests: int = 12) -> None:
        """Requests of our own before users': the cost model learns batch times (one at a
        time, then concurrent ones, so it sees batches larger than one)."""
        for _ in range(requests):
            await self.submit(example, shed=False)
        await asyncio.gather(*(self.submit(example, shed=False) for _ in range(requests)))

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
