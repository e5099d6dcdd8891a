"""The lean FastAPI + ONNX Runtime peer with one change: each image goes through convserve's own
preprocessing (`convserve.preprocess.from_bytes`: format sniffing, size limits, EXIF
orientation, alpha compositing). Kept as a second row, beside `fastapi_lean`, to show what that
preprocessing costs on the same stack; the one peer that calls convserve's code.

    PEER_ONNX=model.onnx PEER_SPEC=spec.json \\
        uvicorn convserve.loadtest.peers.fastapi_ort:app --port 3002 --log-level warning
"""

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, UploadFile

from convserve.preprocess import from_bytes
from convserve.spec import ModelSpec

spec = ModelSpec.model_validate_json(Path(os.environ["PEER_SPEC"]).read_text())
options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "1"))
session = ort.InferenceSession(os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name
app = FastAPI()


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.post("/classify")
async def classify(images: list[UploadFile], top_k: int = 5) -> dict:
    batch = np.stack([from_bytes(await f.read(), spec.input) for f in images])
    logits = np.asarray(session.run(None, {INPUT: batch})[0])
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    return {
        "results": [
            {
                "filename": f.filename,
                "predictions": [
                    {"label": spec.labels[i], "index": int(i), "probability": float(row[i])}
                    for i in np.argsort(-row)[:top_k]
                ],
            }
            for f, row in zip(images, p, strict=True)
        ]
    }
