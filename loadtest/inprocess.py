"""The hardware limit: in-process ONNX Runtime throughput and latency for one model file, with
the threads the server gets (run it pinned to the server's cores).

    taskset -c 0 python -m convserve.loadtest.inprocess --onnx model.onnx --spec spec.json \
        --threads 1
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from convserve.models.data import load_fashion_mnist
from convserve.preprocess import from_bytes
from convserve.runtime import SessionConfig, make_session
from convserve.spec import ModelSpec


def measure(onnx: str, spec: ModelSpec, threads: int, batch_sizes: list[int], seconds: float):
    session = make_session(onnx, SessionConfig(intra_op_threads=threads))
    name = session.get_inputs()[0].name
    images = load_fashion_mnist("test").images[:256]
    pngs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        pngs.append(buf.getvalue())
    x = np.stack([from_bytes(p, spec.input) for p in pngs])
    results = []
    for batch in batch_sizes:
        xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
        for _ in range(5):
            session.run(None, {name: xb})
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 10:
            t0 = time.perf_counter()
            session.run(None, {name: xb})
            times.append(time.perf_counter() - t0)
        p50 = float(np.median(times))
        results.append(
            {"batch": batch, "p50_ms": 1000 * p50, "images_per_s": batch / float(np.mean(times))}
        )
    # One image end to end as a server sees it: PNG decode + preprocessing + inference.
    times = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(times) < 10:
        t0 = time.perf_counter()
        xb = from_bytes(pngs[i % len(pngs)], spec.input)[None]
        session.run(None, {name: xb})
        times.append(time.perf_counter() - t0)
        i += 1
    single = {"p50_ms": 1000 * float(np.median(times)), "requests_per_s": 1 / float(np.mean(times))}
    return {"threads": threads, "batches": results, "single_image_with_decode": single}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    spec = ModelSpec.model_validate_json(Path(args.spec).read_text())
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(json.dumps(measure(args.onnx, spec, args.threads, sizes, args.seconds)))


if __name__ == "__main__":
    main()
