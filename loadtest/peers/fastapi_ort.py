"""Peer: the FastAPI + ONNX Runtime server users write themselves, in some twenty lines:
uvicorn, one async route taking UploadFile, Pillow, one ONNX Runtime session with one
thread, no batching. The baseline convserve has to beat.

    PEER_ONNX=model.onnx PEER_SPEC=spec.json \\
        uvicorn convserve.loadtest.peers.fastapi_ort:app --port 3002 --log-level warning

Same decoding and preprocessing as every server here, so only the serving stack differs.
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, UploadFile

from convserve.loadtest.peers.common import answer, spec_from_env
from convserve.preprocess import from_bytes
from convserve.runtime import OnnxClassifier, SessionConfig, make_session, softmax

spec = spec_from_env()
threads = SessionConfig(intra_op_threads=int(os.environ.get("PEER_THREADS", "1")))
model = OnnxClassifier(make_session(os.environ["PEER_ONNX"], threads))
app = FastAPI()


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.post("/classify")
async def classify(images: list[UploadFile]) -> dict:
    batch = np.stack([from_bytes(await f.read(), spec.input) for f in images])
    return answer(softmax(model.logits(batch)), spec, [f.filename for f in images])
