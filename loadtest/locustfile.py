"""Locust load tests of a classification server with real Fashion-MNIST payloads.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 --headless -u 64 -r 64 -t 30s \
        SingleImageUser

User classes (pick by name on the command line; without one, Locust mixes them all):
  SingleImageUser   one PNG per request to /classify, back to back (closed loop)
  MultiImageUser    32 PNGs per request to /classify
  ColourJpegUser    one 256 x 256 colour JPEG per request (decode and resize cost)
  TensorUser        /classify/tensor with a uint8 .npy batch of 8
  V2BinaryUser      Open Inference Protocol, FP32 tensor as binary data, 8 images
  ConstantRateUser  one PNG per request at CONVSERVE_LOCUST_RATE requests/s per user
                    (open loop: the offered load does not fall when the server slows down)
  SoakUser          a mix at CONVSERVE_LOCUST_RATE requests/s per user: multipart and raw
                    PNGs, .npy tensors, the OIP binary protocol, GET /models, and about 5 %
                    bad inputs that must get their documented 4xx (`make soak`)
A step load shape lives in loadtest/shapes.py (`-f loadtest/locustfile.py,loadtest/shapes.py`).

Payloads are encoded once, at import. Every response is checked, not only its status: a
malformed body, a label that is not the model's name for its index, or a top-1 that differs
from the first answer the server gave for the same payload (cross-talk between requests in a
batch) counts as a failure.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct

import numpy as np
from locust import FastHttpUser, constant, constant_throughput, events, task
from PIL import Image

from convserve.models.data import load_fashion_mnist
from convserve.preprocess import from_pixels
from convserve.spec import FASHION_MNIST_LABELS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, InputSpec

PAYLOADS = 256
MULTI = 32
TENSOR_BATCH = 8

_test = load_fashion_mnist("test")
_images = _test.images[:PAYLOADS]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


PNGS: list[bytes] = [_encode(Image.fromarray(img), "PNG") for img in _images]
JPEGS: list[bytes] = [
    _encode(
        Image.fromarray(np.stack([img, img // 2, 255 - img], -1)).resize((256, 256)),
        "JPEG",
        quality=90,
    )
    for img in _images[:64]
]
_pixels = _images[:, None]  # N x 1 x 28 x 28 uint8
_spec = InputSpec(channels=1, height=28, width=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
_normalized = from_pixels(_images, _spec)  # N x 1 x 28 x 28, as the server preprocesses
NPY: list[bytes] = []
for start in range(0, PAYLOADS, TENSOR_BATCH):
    buf = io.BytesIO()
    np.save(buf, _pixels[start : start + TENSOR_BATCH])
    NPY.append(buf.getvalue())
V2: list[tuple[bytes, int]] = []
for start in range(0, PAYLOADS, TENSOR_BATCH):
    raw = _normalized[start : start + TENSOR_BATCH].astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [TENSOR_BATCH, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    V2.append((header + raw, len(header)))

LABELS: list[str] = list(FASHION_MNIST_LABELS)
V2_MODEL = os.environ.get("CONVSERVE_LOCUST_V2_MODEL", "fashion-lenet5")
_first_answers: dict[tuple[str, int], list[int]] = {}


@events.test_start.add_listener
def _labels_from_server(environment, **_kw) -> None:  # noqa: ANN001 - Locust's signature
    """Take the served model's labels from GET /models when the server has it."""
    import urllib.request

    global LABELS
    try:
        with urllib.request.urlopen(f"{environment.host}/models", timeout=5) as resp:
            LABELS = json.load(resp)["models"][0]["versions"][0]["labels"]
    except Exception:  # noqa: BLE001 - peers have no /models; Fashion-MNIST's labels then
        pass


def check(body: object, images: int, key: tuple[str, int] | None = None) -> str | None:
    """Why `body` is not a valid answer for `images` images, or None if it is."""
    if isinstance(body, list) and len(body) == 1:  # BentoML's batchable APIs answer a list
        body = body[0]
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != images:
        return f"expected {images} results"
    top1 = []
    for result in results:
        predictions = result.get("predictions") or []
        if not predictions:
            return "no predictions"
        for p in predictions:
            if LABELS[p["index"]] != p["label"] or not 0 <= p["probability"] <= 1:
                return "label, index or probability malformed"
        top1.append(predictions[0]["index"])
    return _consistent(key, top1)


def _consistent(key: tuple[str, int] | None, top1: list[int]) -> str | None:
    if key is None:
        return None
    first = _first_answers.setdefault(key, top1)
    return None if first == top1 else "a different answer than before for the same payload"


class _Checked(FastHttpUser):
    abstract = True
    wait_time = constant(0)

    def _post(self, path: str, name: str, images: int, key, **kw) -> None:  # noqa: ANN001
        with self.client.post(path, name=name, catch_response=True, **kw) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                problem = check(resp.json(), images, key)
            except (ValueError, KeyError, TypeError, IndexError):
                problem = "malformed body"
            if problem:
                resp.failure(problem)


class SingleImageUser(_Checked):
    """One image per request: the closed-loop client most services see."""

    @task
    def classify(self) -> None:
        i = random.randrange(len(PNGS))
        self._post(
            "/classify?top_k=1",
            "/classify [1 image]",
            1,
            ("png", i),
            files={"images": ("image.png", PNGS[i], "image/png")},
        )


class MultiImageUser(_Checked):
    @task
    def classify(self) -> None:
        start = random.randrange(0, len(PNGS) - MULTI)
        files = [
            ("images", (f"{i}.png", PNGS[i], "image/png")) for i in range(start, start + MULTI)
        ]
        self._post(
            "/classify?top_k=1", f"/classify [{MULTI} images]", MULTI, ("multi", start), files=files
        )


class ColourJpegUser(_Checked):
    @task
    def classify(self) -> None:
        i = random.randrange(len(JPEGS))
        self._post(
            "/classify?top_k=1",
            "/classify [256px colour JPEG]",
            1,
            ("jpeg", i),
            files={"images": ("image.jpg", JPEGS[i], "image/jpeg")},
        )


class TensorUser(_Checked):
    @task
    def classify(self) -> None:
        i = random.randrange(len(NPY))
        self._post(
            "/classify/tensor?top_k=1",
            f"/classify/tensor [{TENSOR_BATCH} uint8]",
            TENSOR_BATCH,
            ("npy", i),
            data=NPY[i],
            headers={"Content-Type": "application/x-npy"},
        )


class V2BinaryUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def infer(self) -> None:
        i = random.randrange(len(V2))
        body, header_length = V2[i]
        with self.client.post(
            f"/v2/models/{V2_MODEL}/infer",
            name=f"/v2 infer [{TENSOR_BATCH} FP32 binary]",
            data=body,  # pyright: ignore[reportArgumentType] - bytes are sent as they are
            headers={"Inference-Header-Content-Length": str(header_length)},
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            problem = _check_v2(resp.content, resp.headers, i)
            if problem:
                resp.failure(problem)


def _check_v2(content: bytes, headers, i: int) -> str | None:  # noqa: ANN001
    try:
        n = int(headers.get("Inference-Header-Content-Length"))
        (out,) = json.loads(content[:n])["outputs"]
        size = out["parameters"]["binary_data_size"]
        probs = np.frombuffer(content[n : n + size], dtype="<f4").reshape(out["shape"])
    except (TypeError, ValueError, KeyError, struct.error):
        return "malformed v2 body"
    if probs.shape != (TENSOR_BATCH, len(LABELS)) or not np.allclose(probs.sum(1), 1, atol=1e-4):
        return "v2 probabilities malformed"
    return _consistent(("v2", i), probs.argmax(1).tolist())


class ConstantRateUser(SingleImageUser):
    wait_time = constant_throughput(float(os.environ.get("CONVSERVE_LOCUST_RATE", "10")))


# Bad inputs of the soak, with the status and error code each must get. Anything else fails.
BAD: list[tuple[str, dict, int, str]] = [
    ("/classify", {"files": {"images": ("x.png", PNGS[0][:60], "image/png")}}, 400,
     "invalid_image"),
    ("/classify", {"files": {"images": ("x.txt", b"not an image", "text/plain")}}, 415,
     "unsupported_image"),
    ("/classify?top_k=99", {"files": {"images": ("x.png", PNGS[0], "image/png")}}, 422,
     "invalid_top_k"),
    ("/classify?model=nope", {"files": {"images": ("x.png", PNGS[0], "image/png")}}, 404,
     "model_not_found"),
    ("/classify/tensor", {"data": b"\x93NUMPY junk", "headers": {"Content-Type":
     "application/x-npy"}}, 422, "invalid_tensor"),
]  # fmt: skip


class SoakUser(_Checked):
    """The soak's mixed traffic (weights: about 5 % bad inputs), at a constant rate."""

    wait_time = constant_throughput(float(os.environ.get("CONVSERVE_LOCUST_RATE", "10")))

    @task(40)
    def multipart_png(self) -> None:
        i = random.randrange(len(PNGS))
        files = {"images": ("image.png", PNGS[i], "image/png")}
        self._post("/classify?top_k=3", "/classify [multipart]", 1, ("png", i), files=files)

    @task(20)
    def raw_png(self) -> None:
        i = random.randrange(len(PNGS))
        headers = {"Content-Type": "image/png"}
        self._post("/classify?top_k=3", "/classify [raw]", 1, ("png", i), data=PNGS[i],
                   headers=headers)  # fmt: skip

    @task(15)
    def oip_binary(self) -> None:
        V2BinaryUser.infer(self)  # type: ignore[arg-type]

    @task(10)
    def tensor(self) -> None:
        TensorUser.classify(self)  # type: ignore[arg-type]

    @task(10)
    def models(self) -> None:
        with self.client.get("/models", catch_response=True) as resp:
            if resp.status_code != 200 or "models" not in (resp.text or ""):
                resp.failure(f"HTTP {resp.status_code}")

    @task(5)
    def bad_input(self) -> None:
        path, kw, status, code = random.choice(BAD)
        with self.client.post(path, name="bad input", catch_response=True, **kw) as resp:
            try:
                got = resp.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                got = None
            if resp.status_code == status and got == code:
                resp.success()
            else:
                resp.failure(f"bad input: expected {status} {code}, got {resp.status_code} {got}")
