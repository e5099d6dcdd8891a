"""The request path every protocol and task shares: which model, how many images, decoding,
the batcher.

Each request decodes its own images before it joins a batch, so one bad upload fails only its
own request, never another client's. Errors are domain errors; each protocol renders them.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image
from starlette.requests import Request

from convserve.errors import InvalidInput
from convserve.preprocess import Batch, ImageLimits, decode_batch, decoded_size, open_image
from convserve.service.pool import ModelPool, ServedModel
from convserve.service.settings import ServiceSettings
from convserve.service.task import Rows
from convserve.service.threads import yield_to_the_loop
from convserve.spec import InputSpec

Upload = tuple[str | None, bytes]  # (filename, encoded image)
T = TypeVar("T")


# Decoding this many pixels takes about 0.2 ms (a 28 px PNG: ~0.03 ms): less than a thread hop
# and its wake-up under load, so it runs inline.
INLINE_PIXELS = 4096
# A request body this large is read on the loop but taken apart on a decode thread: splitting
# its parts and reading every image's header cost ~0.1 ms an image, so 64-image requests
# arriving together kept the loop busy for whole seconds in one pass, and probes and small
# requests waited behind them (p99 of /livez 140-260 ms in a 300-client burst).
INLINE_BYTES = 16 * 1024


@dataclass
class Inference:
    settings: ServiceSettings
    pool: ModelPool
    limits: ImageLimits
    decoder: ThreadPoolExecutor  # the decode threads, apart from inference and BentoML's own

    @classmethod
    def create(cls, settings: ServiceSettings, pool: ModelPool) -> Inference:
        limits = ImageLimits(
            max_pixels=settings.max_image_pixels,
            min_side=settings.min_image_side,
            max_aspect_ratio=settings.max_aspect_ratio,
            max_declared_pixels=settings.max_reduced_image_pixels,
        )
        threads = settings.decode_threads
        decoder = ThreadPoolExecutor(threads, "decode", initializer=yield_to_the_loop)
        return cls(settings, pool, limits, decoder)

    def resolve(self, model: str | None, version: str | None, task: str | None) -> ServedModel:
        """The served model a request names; without a name, the first served of `task`."""
        return self.pool.get(model, version, task)

    async def off_loop(self, size: int, work: Callable[[], T]) -> T:
        """`work()` inline when its request is `size` bytes or fewer, else on a decode thread:
        the loop's turn stays short however many large requests arrive at once."""
        if size <= INLINE_BYTES:
            return work()
        return await self._on_a_decode_thread(work)

    async def _on_a_decode_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.decoder, work)

    def check_count(self, n: int) -> None:
        if n > self.settings.max_images_per_request:
            raise InvalidInput(
                "too_many_images",
                f"{n} images sent; at most {self.settings.max_images_per_request} per request",
            )
        if n == 0:
            raise InvalidInput("invalid_request", "images: at least one image is required")

    def _open(self, images: list[Upload], spec: InputSpec) -> list[tuple[str, Image.Image]]:
        """Every image opened (headers read, limits checked on the size each is decoded at for
        `spec`); on the first refusal, the ones already opened are closed."""
        opened: list[tuple[str, Image.Image]] = []
        try:
            for i, (filename, data) in enumerate(images):
                name = f"image {i + 1}" + (f" ({filename})" if filename else "")
                opened.append((name, open_image(data, self.limits, name=name, spec=spec)))
        except BaseException:
            for _, img in opened:
                img.close()
            raise
        return opened

    async def decode(self, served: ServedModel, images: list[Upload]) -> Batch:
        """Encoded images -> `served`'s inputs (and where each upload landed in its input), or
        the first image's error.

        Headers are read first (every limit is checked there), then the pixels decoded. Small
        requests are done inline: a thread hop costs more than a few small images. Requests
        with many or large images go to the decode threads whole, off the event loop, so probes
        and other requests flow."""
        spec = served.spec.input
        if sum(len(data) for _, data in images) > INLINE_BYTES:  # headers too: one hop
            return await self._on_a_decode_thread(
                lambda: decode_batch(self._checked(images, spec)[0], spec)
            )
        opened, pixels = self._checked(images, spec)
        if pixels <= INLINE_PIXELS:
            return decode_batch(opened, spec)
        return await self._on_a_decode_thread(lambda: decode_batch(opened, spec))

    def _checked(
        self, images: list[Upload], spec: InputSpec
    ) -> tuple[list[tuple[str, Image.Image]], int]:
        """Every image opened and within the request's pixel limit (else all closed), and
        the pixels they are decoded at together."""
        opened = self._open(images, spec)
        pixels = sum(math.prod(decoded_size(img, spec)) for _, img in opened)
        if pixels > self.settings.max_request_pixels:
            for _, img in opened:
                img.close()
            raise InvalidInput(
                "too_many_pixels",
                f"the images decode to {pixels} pixels together; at most "
                f"{self.settings.max_request_pixels} per request",
            )
        return opened, pixels

    async def run(self, served: ServedModel, inputs: Rows) -> Rows:
        """N rows of `served`'s inputs -> its task runner's N rows, through its batcher."""
        return await served.batcher.submit(inputs)


def current(request: Request) -> Inference:
    """The worker's Inference, put on the app's state when the service starts."""
    return request.app.state.inference
