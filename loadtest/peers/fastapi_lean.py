"""The FastAPI + ONNX Runtime server users write, in some twenty lines: one async route taking
UploadFile, Pillow open/convert/resize (for an ImageNet model, torchvision's Resize(256) +
CenterCrop(224) written in Pillow), numpy normalization, one session call per request.
The headline peer.

    PEER_ONNX=model.onnx PEER_SPEC=spec.json \\
        uvicorn convserve.loadtest.peers.fastapi_lean:app --port 3002 --log-level warning
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, UploadFile
from PIL import Image

spec = json.loads(Path(os.environ["PEER_SPEC"]).read_text())
SIZE = (spec["input"]["width"], spec["input"]["height"])
RESIZE_TO = spec["input"].get("resize_to") if spec["input"].get("resize") == "crop" else None
MODE = "L" if spec["input"]["channels"] == 1 else "RGB"
MEAN = np.array(spec["input"]["mean"], np.float32).reshape(-1, 1, 1)
STD = np.array(spec["input"]["std"], np.float32).reshape(-1, 1, 1)
LABELS = spec["labels"]

options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "1"))
session = ort.InferenceSession(os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name
app = FastAPI()


def resize(img: Image.Image) -> Image.Image:
    if RESIZE_TO is None:
        return img.resize(SIZE)
    # Resize(RESIZE_TO): the shorter side to RESIZE_TO; then CenterCrop(SIZE)
    w, h = img.size
    scale = RESIZE_TO / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    left, top = (img.width - SIZE[0]) // 2, (img.height - SIZE[1]) // 2
    return img.crop((left, top, left + SIZE[0], top + SIZE[1]))


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.post("/classify")
async def classify(images: list[UploadFile], top_k: int = 5) -> dict:
    results = []
    for image in images:
        img = resize(Image.open(io.BytesIO(await image.read())).convert(MODE))
        x = np.asarray(img, np.float32) / 255.0  # H x W (grey) or H x W x 3
        x = ((x[None] if x.ndim == 2 else x.transpose(2, 0, 1)) - MEAN) / STD  # C x H x W
        logits = np.asarray(session.run(None, {INPUT: x[None]})[0])[0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        best = np.argsort(-p)[:top_k]
        results.append(
            {
                "filename": image.filename,
                "predictions": [
                    {"label": LABELS[i], "index": int(i), "probability": float(p[i])} for i in best
                ],
            }
        )
    return {"results": results}
