"""LitServe with ONNX Runtime, as LitServe's documentation shows: a LitAPI with setup /
decode_request / batch / predict / unbatch / encode_response, dynamic batching on.

    PEER_ONNX=model.onnx PEER_SPEC=spec.json python -m convserve.loadtest.peers.litserve_ort
"""

import argparse
import io
import json
import os
from pathlib import Path

import litserve as ls
import numpy as np
import onnxruntime as ort
from PIL import Image

spec = json.loads(Path(os.environ["PEER_SPEC"]).read_text())
SIZE = (spec["input"]["width"], spec["input"]["height"])
MODE = "L" if spec["input"]["channels"] == 1 else "RGB"
MEAN = np.array(spec["input"]["mean"], np.float32).reshape(-1, 1, 1)
STD = np.array(spec["input"]["std"], np.float32).reshape(-1, 1, 1)
LABELS = spec["labels"]


class OrtClassifier(ls.LitAPI):
    def setup(self, device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "1"))
        self.session = ort.InferenceSession(
            os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request) -> np.ndarray:  # noqa: ANN001 - the form LitServe passes
        img = Image.open(io.BytesIO(request["images"].file.read())).convert(MODE).resize(SIZE)
        x = np.asarray(img, np.float32) / 255.0
        return ((x[None] if x.ndim == 2 else x.transpose(2, 0, 1)) - MEAN) / STD

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.session.run(None, {self.input_name: x})[0])
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, p: np.ndarray) -> dict:
        return {
            "results": [
                {
                    "predictions": [
                        {"label": LABELS[i], "index": int(i), "probability": float(p[i])}
                        for i in np.argsort(-p)[:5]
                    ]
                }
            ]
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3003)
    args = parser.parse_args()
    api = OrtClassifier(max_batch_size=64, batch_timeout=0.005, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    # Access log off, as for every server in the benchmark.
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
