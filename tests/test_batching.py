"""The dynamic batcher on its own: order, split and merged requests, cancellation, deadlines,
fairness, the queue delay and latency shedding. The model is a recording stand-in, so each
behaviour can be forced (ONNX Runtime itself runs in every other tier)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from convserve.errors import DeadlineExceeded, Overloaded
from convserve.service.batching import Batcher, CostModel


class Model:
    """'Inference' answers each image with its own value; every batch is recorded."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append([int(v) for v in x[:, 0, 0, 0]])
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        return np.repeat(x[:, 0, 0, :1], 3, axis=1)  # N x 3, every column the image's value

    @property
    def seen(self) -> list[int]:
        return [v for batch in self.batches for v in batch]


class Observer:
    def __init__(self) -> None:
        self.dropped: list[tuple[int, str]] = []
        self.batches: list[int] = []

    def on_batch(self, images, queue_waits_s, seconds) -> None:
        self.batches.append(images)

    def on_dropped(self, images, reason) -> None:
        self.dropped.append((images, reason))


def images(start: int, n: int) -> np.ndarray:
    """N x 1 x 2 x 2; image i holds the value i."""
    return np.arange(start, start + n, dtype=np.float32)[:, None, None, None] * np.ones(
        (1, 1, 2, 2), np.float32
    )


def batcher(model: Model, **kw) -> Batcher:
    return Batcher(model, **{"max_batch_size": 8, "max_latency_ms": 60_000, **kw})


def answers(out: np.ndarray) -> list[int]:
    return [int(v) for v in out[:, 0]]


def test_a_batch_forms_at_once_in_arrival_order_on_the_inference_thread():
    model = Model(delay_s=0.05)
    b = batcher(model, name="m")

    async def main():
        first = asyncio.ensure_future(b.submit(images(0, 1)))
        await asyncio.sleep(0.01)  # the model is now busy with the first request
        rest = [asyncio.ensure_future(b.submit(images(10 * i, 2))) for i in range(1, 4)]
        outs = await asyncio.gather(first, *rest)
        return [answers(o) for o in outs]

    t0 = time.perf_counter()
    outs = asyncio.run(main())
    assert outs == [[0], [10, 11], [20, 21], [30, 31]]
    # The first request did not wait for company; the three queued behind it went together.
    assert model.batches == [[0], [10, 11, 20, 21, 30, 31]]
    assert time.perf_counter() - t0 < 0.5
    assert model.threads == {"infer-m_0"}


def test_an_oversize_request_is_split_and_put_back_together_in_order():
    model = Model(delay_s=0.01)
    b = batcher(model)

    async def main():
        big = asyncio.ensure_future(b.submit(images(100, 20)))
        small = asyncio.ensure_future(b.submit(images(0, 3)))
        return answers(await big), answers(await small)

    big, small = asyncio.run(main())
    assert big == list(range(100, 120)) and small == [0, 1, 2]
    assert [len(batch) for batch in model.batches] == [8, 8, 7]  # the last: 4 of big + small
    assert model.batches[2] == [116, 117, 118, 119, 0, 1, 2]
    assert b.pending_images == 0 and b.queued_images == 0


def test_a_cancelled_request_never_reaches_inference():
    model = Model(delay_s=0.1)
    observer = Observer()
    b = batcher(model, observer=observer)

    async def main():
        running = asyncio.ensure_future(b.submit(images(0, 1)))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(b.submit(images(50, 4)))  # queued behind the first
        kept = asyncio.ensure_future(b.submit(images(60, 1)))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client hung up
        assert answers(await running) == [0] and answers(await kept) == [60]
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(main())
    assert not set(model.seen) & {50, 51, 52, 53}
    assert observer.dropped == [(4, "cancelled")]
    assert b.pending_images == 0 and b.queued_images == 0


def test_a_request_past_its_deadline_is_504_and_dropped_before_inference():
    model = Model(delay_s=0.3)
    observer = Observer()
    b = batcher(model, timeout_s=0.1, observer=observer)

    async def main():
        first = asyncio.ensure_future(b.submit(images(0, 1)))
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            await b.submit(images(7, 1))  # waits behind a 0.3 s batch
        assert time.perf_counter() - t0 < 0.25
        with pytest.raises(DeadlineExceeded):
            await first  # the running batch itself outlived the deadline too
        await asyncio.sleep(0.35)  # the slow batch finishes; nothing else may run

    asyncio.run(main())
    assert model.seen == [0]
    assert (1, "expired") in observer.dropped
    assert b.pending_images == 0


def test_no_request_starves_behind_a_stream_of_others():
    """A 64-image request arriving behind others, with 1-image requests arriving all along:
    everything that arrived after it waits for it (FIFO by images), so it is answered within
    the batches its own size needs, however long the stream."""
    model = Model(delay_s=0.005)
    b = batcher(model)
    finished: dict[str, int] = {}

    async def stream():
        tasks = []
        for i in range(200):
            tasks.append(asyncio.ensure_future(b.submit(images(1000 + i, 1))))
            if i == 5:
                big = asyncio.ensure_future(b.submit(images(0, 64)))
                big.add_done_callback(lambda _: finished.setdefault("big", len(model.batches)))
                tasks.append(big)
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)

    asyncio.run(stream())
    # 6 small ones ahead (at most one batch each while the model was free), then 64 images:
    # 8 full batches.
    assert finished["big"] <= 6 + 8
    order = model.seen
    last_big = max(i for i, v in enumerate(order) if v < 1000)
    assert all(v < 1006 for v in order[:last_big] if v >= 1000)


def test_queue_delay_holds_a_batch_that_is_not_full():
    model = Model()
    b = batcher(model, max_queue_delay_ms=60)

    async def main():
        outs = []
        for i in range(3):
            outs.append(asyncio.ensure_future(b.submit(images(i, 1))))
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        await asyncio.gather(*outs)
        return time.perf_counter() - t0

    waited = asyncio.run(main())
    assert model.batches == [[0, 1, 2]]  # held back for company, then run together
    assert 0.03 < waited < 0.5


def test_a_full_batch_does_not_wait_for_the_queue_delay():
    model = Model()
    b = batcher(model, max_queue_delay_ms=5_000)

    async def main():
        t0 = time.perf_counter()
        await asyncio.gather(*(b.submit(images(i, 1)) for i in range(8)))
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 1.0
    assert model.batches == [list(range(8))]


def test_queue_limit_and_latency_budget_refuse_at_once():
    model = Model(delay_s=0.05)
    b = batcher(model, max_batch_size=2, max_queued_images=10, max_latency_ms=120)

    async def main():
        await b.warm_up(images(0, 1), 3)  # the cost model: about 50 ms a batch, any size
        running = [asyncio.ensure_future(b.submit(images(i, 1))) for i in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as full:
            await b.submit(images(9, 8))  # 3 + 8 images: more than 10
        assert full.value.code == "queue_full"
        with pytest.raises(Overloaded) as late:
            await b.submit(images(9, 1))  # 40 ms left + 2 batches ahead: 140 ms > 120
        assert late.value.code == "overloaded"
        assert [answers(o) for o in await asyncio.gather(*running)] == [[0], [1], [2]]

    asyncio.run(main())


def test_cost_model_learns_a_fixed_and_a_per_image_part():
    cost = CostModel()
    for n in (1, 8, 32, 4, 64, 16) * 3:
        cost.update(n, 0.002 + 0.0005 * n)
    assert cost.predict(100) == pytest.approx(0.052, rel=1e-6)
    assert cost.predict(1) == pytest.approx(0.0025, rel=1e-6)
