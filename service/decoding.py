"""Encoded images -> a model's inputs, for every protocol and task: how many a request may
send, the limits on their pixels, and where the work runs (inline, or on the decode threads).

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

from convserve.errors import ErrorCode, InvalidInput
from convserve.preprocess import Batch, ImageLimits, decode_batch, decoded_size, open_image
from convserve.service.settings import ServiceSettings
from convserve.service.threads import yield_to_the_loop
from convserve.spec import InputSpec

Upload = tuple[str | None, bytes]  # (filename, encoded image)
T = TypeVar("T")


# Decoding this many pixels takes about 0.2 ms (a 28 px PNG: ~0.03 ms): less than a thread hop
# and its wake-up under load, so it runs inline.
INLINE_PIXELS = 4096
# A request body this large is read on the loop but taken apart (the server's `read`) and its
# images' headers read on a decode thread: splitting its parts and reading every image's
# header cost ~0.1 ms an image, so 64-image requests arriving together kept the loop busy for
# whole seconds in one pass, and probes and small requests waited behind them (p99 of /livez
# 140-260 ms in a 300-client burst).
INLINE_BYTES = 16 * 1024


@dataclass
class Decoder:
    settings: ServiceSettings
    limits: ImageLimits
    threads: ThreadPoolExecutor  # the decode threads, apart from inference and BentoML's own

    @classmethod
    def create(cls, settings: ServiceSettings) -> Decoder:
        limits = ImageLimits(
            max_pixels=settings.max_image_pixels,
            min_side=settings.min_image_side,
            max_aspect_ratio=settings.max_aspect_ratio,
            max_declared_pixels=settings.max_reduced_image_pixels,
        )
        threads = ThreadPoolExecutor(
            settings.decode_threads, "decode", initializer=yield_to_the_loop
        )
        return cls(settings, limits, threads)

    async def _on_a_decode_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.threads, work)

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

    async def decode(self, spec: InputSpec, images: list[Upload]) -> Batch:
        """Encoded images -> the inputs of a model of this recipe (and where each upload landed
        in its input), or the first image's error.

        Headers are read first (every limit is checked there), then the pixels decoded. Small
        requests are done inline: a thread hop costs more than a few small images. Requests
        with many or large images go to the decode threads whole, off the event loop, so probes
        and other requests flow."""
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
                ErrorCode.TOO_MANY_PIXELS,
                f"the images decode to {pixels} pixels together; at most "
                f"{self.settings.max_request_pixels} per request",
            )
        return opened, pixels

    def shutdown(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
