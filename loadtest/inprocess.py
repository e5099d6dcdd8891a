"""The hardware limit: in-process ONNX Runtime throughput and latency for one model file, with
the threads the server gets (run it pinned to the server's cores).

    taskset -c 0 python -m convserve.loadtest.inprocess --onnx model.onnx --spec spec.json \\
        --threads 1 [--photos]

Batches of already preprocessed inputs (the model alone), then one request end to end as a
server handles it, without HTTP, with the payload the benchmark's Locust user sends for the
model's task:
  classify  one Fashion-MNIST PNG (or, with `--photos`, one of scikit-image's photos as JPEG):
            decode, preprocess, infer
  detect    one 128 x 128 test scene as PNG: decode, infer, per-class NMS, boxes to the
            upload's pixels
  embed     two Fashion-MNIST PNGs (a /verify request): decode both, infer, their distance
  stylize   one 256 x 256 photo as JPEG: decode, infer (style 0), encode the PNG

With `--phone DIR` (the *.jpg there: 12 MP phone photos), the CPU per photo of a crop-recipe
classifier at `--phone-batch`, each way of decoding it: the cheapest Pillow offers (JPEG's DCT
scaling to at least the first resize, `Image.draft`), convserve's recipe (`from_bytes`, which
leaves twice the first resize), and a full decode; each + resize + crop + the model.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convserve.models.data import PHOTOS, load_fashion_mnist, load_photos, load_scenes
from convserve.preprocess import decode, decode_batch, from_bytes, normalize
from convserve.runtime import SessionConfig, make_session
from convserve.spec import InputSpec, ModelSpec
from convserve.tasks.detect import select
from convserve.tasks.embed import squared_distance
from convserve.tasks.stylize import to_png

STYLIZE_SIDE = 256  # the /stylize scenario's photos


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def payloads(task: str, photos: bool) -> list[bytes]:
    """The encoded images the benchmark's Locust user sends for this task."""
    if task == "detect":
        return [_encode(img, "PNG") for img in load_scenes("test", 64).images]
    if task == "stylize":
        return [_encode(img, "JPEG") for img in load_photos(size=(STYLIZE_SIDE, STYLIZE_SIDE))]
    if photos:
        return [_encode(load_photos((name,), size=None)[0], "JPEG") for name in PHOTOS]
    return [_encode(img, "PNG") for img in load_fashion_mnist("test").images[:256]]


def _timed(run: Callable[[int], object], seconds: float) -> list[float]:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 10:
        t0 = time.perf_counter()
        run(len(times))
        times.append(time.perf_counter() - t0)
    return times


def measure(
    onnx: str,
    spec: ModelSpec,
    threads: int,
    batch_sizes: list[int],
    seconds: float,
    photos: bool = False,
) -> dict:
    session = make_session(onnx, SessionConfig(intra_op_threads=threads))
    name = session.get_inputs()[0].name
    encoded = payloads(spec.task, photos)
    extra: dict[str, np.ndarray] = {}
    if spec.stylize is not None:
        weights = np.zeros(spec.stylize.styles, dtype=np.float32)  # one vector: batch is 1
        weights[0] = 1.0
        extra = {spec.stylize.style_input: weights}
        batch_sizes = [1]  # the network's batch is fixed at 1
    x = np.stack([from_bytes(e, spec.input) for e in encoded])

    def infer(batch: np.ndarray) -> list:
        return list(session.run(None, {name: batch, **extra}))

    def detect(outputs: list) -> list:
        boxes, scores = outputs
        return [
            select(b, s, score_threshold=0.25, iou_threshold=0.45, max_detections=100)
            for b, s in zip(boxes, scores, strict=True)
        ]

    results = []
    for batch in batch_sizes:
        xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
        for _ in range(3):
            infer(xb)
        step = (lambda _, xb=xb: detect(infer(xb))) if spec.task == "detect" else (
            lambda _, xb=xb: infer(xb))  # fmt: skip
        times = _timed(step, seconds)
        results.append(
            {
                "batch": batch,
                "p50_ms": 1000 * float(np.median(times)),
                "images_per_s": batch / float(np.mean(times)),
            }
        )

    def one(i: int) -> object:  # one request as the server handles it, without HTTP
        data = encoded[i % len(encoded)]
        if spec.task == "detect":
            got = decode_batch([("scene.png", decode(data))], spec.input)
            found = detect(infer(got.x))[0]
            return got.placements[0].to_upload(found.boxes)
        if spec.task == "embed":
            pair = np.stack([from_bytes(data, spec.input), x[(i + 1) % len(x)]])
            a, b = infer(pair)[0]
            return squared_distance(a[None], b[None])[0]
        if spec.task == "stylize":
            got = decode_batch([("photo.jpg", decode(data))], spec.input)
            place = got.placements[0]
            return to_png(infer(got.x)[0][0], place.width, place.height)
        return infer(from_bytes(data, spec.input)[None])

    times = _timed(one, seconds)
    single = {"p50_ms": 1000 * float(np.median(times)), "requests_per_s": 1 / float(np.mean(times))}
    images = {
        "detect": "test scenes, 128 x 128 (PNG)",
        "embed": "Fashion-MNIST pairs (PNG)",
        "stylize": f"photos, {STYLIZE_SIDE} x {STYLIZE_SIDE} (JPEG)",
    }.get(spec.task, "photos (JPEG)" if photos else "Fashion-MNIST (PNG)")
    return {
        "threads": threads,
        "task": spec.task,
        "batches": results,
        "single_image_with_decode": single,  # one request, end to end
        "images": images,
    }


def _cheapest(data: bytes, spec: InputSpec) -> np.ndarray:
    """A crop recipe's input at the least CPU Pillow offers: the JPEG decoded at the smallest
    DCT scale that leaves the first resize (`draft`), resized, cropped, normalized."""
    assert spec.resize == "crop" and spec.resize_to is not None
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    scale = spec.resize_to / min(w, h)
    size = (int(w * scale), int(h * scale)) if w != h else (spec.resize_to, spec.resize_to)
    img.draft("RGB", size)
    img = img.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - spec.width) / 2), round((size[1] - spec.height) / 2)
    img = img.crop((left, top, left + spec.width, top + spec.height))
    return normalize(np.asarray(img).transpose(2, 0, 1), spec)  # 3 x H x W


def phone_limit(
    onnx: str, spec: ModelSpec, threads: int, folder: str, batch: int, rounds: int
) -> dict[str, Any]:
    """CPU ms per photo (process time: decode and ONNX Runtime on this process's threads), for
    each way of decoding, over `rounds` passes through the photos in batches of `batch`."""
    session = make_session(onnx, SessionConfig(intra_op_threads=threads))
    name = session.get_inputs()[0].name
    photos = [p.read_bytes() for p in sorted(Path(folder).glob("*.jpg"))]
    full = spec.input.model_copy(update={"reduced_decode": False})
    ways: dict[str, Callable[[bytes], np.ndarray]] = {
        "cheapest": lambda d: _cheapest(d, spec.input),
        "recipe": lambda d: from_bytes(d, spec.input),
        "full": lambda d: from_bytes(d, full),
    }
    stream = [photos[i % len(photos)] for i in range(len(photos) * rounds)]
    out: dict[str, object] = {"batch": batch, "photos": len(stream), "threads": threads}
    top1: dict[str, list[int]] = {}
    for way, prepare in ways.items():
        prepare(photos[0])  # warm
        t0, labels = time.process_time(), []
        for i in range(0, len(stream), batch):
            x = np.stack([prepare(d) for d in stream[i : i + batch]])
            labels += np.asarray(session.run(None, {name: x})[0]).argmax(1).tolist()
        out[f"{way}_ms_per_photo"] = 1000 * (time.process_time() - t0) / len(stream)
        top1[way] = labels[: len(photos)]
    x = np.stack([ways["recipe"](photos[i % len(photos)]) for i in range(batch)])
    t0 = time.process_time()
    for _ in range(rounds):
        session.run(None, {name: x})
    out["model_ms_per_photo"] = 1000 * (time.process_time() - t0) / (rounds * batch)
    out["top1"] = top1
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--photos", action="store_true", help="real photos as JPEG")
    parser.add_argument("--phone", help="a folder of phone JPEGs: their CPU per photo only")
    parser.add_argument("--phone-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10, help="--phone: passes over the photos")
    args = parser.parse_args()
    spec = ModelSpec.model_validate_json(Path(args.spec).read_text())
    if args.phone:
        limit = phone_limit(
            args.onnx, spec, args.threads, args.phone, args.phone_batch, args.rounds
        )
        print(json.dumps(limit))
        return
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(json.dumps(measure(args.onnx, spec, args.threads, sizes, args.seconds, args.photos)))


if __name__ == "__main__":
    main()
