"""Plain BentoML 1.4 with the PyTorch model, as its documentation shows: one service class, the
TorchScript model loaded in __init__, an adaptive-batching (batchable) API over PIL images.

    PEER_TORCHSCRIPT=model.pt PEER_SPEC=spec.json \\
        bentoml serve convserve.loadtest.peers.bentoml_torch:TorchClassifier

Each request carries one image in an `images` upload; BentoML batches requests along the first
axis (`batchable=True`, its image-classification pattern) and decodes inside the batch, as its
IO descriptors do.
"""

import json
import os
from pathlib import Path

import bentoml
import numpy as np
from PIL.Image import Image

spec = json.loads(Path(os.environ["PEER_SPEC"]).read_text())
SIZE = (spec["input"]["width"], spec["input"]["height"])
MODE = "L" if spec["input"]["channels"] == 1 else "RGB"
LABELS = spec["labels"]


# Access log off, as for every server in the benchmark: the stacks are compared, not logging.
@bentoml.service(
    name="bentoml-torch", workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}}
)
class TorchClassifier:
    def __init__(self) -> None:
        import torch

        torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
        self.torch = torch
        self.model = torch.jit.load(os.environ["PEER_TORCHSCRIPT"]).eval()
        self.mean = torch.tensor(spec["input"]["mean"]).reshape(1, -1, 1, 1)
        self.std = torch.tensor(spec["input"]["std"]).reshape(1, -1, 1, 1)

    @bentoml.api(route="/classify", batchable=True, max_batch_size=128, max_latency_ms=2000)
    def classify(self, images: list[Image]) -> list[dict]:
        torch = self.torch
        arrays = [np.asarray(img.convert(MODE).resize(SIZE), np.float32) / 255.0 for img in images]
        x = torch.from_numpy(np.stack(arrays))
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        with torch.inference_mode():
            p = torch.softmax(self.model((x - self.mean) / self.std), dim=1)
        scores, indices = p.topk(5, dim=1)
        # One answer per request, shaped like convserve's single-image answer.
        return [
            {
                "results": [
                    {
                        "predictions": [
                            {"label": LABELS[i], "index": int(i), "probability": float(s)}
                            for i, s in zip(row_i.tolist(), row_s.tolist(), strict=True)
                        ]
                    }
                ]
            }
            for row_i, row_s in zip(indices, scores, strict=True)
        ]
