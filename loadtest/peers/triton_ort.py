"""Triton Inference Server, the server the nvidia-pytriton wheel ships, with ONNX Runtime in a
Python model and Triton's dynamic batcher on, as PyTriton's documentation shows: a batched
infer function, `max_batch_size` and a `DynamicBatcher` with a short queue delay.

Clients speak KServe v2, Triton's protocol, over HTTP or gRPC: `lenet5` takes one PNG per
request as a BYTES tensor (binary tensor data), decoded and classified in the Python model;
`lenet5_pixels` takes decoded pixels, UINT8 [N, C, H, W], normalized in the Python model.
The harness runs it with Debian's Python in a virtual environment of its own (the stub Triton
starts links that Python's libpython).

    PEER_ONNX=model.onnx PEER_SPEC=spec.json python loadtest/peers/triton_ort.py --port 3005
"""

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

spec = json.loads(Path(os.environ["PEER_SPEC"]).read_text())
SIZE = (spec["input"]["width"], spec["input"]["height"])
RESIZE_TO = spec["input"].get("resize_to") if spec["input"].get("resize") == "crop" else None
MODE = "L" if spec["input"]["channels"] == 1 else "RGB"
MEAN = np.array(spec["input"]["mean"], np.float32).reshape(-1, 1, 1)
STD = np.array(spec["input"]["std"], np.float32).reshape(-1, 1, 1)

options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "1"))
session = ort.InferenceSession(os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name


def _resize(img: Image.Image) -> Image.Image:
    if RESIZE_TO is None:
        return img.resize(SIZE)
    # an ImageNet model's Resize(RESIZE_TO) + CenterCrop(SIZE), in Pillow
    w, h = img.size
    scale = RESIZE_TO / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    left, top = (img.width - SIZE[0]) // 2, (img.height - SIZE[1]) // 2
    return img.crop((left, top, left + SIZE[0], top + SIZE[1]))


def _pixels(data: bytes) -> np.ndarray:
    img = _resize(Image.open(io.BytesIO(data)).convert(MODE))
    x = np.asarray(img, np.float32) / 255.0
    return ((x[None] if x.ndim == 2 else x.transpose(2, 0, 1)) - MEAN) / STD


@batch
def infer(image: np.ndarray) -> dict:  # image: N x 1 encoded images (bytes)
    x = np.stack([_pixels(row[0]) for row in image])
    logits = session.run(None, {INPUT: x})[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return {"probabilities": (e / e.sum(1, keepdims=True)).astype(np.float32)}


@batch
def infer_pixels(input: np.ndarray) -> dict:  # input: N x C x H x W pixels (uint8)
    x = (input.astype(np.float32) / 255.0 - MEAN) / STD
    logits = session.run(None, {INPUT: x})[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return {"probabilities": (e / e.sum(1, keepdims=True)).astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3005)
    args = parser.parse_args()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_port=args.port + 1,
        metrics_port=args.port + 2,
        log_verbose=0,
    )
    # PyTriton's default security config restricts, among others, the statistics API, which
    # perf_analyzer reads after every measurement; it stays open here, the rest restricted.
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name="lenet5",
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=128, batcher=DynamicBatcher(max_queue_delay_microseconds=100)
            ),
        )
        # The same model for clients that send decoded pixels (perf_analyzer's tensors).
        triton.bind(
            model_name="lenet5_pixels",
            infer_func=infer_pixels,
            inputs=[
                Tensor(
                    name="input",
                    dtype=np.uint8,
                    shape=(spec["input"]["channels"], SIZE[1], SIZE[0]),
                )
            ],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=128, batcher=DynamicBatcher(max_queue_delay_microseconds=100)
            ),
        )
        triton.serve()


if __name__ == "__main__":
    main()
