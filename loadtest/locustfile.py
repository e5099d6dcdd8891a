"""Locust load tests of a classification server with real Fashion-MNIST payloads.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 --headless -u 64 -r 64 -t 30s \
        SingleImageUser

User classes (pick by name on the command line; without one, Locust mixes them all):
  SingleImageUser   one PNG per request to /classify, back to back (closed loop)
  MultiImageUser    32 PNGs per request to /classify
  ColourJpegUser    one 256 x 256 colour JPEG per request (decode and resize cost)
  RawImageUser      one PNG as the whole body (Content-Type image/png) to CONVSERVE_LOCUST_PATH
                    (default /classify?top_k=1; TorchServe's /predictions/<model>)
  OipImageUser      one PNG per request as a KServe v2 BYTES tensor (binary data) to
                    /v2/models/CONVSERVE_LOCUST_V2_MODEL/infer (convserve and Triton)
  DetectUser        one 128 x 128 test scene as PNG per request to /detect
  VerifyUser        two Fashion-MNIST PNGs (parts a and b) per request to /verify
  StylizeUser       one 256 x 256 photo as JPEG per request to /stylize?style=K, K random
  (these three need CONVSERVE_LOCUST_TASK=detect, verify or stylize for their payloads)
  PhotoUser         real colour photos (scikit-image's, as JPEG), CONVSERVE_LOCUST_PHOTOS per
                    request (default 1), to /classify?model=CONVSERVE_LOCUST_MODEL
  PhoneUser         12 MP phone-camera JPEGs (the *.jpg of CONVSERVE_LOCUST_PHONE_DIR, read on
                    first use), CONVSERVE_LOCUST_PHOTOS per request, multipart to /classify
  PhoneRawUser      one of them as the whole body, to CONVSERVE_LOCUST_PATH (TorchServe)
  PhoneOipUser      CONVSERVE_LOCUST_PHOTOS of them as a KServe v2 BYTES tensor (Triton)
  TensorUser        /classify/tensor with a uint8 .npy batch of 8
  V2BinaryUser      Open Inference Protocol, FP32 tensor as binary data, 8 images
  ConstantRateUser  one PNG per request at CONVSERVE_LOCUST_RATE requests/s per user
                    (open loop: the offered load does not fall when the server slows down)
  SoakUser          a mix at CONVSERVE_LOCUST_RATE requests/s per user: multipart and raw
                    PNGs, .npy tensors, the OIP binary protocol, GET /models, and about 5 %
                    bad inputs that must get their documented 4xx (`make soak`)
A step load shape lives in loadtest/shapes.py (`-f loadtest/locustfile.py,loadtest/shapes.py`).

Payloads are encoded on first use, once per process (a user class builds only what it sends).
Every response is checked, not only its status, by the one checked post all users share: a
malformed body, a label that is not the served model's name for its index, or a top-1 that
differs from the first answer the server gave for the same payload (cross-talk between
requests in a batch) counts as a failure.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import struct
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from locust import FastHttpUser, constant, constant_throughput, task
from PIL import Image

from convserve.models.data import load_fashion_mnist
from convserve.preprocess import from_pixels
from convserve.spec import FASHION_MNIST_LABELS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, InputSpec

PAYLOADS = 256
MULTI = 32
TENSOR_BATCH = 8
STYLIZE_SIDE = 256
V2_MODEL = os.environ.get("CONVSERVE_LOCUST_V2_MODEL", "fashion-lenet5")
RAW_PATH = os.environ.get("CONVSERVE_LOCUST_PATH", "/classify?top_k=1")
MODEL = os.environ.get("CONVSERVE_LOCUST_MODEL")
PHOTOS_PER_REQUEST = int(os.environ.get("CONVSERVE_LOCUST_PHOTOS", "1"))
HEADER_LENGTH = "Inference-Header-Content-Length"
Key = tuple[str, int]  # a payload: the same one must always get the same answer


# --- payloads: each built on first use -------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.cache
def _garments() -> np.ndarray:
    return load_fashion_mnist("test").images[:PAYLOADS]  # N x 28 x 28 uint8


@functools.cache
def pngs() -> list[bytes]:
    return [_encode(Image.fromarray(img), "PNG") for img in _garments()]


@functools.cache
def jpegs() -> list[bytes]:
    """Garments as 256 x 256 colour JPEGs (decode and resize cost)."""
    return [
        _encode(
            Image.fromarray(np.stack([img, img // 2, 255 - img], -1)).resize((256, 256)),
            "JPEG",
            quality=90,
        )
        for img in _garments()[:64]
    ]


@functools.cache
def npy_batches() -> list[bytes]:
    """uint8 .npy batches of TENSOR_BATCH x 1 x 28 x 28."""
    pixels = _garments()[:, None]
    out = []
    for start in range(0, PAYLOADS, TENSOR_BATCH):
        buf = io.BytesIO()
        np.save(buf, pixels[start : start + TENSOR_BATCH])
        out.append(buf.getvalue())
    return out


def _v2_request(inputs: list[dict[str, Any]], blob: bytes) -> tuple[bytes, int]:
    """A v2 request with binary data: (body, header length)."""
    header = json.dumps({
        "inputs": inputs,
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    return header + blob, len(header)


@functools.cache
def v2_tensors() -> list[tuple[bytes, int]]:
    """Normalized FP32 batches of TENSOR_BATCH, as the server preprocesses, in binary data."""
    spec = InputSpec(
        channels=1, height=28, width=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
    )
    normalized = from_pixels(_garments(), spec)  # N x 1 x 28 x 28
    out = []
    for start in range(0, PAYLOADS, TENSOR_BATCH):
        raw = normalized[start : start + TENSOR_BATCH].astype("<f4").tobytes()
        shape = [TENSOR_BATCH, 1, 28, 28]
        tensor = {"name": "input", "shape": shape, "datatype": "FP32",
                  "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
        out.append(_v2_request([tensor], raw))
    return out


def oip_images(*images: bytes) -> tuple[bytes, int]:
    """Encoded images as one v2 BYTES tensor (N x 1) in binary data."""
    blob = b"".join(struct.pack("<I", len(image)) + image for image in images)
    tensor = {"name": "image", "shape": [len(images), 1], "datatype": "BYTES",
              "parameters": {"binary_data_size": len(blob)}}  # fmt: skip
    return _v2_request([tensor], blob)


@functools.cache
def oip_pngs() -> list[tuple[bytes, int]]:
    return [oip_images(png) for png in pngs()]


@functools.cache
def photo_jpegs() -> list[bytes]:
    """scikit-image's photos as JPEG files at their own size (what a camera would upload)."""
    from convserve.models.data import PHOTOS, load_photos

    out = []
    for name in PHOTOS:
        (photo,) = load_photos((name,), size=None)
        out.append(_encode(Image.fromarray(photo), "JPEG", quality=90))
    return out


@functools.cache
def phone_jpegs() -> list[bytes]:
    """The phone photos the harness wrote (`convserve.models.data.phone_photos`)."""
    folder = Path(os.environ["CONVSERVE_LOCUST_PHONE_DIR"])
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]


@functools.cache
def scene_pngs() -> list[bytes]:
    from convserve.models.data import load_scenes

    return [_encode(Image.fromarray(img), "PNG") for img in load_scenes("test", 64).images]


@functools.cache
def style_jpegs() -> list[bytes]:
    from convserve.models.data import load_photos

    size = (STYLIZE_SIDE, STYLIZE_SIDE)
    return [_encode(Image.fromarray(p), "JPEG", quality=90) for p in load_photos(size=size)]


def _picks(photos: list[bytes]) -> tuple[int, list[int]]:
    """PHOTOS_PER_REQUEST consecutive photos (wrapping round): (the first, every one)."""
    start = random.randrange(len(photos))
    return start, [(start + j) % len(photos) for j in range(PHOTOS_PER_REQUEST)]


# --- what a good answer is ----------------------------------------------------------------------


@functools.cache
def served_labels(host: str) -> tuple[str, ...]:
    """The served model's labels: its spec.json (CONVSERVE_LOCUST_SPEC, for peers, which have no
    /models), else GET /models, else Fashion-MNIST's."""
    spec = os.environ.get("CONVSERVE_LOCUST_SPEC")
    if spec:
        return tuple(json.loads(Path(spec).read_text())["labels"])
    try:
        with urllib.request.urlopen(f"{host}/models", timeout=5) as resp:
            return tuple(json.load(resp)["models"][0]["versions"][0]["labels"])
    except (OSError, ValueError, KeyError, IndexError):  # a peer without /models
        return FASHION_MNIST_LABELS


_first_answers: dict[Key, list[Any]] = {}


def _consistent(key: Key | None, answer: list[Any]) -> str | None:
    if key is None:
        return None
    first = _first_answers.setdefault(key, answer)
    return None if first == answer else "a different answer than before for the same payload"


def check(body: Any, images: int, labels: tuple[str, ...], key: Key | None = None) -> str | None:
    """Why `body` is not a valid classification of `images` images, or None if it is."""
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
            if labels[p["index"]] != p["label"] or not 0 <= p["probability"] <= 1:
                return "label, index or probability malformed"
        top1.append(predictions[0]["index"])
    return _consistent(key, top1)


def check_v2(resp: Any, labels: tuple[str, ...], key: Key, rows: int) -> str | None:
    """Why a v2 binary answer is not `rows` rows of probabilities over the labels (None: it is)."""
    content = resp.content or b""
    n = int(resp.headers.get(HEADER_LENGTH))
    (out,) = json.loads(content[:n])["outputs"]
    size = out["parameters"]["binary_data_size"]
    probs = np.frombuffer(content[n : n + size], dtype="<f4").reshape(out["shape"])
    if probs.shape != (rows, len(labels)) or not np.allclose(probs.sum(1), 1, atol=1e-4):
        return "v2 probabilities malformed"
    return _consistent(key, probs.argmax(1).tolist())


def check_detections(body: Any, labels: tuple[str, ...], key: Key) -> str | None:
    """Why `body` is not one scene's detections (or not the first answer for it), or None."""
    (result,) = body["results"]
    dets = result["detections"]
    if (result["width"], result["height"]) != (128, 128):
        return "wrong size"
    for d in dets:
        b = d["box"]
        if labels[d["index"]] != d["label"] or not (0 <= d["score"] <= 1 and b["x1"] <= b["x2"]):
            return "detection malformed"
    if [d["score"] for d in dets] != sorted((d["score"] for d in dets), reverse=True):
        return "detections not sorted by score"
    return _consistent(key, [d["index"] for d in dets])


Check = Callable[[Any], str | None]  # the response -> what is wrong with it, or None


class _Checked(FastHttpUser):
    """Every user: each answer checked, not only its status (`post`)."""

    abstract = True
    wait_time = constant(0)

    @property
    def labels(self) -> tuple[str, ...]:
        return served_labels(self.host or "")

    def post(self, path: str, name: str, problem: Check, status: int = 200, **kw: Any) -> None:
        """POST, then a failure unless the answer has `status` and `problem` finds nothing in
        it (an answer it cannot take apart is malformed)."""
        with self.client.post(path, name=name, catch_response=True, **kw) as resp:
            if resp.status_code != status:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                found = problem(resp)
            except (ValueError, KeyError, TypeError, IndexError, struct.error):
                found = "malformed body"
            if found:
                resp.failure(found)
            else:
                resp.success()

    def classify(self, path: str, name: str, images: int, key: Key, **kw: Any) -> None:
        self.post(path, name, lambda r: check(r.json(), images, self.labels, key), **kw)

    def infer_v2(self, name: str, payload: tuple[bytes, int], key: Key, rows: int) -> None:
        body, header_length = payload
        self.post(
            f"/v2/models/{V2_MODEL}/infer",
            name,
            lambda r: check_v2(r, self.labels, key, rows),
            data=body,
            headers={HEADER_LENGTH: str(header_length)},
        )


# --- the users --------------------------------------------------------------------------------


class SingleImageUser(_Checked):
    """One image per request: the closed-loop client most services see."""

    @task
    def one_png(self) -> None:
        i = random.randrange(PAYLOADS)
        files = {"images": ("image.png", pngs()[i], "image/png")}
        self.classify("/classify?top_k=1", "/classify [1 image]", 1, ("png", i), files=files)


class MultiImageUser(_Checked):
    @task
    def many_pngs(self) -> None:
        start = random.randrange(0, PAYLOADS - MULTI)
        files = [
            ("images", (f"{i}.png", pngs()[i], "image/png")) for i in range(start, start + MULTI)
        ]
        name = f"/classify [{MULTI} images]"
        self.classify("/classify?top_k=1", name, MULTI, ("multi", start), files=files)


class ColourJpegUser(_Checked):
    @task
    def colour_jpeg(self) -> None:
        i = random.randrange(len(jpegs()))
        files = {"images": ("image.jpg", jpegs()[i], "image/jpeg")}
        name = "/classify [256px colour JPEG]"
        self.classify("/classify?top_k=1", name, 1, ("jpeg", i), files=files)


class TensorUser(_Checked):
    @task
    def npy_batch(self) -> None:
        i = random.randrange(len(npy_batches()))
        self.classify("/classify/tensor?top_k=1", f"/classify/tensor [{TENSOR_BATCH} uint8]",
                      TENSOR_BATCH, ("npy", i), data=npy_batches()[i],
                      headers={"Content-Type": "application/x-npy"})  # fmt: skip


class RawImageUser(_Checked):
    """One PNG as the whole body, as `curl --data-binary` (and TorchServe's clients) send it."""

    @task
    def raw_png(self) -> None:
        i = random.randrange(PAYLOADS)
        self.classify(RAW_PATH, "raw PNG body", 1, ("raw", i), data=pngs()[i],
                      headers={"Content-Type": "image/png"})  # fmt: skip


class OipImageUser(_Checked):
    """One PNG per request as a KServe v2 BYTES tensor, as Triton's clients send images."""

    @task
    def oip_png(self) -> None:
        i = random.randrange(PAYLOADS)
        self.infer_v2("/v2 infer [1 PNG, BYTES]", oip_pngs()[i], ("oip-png", i), rows=1)


class V2BinaryUser(_Checked):
    @task
    def v2_tensor(self) -> None:
        i = random.randrange(len(v2_tensors()))
        name = f"/v2 infer [{TENSOR_BATCH} FP32 binary]"
        self.infer_v2(name, v2_tensors()[i], ("v2", i), TENSOR_BATCH)


class PhotoUser(_Checked):
    """Real colour photos, PHOTOS_PER_REQUEST per request, to the model CONVSERVE_LOCUST_MODEL."""

    @task
    def photos(self) -> None:
        start, picks = _picks(photo_jpegs())
        files = [("images", (f"{i}.jpg", photo_jpegs()[i], "image/jpeg")) for i in picks]
        self.classify(f"/classify?top_k=1&model={MODEL}", f"/classify [{len(picks)} photos]",
                      len(picks), ("photo", start), files=files)  # fmt: skip


class PhoneUser(_Checked):
    """12 MP phone JPEGs, PHOTOS_PER_REQUEST per request, as multipart parts."""

    @task
    def phone_photos(self) -> None:
        start, picks = _picks(phone_jpegs())
        files = [("images", (f"{i}.jpg", phone_jpegs()[i], "image/jpeg")) for i in picks]
        self.classify(f"/classify?top_k=1&model={MODEL}", f"/classify [{len(picks)} phone JPEGs]",
                      len(picks), ("phone", start), files=files)  # fmt: skip


class PhoneRawUser(_Checked):
    """One 12 MP phone JPEG as the whole body (TorchServe's clients)."""

    @task
    def phone_raw(self) -> None:
        i = random.randrange(len(phone_jpegs()))
        self.classify(RAW_PATH, "raw phone JPEG body", 1, ("phone-raw", i),
                      data=phone_jpegs()[i], headers={"Content-Type": "image/jpeg"})  # fmt: skip


class PhoneOipUser(_Checked):
    """PHOTOS_PER_REQUEST phone JPEGs as one KServe v2 BYTES tensor (Triton's clients)."""

    @task
    def phone_oip(self) -> None:
        start, picks = _picks(phone_jpegs())
        payload = oip_images(*(phone_jpegs()[i] for i in picks))
        name = f"/v2 infer [{len(picks)} phone JPEGs, BYTES]"
        self.infer_v2(name, payload, ("phone-oip", start), len(picks))


class DetectUser(_Checked):
    """One 128 x 128 test scene as PNG per request to /detect."""

    @task
    def detect(self) -> None:
        i = random.randrange(len(scene_pngs()))
        files = {"images": ("scene.png", scene_pngs()[i], "image/png")}
        problem: Check = lambda r: check_detections(r.json(), self.labels, ("scene", i))  # noqa: E731
        self.post("/detect", "/detect [1 scene]", problem, files=files)


class VerifyUser(_Checked):
    """Two Fashion-MNIST PNGs (parts a and b) per request to /verify."""

    @task
    def verify(self) -> None:
        i, j = random.randrange(PAYLOADS), random.randrange(PAYLOADS)
        files = {"a": ("a.png", pngs()[i], "image/png"), "b": ("b.png", pngs()[j], "image/png")}

        def problem(resp: Any) -> str | None:
            body = resp.json()
            d, tau, same = body["distance"], body["threshold"], body["same"]
            ok = 0 <= d <= 4.0001 and same == (d <= tau) and (i != j or d < 1e-4)
            return None if ok else "verification malformed"

        self.post("/verify", "/verify [2 images]", problem, files=files)


class StylizeUser(_Checked):
    """One 256 x 256 photo as JPEG per request to /stylize?style=K (K from 0 to 25)."""

    @task
    def stylize(self) -> None:
        i, style = random.randrange(len(style_jpegs())), random.randrange(26)
        files = {"images": ("photo.jpg", style_jpegs()[i], "image/jpeg")}

        def problem(resp: Any) -> str | None:
            png = resp.content or b""
            side = (STYLIZE_SIDE, STYLIZE_SIDE)
            if png[:8] != b"\x89PNG\r\n\x1a\n" or struct.unpack(">II", png[16:24]) != side:
                return "not a PNG of the upload's size"
            if _consistent((f"style{style}", i), [hash(png)]):
                return "a different image than before for the same request"
            return None

        self.post(f"/stylize?style={style}", "/stylize [256 px JPEG]", problem, files=files)


class ConstantRateUser(SingleImageUser):
    wait_time = constant_throughput(float(os.environ.get("CONVSERVE_LOCUST_RATE", "10")))


@functools.cache
def bad_inputs() -> list[tuple[str, dict[str, Any], int, str]]:
    """Bad inputs of the soak, with the status and error code each must get."""
    png = pngs()[0]
    return [
        ("/classify", {"files": {"images": ("x.png", png[:60], "image/png")}}, 400,
         "invalid_image"),
        ("/classify", {"files": {"images": ("x.txt", b"not an image", "text/plain")}}, 415,
         "unsupported_image"),
        ("/classify?top_k=99", {"files": {"images": ("x.png", png, "image/png")}}, 422,
         "invalid_top_k"),
        ("/classify?model=nope", {"files": {"images": ("x.png", png, "image/png")}}, 404,
         "model_not_found"),
        ("/classify/tensor", {"data": b"\x93NUMPY junk", "headers": {"Content-Type":
         "application/x-npy"}}, 422, "invalid_tensor"),
    ]  # fmt: skip


class SoakUser(_Checked):
    """The soak's mixed traffic (weights: about 5 % bad inputs), at a constant rate."""

    wait_time = constant_throughput(float(os.environ.get("CONVSERVE_LOCUST_RATE", "10")))

    @task(40)
    def multipart_png(self) -> None:
        i = random.randrange(PAYLOADS)
        files = {"images": ("image.png", pngs()[i], "image/png")}
        self.classify("/classify?top_k=3", "/classify [multipart]", 1, ("png", i), files=files)

    @task(20)
    def raw_png(self) -> None:
        i = random.randrange(PAYLOADS)
        self.classify("/classify?top_k=3", "/classify [raw]", 1, ("png", i), data=pngs()[i],
                      headers={"Content-Type": "image/png"})  # fmt: skip

    @task(15)
    def oip_binary(self) -> None:
        V2BinaryUser.v2_tensor(self)  # type: ignore[arg-type] - the same request, this user

    @task(10)
    def tensor(self) -> None:
        TensorUser.npy_batch(self)  # type: ignore[arg-type] - the same request, this user

    @task(10)
    def models(self) -> None:
        with self.client.get("/models", catch_response=True) as resp:
            if resp.status_code != 200 or "models" not in (resp.text or ""):
                resp.failure(f"HTTP {resp.status_code}")

    @task(5)
    def bad_input(self) -> None:
        path, kw, status, code = random.choice(bad_inputs())

        def problem(resp: Any) -> str | None:
            got = resp.json()["error"]["code"]
            return None if got == code else f"bad input: expected {status} {code}, got {got}"

        self.post(path, "bad input", problem, status=status, **kw)
