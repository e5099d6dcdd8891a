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

Payloads are encoded once, at import. Every response is checked, not only its status: a
malformed body, a label that is not the model's name for its index, or a top-1 that differs
from the first answer the server gave for the same payload (cross-talk between requests in a
batch) counts as a failure.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import struct
from pathlib import Path

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
RAW_PATH = os.environ.get("CONVSERVE_LOCUST_PATH", "/classify?top_k=1")
MODEL = os.environ.get("CONVSERVE_LOCUST_MODEL")
PHOTOS_PER_REQUEST = int(os.environ.get("CONVSERVE_LOCUST_PHOTOS", "1"))


def _oip_png(*images: bytes) -> tuple[bytes, int]:
    """A v2 request carrying encoded images as one BYTES tensor (N x 1) in binary data:
    (body, header length)."""
    blob = b"".join(struct.pack("<I", len(image)) + image for image in images)
    header = json.dumps({
        "inputs": [{"name": "image", "shape": [len(images), 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    return header + blob, len(header)


OIP_PNGS: list[tuple[bytes, int]] = [_oip_png(p) for p in PNGS]


def _photo_jpegs() -> list[bytes]:
    """scikit-image's photos as JPEG files at their own size (what a camera would upload)."""
    from convserve.models.data import PHOTOS, load_photos

    out = []
    for name in PHOTOS:
        (photo,) = load_photos((name,), size=None)
        out.append(_encode(Image.fromarray(photo), "JPEG", quality=90))
    return out


PHOTO_JPEGS: list[bytes] = _photo_jpegs() if os.environ.get("CONVSERVE_LOCUST_MODEL") else []
_first_answers: dict[tuple[str, int], list[int]] = {}


@events.test_start.add_listener
def _labels_from_server(environment, **_kw) -> None:  # noqa: ANN001 - Locust's signature
    """Take the served model's labels from GET /models when the server has it."""
    import urllib.request

    global LABELS
    spec = os.environ.get("CONVSERVE_LOCUST_SPEC")  # the model's spec.json: peers have no /models
    if spec:
        LABELS = json.loads(Path(spec).read_text())["labels"]
        return
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


class RawImageUser(_Checked):
    """One PNG as the whole body, as `curl --data-binary` (and TorchServe's clients) send it."""

    @task
    def classify(self) -> None:
        i = random.randrange(len(PNGS))
        self._post(RAW_PATH, "raw PNG body", 1, ("raw", i), data=PNGS[i],
                   headers={"Content-Type": "image/png"})  # fmt: skip


class _CheckedV2(FastHttpUser):
    """Open Inference Protocol users: each v2 binary answer is checked (`_check_v2`)."""

    abstract = True
    wait_time = constant(0)

    def _post_v2(
        self, name: str, payload: tuple[bytes, int], key: tuple[str, int], rows: int
    ) -> None:
        body, header_length = payload
        with self.client.post(
            f"/v2/models/{V2_MODEL}/infer",
            name=name,
            data=body,  # pyright: ignore[reportArgumentType] - bytes are sent as they are
            headers={"Inference-Header-Content-Length": str(header_length)},
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            problem = _check_v2(resp.content, resp.headers, key, rows)
            if problem:
                resp.failure(problem)


class OipImageUser(_CheckedV2):
    """One PNG per request as a KServe v2 BYTES tensor, as Triton's clients send images."""

    @task
    def infer(self) -> None:
        i = random.randrange(len(OIP_PNGS))
        self._post_v2("/v2 infer [1 PNG, BYTES]", OIP_PNGS[i], ("oip-png", i), rows=1)


class PhotoUser(_Checked):
    """Real colour photos, PHOTOS_PER_REQUEST per request, to the model CONVSERVE_LOCUST_MODEL."""

    @task
    def classify(self) -> None:
        start = random.randrange(len(PHOTO_JPEGS))
        picks = [(start + j) % len(PHOTO_JPEGS) for j in range(PHOTOS_PER_REQUEST)]
        files = [("images", (f"{i}.jpg", PHOTO_JPEGS[i], "image/jpeg")) for i in picks]
        self._post(f"/classify?top_k=1&model={MODEL}", f"/classify [{len(picks)} photos]",
                   len(picks), ("photo", start), files=files)  # fmt: skip


@functools.cache
def phone_jpegs() -> list[bytes]:
    """The phone photos the harness wrote (`convserve.models.data.phone_photos`), read once,
    on first use: only the phone users need them."""
    folder = Path(os.environ["CONVSERVE_LOCUST_PHONE_DIR"])
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]


def _phone_picks() -> tuple[int, list[int]]:
    start = random.randrange(len(phone_jpegs()))
    return start, [(start + j) % len(phone_jpegs()) for j in range(PHOTOS_PER_REQUEST)]


class PhoneUser(_Checked):
    """12 MP phone JPEGs, PHOTOS_PER_REQUEST per request, as multipart parts."""

    @task
    def classify(self) -> None:
        start, picks = _phone_picks()
        files = [("images", (f"{i}.jpg", phone_jpegs()[i], "image/jpeg")) for i in picks]
        self._post(f"/classify?top_k=1&model={MODEL}", f"/classify [{len(picks)} phone JPEGs]",
                   len(picks), ("phone", start), files=files)  # fmt: skip


class PhoneRawUser(_Checked):
    """One 12 MP phone JPEG as the whole body (TorchServe's clients)."""

    @task
    def classify(self) -> None:
        i = random.randrange(len(phone_jpegs()))
        self._post(RAW_PATH, "raw phone JPEG body", 1, ("phone-raw", i), data=phone_jpegs()[i],
                   headers={"Content-Type": "image/jpeg"})  # fmt: skip


class PhoneOipUser(_CheckedV2):
    """PHOTOS_PER_REQUEST phone JPEGs as one KServe v2 BYTES tensor (Triton's clients)."""

    @task
    def infer(self) -> None:
        start, picks = _phone_picks()
        payload = _oip_png(*(phone_jpegs()[i] for i in picks))
        name = f"/v2 infer [{len(picks)} phone JPEGs, BYTES]"
        self._post_v2(name, payload, ("phone-oip", start), len(picks))


TASK = os.environ.get("CONVSERVE_LOCUST_TASK")  # detect, verify or stylize: their payloads
_stylize_side = 256


def _scene_pngs() -> list[bytes]:
    from convserve.models.data import load_scenes

    return [_encode(Image.fromarray(img), "PNG") for img in load_scenes("test", 64).images]


def _square_jpegs(side: int) -> list[bytes]:
    from convserve.models.data import load_photos

    return [_encode(Image.fromarray(p), "JPEG", quality=90) for p in load_photos(size=(side, side))]


SCENE_PNGS: list[bytes] = _scene_pngs() if TASK == "detect" else []
STYLE_JPEGS: list[bytes] = _square_jpegs(_stylize_side) if TASK == "stylize" else []


def check_detections(body: object, key: tuple[str, int]) -> str | None:
    """Why `body` is not one scene's detections (or not the first answer for it), or None."""
    (result,) = body["results"]  # type: ignore[index]
    dets = result["detections"]
    if (result["width"], result["height"]) != (128, 128):
        return "wrong size"
    for d in dets:
        b = d["box"]
        if LABELS[d["index"]] != d["label"] or not (0 <= d["score"] <= 1 and b["x1"] <= b["x2"]):
            return "detection malformed"
    if [d["score"] for d in dets] != sorted((d["score"] for d in dets), reverse=True):
        return "detections not sorted by score"
    return _consistent(key, [d["index"] for d in dets])


class DetectUser(FastHttpUser):
    """One 128 x 128 test scene as PNG per request to /detect."""

    wait_time = constant(0)

    @task
    def detect(self) -> None:
        i = random.randrange(len(SCENE_PNGS))
        files = {"images": ("scene.png", SCENE_PNGS[i], "image/png")}
        with self.client.post(
            "/detect", name="/detect [1 scene]", files=files, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                problem = check_detections(resp.json(), ("scene", i))
            except (ValueError, KeyError, TypeError, IndexError):
                problem = "malformed body"
            if problem:
                resp.failure(problem)


class VerifyUser(FastHttpUser):
    """Two Fashion-MNIST PNGs (parts a and b) per request to /verify."""

    wait_time = constant(0)

    @task
    def verify(self) -> None:
        i, j = random.randrange(len(PNGS)), random.randrange(len(PNGS))
        files = {"a": ("a.png", PNGS[i], "image/png"), "b": ("b.png", PNGS[j], "image/png")}
        with self.client.post(
            "/verify", name="/verify [2 images]", files=files, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                body = resp.json()
                d, tau, same = body["distance"], body["threshold"], body["same"]
                ok = 0 <= d <= 4.0001 and same == (d <= tau) and (i != j or d < 1e-4)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                resp.failure("verification malformed")


class StylizeUser(FastHttpUser):
    """One 256 x 256 photo as JPEG per request to /stylize?style=K (K from 0 to 25)."""

    wait_time = constant(0)

    @task
    def stylize(self) -> None:
        i, style = random.randrange(len(STYLE_JPEGS)), random.randrange(26)
        files = {"images": ("photo.jpg", STYLE_JPEGS[i], "image/jpeg")}
        with self.client.post(
            f"/stylize?style={style}", name="/stylize [256 px JPEG]", files=files,
            catch_response=True,
        ) as resp:  # fmt: skip
            png = resp.content or b""
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
            elif png[:8] != b"\x89PNG\r\n\x1a\n" or struct.unpack(">II", png[16:24]) != (
                _stylize_side,
                _stylize_side,
            ):
                resp.failure("not a PNG of the upload's size")
            elif _consistent((f"style{style}", i), [hash(png)]):
                resp.failure("a different image than before for the same request")


class V2BinaryUser(_CheckedV2):
    @task
    def infer(self) -> None:
        i = random.randrange(len(V2))
        self._post_v2(f"/v2 infer [{TENSOR_BATCH} FP32 binary]", V2[i], ("v2", i), TENSOR_BATCH)


def _check_v2(content: bytes, headers, key: tuple[str, int], rows: int = TENSOR_BATCH):  # noqa: ANN001, ANN201
    """Why a v2 binary answer is not `rows` rows of probabilities over the labels (None: it is)."""
    try:
        n = int(headers.get("Inference-Header-Content-Length"))
        (out,) = json.loads(content[:n])["outputs"]
        size = out["parameters"]["binary_data_size"]
        probs = np.frombuffer(content[n : n + size], dtype="<f4").reshape(out["shape"])
    except (TypeError, ValueError, KeyError, struct.error):
        return "malformed v2 body"
    if probs.shape != (rows, len(LABELS)) or not np.allclose(probs.sum(1), 1, atol=1e-4):
        return "v2 probabilities malformed"
    return _consistent(key, probs.argmax(1).tolist())


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
