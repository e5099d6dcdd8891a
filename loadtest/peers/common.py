"""What every peer shares with convserve, so the comparison measures the serving stack only:
the same image decoding and preprocessing, the same top-k answer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from convserve.preprocess import from_bytes
from convserve.runtime import top_k
from convserve.spec import ModelSpec

TOP_K = 5


def spec_from_env() -> ModelSpec:
    return ModelSpec.model_validate_json(Path(os.environ["PEER_SPEC"]).read_text())


def to_batch(images: list[bytes], spec: ModelSpec) -> np.ndarray:
    return np.stack([from_bytes(data, spec.input) for data in images])  # N x C x H x W


def answer(probabilities: np.ndarray, spec: ModelSpec, filenames: list[str | None]) -> dict:
    indices, scores = top_k(probabilities, TOP_K)
    return {
        "model": spec.architecture,
        "results": [
            {
                "filename": name,
                "predictions": [
                    {"label": spec.labels[j], "index": int(j), "probability": float(p)}
                    for j, p in zip(row_i, row_p, strict=True)
                ],
            }
            for name, row_i, row_p in zip(filenames, indices, scores, strict=True)
        ],
    }
