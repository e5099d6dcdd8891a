"""Peer 1: FastAPI + PyTorch eager, as users write it themselves.

    PEER_CHECKPOINT=runs/default/best.pt PEER_SPEC=spec.json \
      uvicorn convserve.loadtest.peers.fastapi_torch:app --port 3001 --workers 1

Tuning per PyTorch's CPU inference guidance: eval mode, torch.inference_mode, intra-op threads
set to the cores given to the server (PEER_THREADS); a sync endpoint so FastAPI runs the model
in its thread pool instead of blocking the event loop.
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI, File, UploadFile

from convserve.loadtest.peers.common import answer, spec_from_env, to_batch
from convserve.models.checkpoint import load_checkpoint

torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))
model, _ = load_checkpoint(os.environ["PEER_CHECKPOINT"])
spec = spec_from_env()
app = FastAPI()


@app.get("/health")
def health() -> dict:
    return {"ok": True}


@app.post("/classify")
def classify(images: list[UploadFile] = File(...)) -> dict:  # noqa: B008 - FastAPI's idiom
    batch = to_batch([f.file.read() for f in images], spec)
    with torch.inference_mode():
        probabilities = torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()
    return answer(probabilities, spec, [f.filename for f in images])
