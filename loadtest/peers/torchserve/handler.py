"""TorchServe 0.12's custom handler for the LeNet-5 (TorchScript), as its documentation shows:
BaseHandler's initialize loads the serialized model; preprocess decodes each request's image
(the raw body, as `curl -T image.png .../predictions/lenet5` sends it), inference runs the
batch TorchServe formed (batchSize / maxBatchDelay in model-config.yaml), postprocess answers
one result per request."""

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class LeNetHandler(BaseHandler):
    def initialize(self, context) -> None:  # noqa: ANN001
        super().initialize(context)
        torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
        spec = json.loads(Path(os.environ["PEER_SPEC"]).read_text())
        self.size = (spec["input"]["width"], spec["input"]["height"])
        crop = spec["input"].get("resize") == "crop"
        self.resize_to = spec["input"].get("resize_to") if crop else None
        self.mode = "L" if spec["input"]["channels"] == 1 else "RGB"
        self.mean = torch.tensor(spec["input"]["mean"]).reshape(1, -1, 1, 1)
        self.std = torch.tensor(spec["input"]["std"]).reshape(1, -1, 1, 1)
        self.labels = spec["labels"]

    def preprocess(self, data: list) -> torch.Tensor:
        arrays = []
        for row in data:
            raw = row.get("data") or row.get("body")
            img = self.resize(Image.open(io.BytesIO(raw)).convert(self.mode))
            arrays.append(np.asarray(img, np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrays))
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return (x - self.mean) / self.std

    def resize(self, img: Image.Image) -> Image.Image:
        if self.resize_to is None:
            return img.resize(self.size)
        # an ImageNet model's Resize(resize_to) + CenterCrop(size), in Pillow
        w, h = img.size
        scale = self.resize_to / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left, top = (img.width - self.size[0]) // 2, (img.height - self.size[1]) // 2
        return img.crop((left, top, left + self.size[0], top + self.size[1]))

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(self.model(x), dim=1)

    def postprocess(self, p: torch.Tensor) -> list:
        scores, indices = p.topk(5, dim=1)
        return [
            {
                "results": [
                    {
                        "predictions": [
                            {"label": self.labels[i], "index": int(i), "probability": float(s)}
                            for i, s in zip(row_i.tolist(), row_s.tolist(), strict=True)
                        ]
                    }
                ]
            }
            for row_i, row_s in zip(indices, scores, strict=True)
        ]
