"""Locust load test of POST /classify with real Fashion-MNIST test images as PNG.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 --headless -u 64 -r 64 -t 30s

Payloads are encoded once at start. Every response is checked, not only its status: a body
that is not one well-formed result per image, with the right labels, counts as a failure.
"""

from __future__ import annotations

import io
import random

from locust import FastHttpUser, constant, task
from PIL import Image

from models.data import load_fashion_mnist
from models.spec import FASHION_MNIST_LABELS

PAYLOADS = 512


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


_test = load_fashion_mnist("test")
IMAGES: list[bytes] = [_png(img) for img in _test.images[:PAYLOADS]]


def check(body: dict, images: int) -> str | None:
    """Why `body` is not a valid answer for `images` images, or None if it is."""
    results = body.get("results")
    if not isinstance(results, list) or len(results) != images:
        return f"expected {images} results"
    for result in results:
        predictions = result.get("predictions") or []
        if not predictions:
            return "no predictions"
        for p in predictions:
            if FASHION_MNIST_LABELS[p["index"]] != p["label"] or not 0 <= p["probability"] <= 1:
                return "label, index or probability malformed"
    return None


class SingleImageUser(FastHttpUser):
    """One image per request, back to back: the closed-loop client most services see."""

    wait_time = constant(0)

    @task
    def classify(self) -> None:
        data = random.choice(IMAGES)
        with self.client.post(
            "/classify?top_k=1",
            files={"images": ("image.png", data, "image/png")},
            name="/classify [1 image]",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            problem = check(resp.json(), 1)
            if problem:
                resp.failure(problem)
