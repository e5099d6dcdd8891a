"""Numeric parity between the PyTorch checkpoint and its ONNX export, on real test images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from models.data import load_fashion_mnist
from models.spec import ModelSpec
from models.train import load_checkpoint
from service.imaging import normalize_pixels, to_inputs

# Stated tolerance: float32 kernels of two runtimes agree to ~1e-6 on logits of this size.
MAX_ABS_LOGIT_DIFF = 1e-4


@dataclass(frozen=True)
class ParityReport:
    images: int
    top1_agreement: float  # fraction of images whose argmax agrees
    max_abs_diff: float

    @property
    def passed(self) -> bool:
        return self.top1_agreement == 1.0 and self.max_abs_diff <= MAX_ABS_LOGIT_DIFF


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 N x H x W (grey) -> float32 N x 1 x H x W, exactly as training normalizes."""
    return normalize_pixels(images[:, None], mean, std)


def known_inputs(spec: ModelSpec, *, count: int = 16, data_dir: str | None = None) -> np.ndarray:
    """The first `count` Fashion-MNIST test images, preprocessed for `spec` exactly as the
    service does (any channels and size): the inputs of the start-up self-test."""
    test = load_fashion_mnist("test", data_dir)
    return to_inputs(test.images[:count], spec.input)


def check_parity(
    checkpoint: str | Path,
    onnx_path: str | Path,
    *,
    images: int = 1000,
    batch_size: int = 250,
    data_dir: str | None = None,
) -> ParityReport:
    model, spec = load_checkpoint(checkpoint)
    test = load_fashion_mnist("test", data_dir)
    x = normalize(test.images[:images], spec.input.mean, spec.input.std)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    agree, max_diff = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        with torch.no_grad():
            expected = model(torch.from_numpy(xb)).numpy()
        (actual,) = session.run(None, {input_name: xb})
        agree += int((expected.argmax(1) == actual.argmax(1)).sum())
        max_diff = max(max_diff, float(np.abs(expected - actual).max()))
    return ParityReport(images=len(x), top1_agreement=agree / len(x), max_abs_diff=max_diff)
