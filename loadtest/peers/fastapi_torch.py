"""FastAPI + PyTorch, as users write it: the TorchScript model loaded once, a sync endpoint (so
FastAPI runs it in its thread pool), torch.inference_mode, threads = the server's cores.

    PEER_TORCHSCRIPT=model.pt PEER_SPEC=spec.json \\
        uvicorn convserve.loadtest.peers.fastapi_torch:app --port 3001 --workers 1
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

spec = json.loads(Path(os.environ["PEER_SPEC"]).read_text())
SIZE = (spec["input"]["width"], spec["input"]["height"])
MODE = "L" if spec["input"]["channels"] == 1 else "RGB"
MEAN = torch.tensor(spec["input"]["mean"]).reshape(-1, 1, 1)
STD = torch.tensor(spec["input"]["std"]).reshape(-1, 1, 1)
LABELS = spec["labels"]

torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
model = torch.jit.load(os.environ["PEER_TORCHSCRIPT"]).eval()
app = FastAPI()


@app.get("/health")
def health() -> dict:
    return {"ok": True}


def _tensor(data: bytes) -> torch.Tensor:
    img = Image.open(io.BytesIO(data)).convert(MODE).resize(SIZE)
    x = torch.from_numpy(np.asarray(img, np.float32) / 255.0)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return (x - MEAN) / STD


@app.post("/classify")
def classify(images: list[UploadFile] = File(...), top_k: int = 5) -> dict:  # noqa: B008
    batch = torch.stack([_tensor(f.file.read()) for f in images])
    with torch.inference_mode():
        p = torch.softmax(model(batch), dim=1)
    scores, indices = p.topk(top_k, dim=1)
    return {
        "results": [
            {
                "filename": f.filename,
                "predictions": [
                    {"label": LABELS[i], "index": int(i), "probability": float(s)}
                    for i, s in zip(row_i.tolist(), row_s.tolist(), strict=True)
                ],
            }
            for f, row_i, row_s in zip(images, indices, scores, strict=True)
        ]
    }
