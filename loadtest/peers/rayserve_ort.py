"""Ray Serve with ONNX Runtime, as Ray Serve's documentation shows for model serving: one
deployment holding the session, `@serve.batch` batching requests (max_batch_size,
batch_wait_timeout_s), requests reaching it through Ray's HTTP proxy.

The harness runs it in a virtual environment of its own (Ray pins its own web stack), with Ray
given the server's one core: Ray's own processes (GCS, raylet, the proxy) share it.

    PEER_ONNX=model.onnx PEER_SPEC=spec.json python loadtest/peers/rayserve_ort.py --port 3006
"""

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import ray
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

spec = json.loads(Path(os.environ["PEER_SPEC"]).read_text())
SIZE = (spec["input"]["width"], spec["input"]["height"])
MODE = "L" if spec["input"]["channels"] == 1 else "RGB"
MEAN = np.array(spec["input"]["mean"], np.float32).reshape(-1, 1, 1)
STD = np.array(spec["input"]["std"], np.float32).reshape(-1, 1, 1)
LABELS = spec["labels"]


@serve.deployment(max_ongoing_requests=256)
class Classifier:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "1"))
        self.session = ort.InferenceSession(
            os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def predict(self, images: list[np.ndarray]) -> list[dict]:
        logits = self.session.run(None, {self.input_name: np.stack(images)})[0]
        e = np.exp(logits - logits.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        return [
            {
                "results": [
                    {
                        "predictions": [
                            {"label": LABELS[i], "index": int(i), "probability": float(row[i])}
                            for i in np.argsort(-row)[:5]
                        ]
                    }
                ]
            }
            for row in p
        ]

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse({"ok": True})
        form = await request.form()
        img = Image.open(io.BytesIO(await form["images"].read())).convert(MODE).resize(SIZE)
        x = np.asarray(img, np.float32) / 255.0
        x = ((x[None] if x.ndim == 2 else x.transpose(2, 0, 1)) - MEAN) / STD
        return JSONResponse(await self.predict(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3006)
    args = parser.parse_args()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port, "access_log": False})
    serve.run(Classifier.bind(), route_prefix="/", name="lenet5")
    while True:  # the driver keeps the application alive
        time.sleep(3600)


if __name__ == "__main__":
    main()
