"""Peer 2: plain BentoML 1.4 with the PyTorch model, as its documentation shows: one service
class, the model loaded in __init__, an adaptive-batching (batchable) API.

    PEER_CHECKPOINT=... PEER_SPEC=... \
        bentoml serve convserve.loadtest.peers.bentoml_torch:TorchClassifier

Each request carries one image in an `images` upload, BentoML batches requests along the
first axis (`batchable=True`, its image-classification pattern); decoding happens inside
the batch, as BentoML's IO descriptors do it. Single-image requests only.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
from PIL.Image import Image

from convserve.loadtest.peers.common import answer, spec_from_env


# Access log off, as for every server in the benchmark: the stacks are compared, not logging.
@bentoml.service(
    name="bentoml-torch",
    workers=1,
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},
)
class TorchClassifier:
    def __init__(self) -> None:
        import torch

        from convserve.models.checkpoint import load_checkpoint

        torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
        self.torch = torch
        self.model, _ = load_checkpoint(os.environ["PEER_CHECKPOINT"])
        self.spec = spec_from_env()

    @bentoml.api(route="/classify", batchable=True, max_batch_size=128, max_latency_ms=2000)
    def classify(self, images: list[Image]) -> list[dict]:
        from convserve.preprocess import image_to_input

        batch = np.stack([image_to_input(img, self.spec.input) for img in images])
        with self.torch.inference_mode():
            probabilities = self.torch.softmax(self.model(self.torch.from_numpy(batch)), 1)
        full = answer(probabilities.numpy(), self.spec, [None] * len(images))
        # One answer per request, shaped like convserve's single-image answer.
        return [{"model": full["model"], "results": [r]} for r in full["results"]]
