"""Peer 3: LitServe with ONNX Runtime, as LitServe's documentation shows: a LitAPI with
setup / decode_request / batch / predict / encode_response, dynamic batching on.

    PEER_ONNX=model.onnx PEER_SPEC=spec.json \
        python -m convserve.loadtest.peers.litserve_ort --port 3003
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import numpy as np

from convserve.loadtest.peers.common import answer, spec_from_env, to_batch
from convserve.runtime import SessionConfig, make_session


class OrtClassifier(ls.LitAPI):
    def setup(self, device: str) -> None:
        threads = SessionConfig(intra_op_threads=int(os.environ.get("PEER_THREADS", "1")))
        self.session = make_session(os.environ["PEER_ONNX"], threads)
        self.input_name = self.session.get_inputs()[0].name
        # Not `self.spec`: LitAPI keeps its API spec (OpenAI, ...) there.
        self.model_spec = spec_from_env()

    def decode_request(self, request) -> np.ndarray:  # noqa: ANN001 - the form LitServe passes
        return to_batch([request["images"].file.read()], self.model_spec)[0]

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.session.run(None, {self.input_name: x})[0])
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        return answer(probabilities[None], self.model_spec, [None])


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
