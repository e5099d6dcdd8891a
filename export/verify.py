"""Numeric parity between the PyTorch checkpoint and its ONNX export, on real test images of
the dataset the model was trained on (test scenes for a detector, photos for an ImageNet
network), preprocessed exactly as the service preprocesses: every output within the stated
tolerance, and for a classifier the same top-1."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from convserve.export.onnx_export import exported_module
from convserve.models.checkpoint import load_checkpoint
from convserve.models.data import load_split
from convserve.preprocess import from_pixels
from convserve.runtime import OnnxModel, make_session
from convserve.spec import ModelSpec

# Stated tolerance: float32 kernels of two runtimes agree to ~1e-6 on logits of this size.
MAX_ABS_LOGIT_DIFF = 1e-4
# A detector's boxes are in pixels (up to the input size, 128): the same float32 agreement,
# relative to that scale.
MAX_ABS_BOX_DIFF = 2e-3


@dataclass(frozen=True)
class ParityReport:
    images: int
    top1_agreement: float  # classifiers: fraction of images whose argmax agrees (else 1)
    max_abs_diff: float  # over every output but boxes
    max_box_diff: float = 0.0  # detectors: over the boxes, in pixels

    @property
    def passed(self) -> bool:
        return (
            self.top1_agreement == 1.0
            and self.max_abs_diff <= MAX_ABS_LOGIT_DIFF
            and self.max_box_diff <= MAX_ABS_BOX_DIFF
        )


def labelled_test_set(
    spec: ModelSpec, count: int | None = None, data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test images of the spec's dataset as N x C x H x W model input, and
    their labels."""
    shape = {"channels": spec.input.channels, "size": spec.input.height}
    test = load_split(spec.dataset, "test", **shape, data_dir=data_dir)
    return from_pixels(test.images[:count], spec.input), test.labels[:count]


def known_pixels(spec: ModelSpec, *, count: int = 16, data_dir: str | None = None) -> np.ndarray:
    """The start-up self-test's images: the first `count` test images of the spec's dataset,
    raw uint8 pixels (N x H x W x C), so the self-test exercises the serving preprocessing."""
    shape = {"channels": spec.input.channels, "size": spec.input.height}
    return load_split(spec.dataset, "test", **shape, data_dir=data_dir).images[:count]


def check_parity(
    checkpoint: str | Path,
    onnx_path: str | Path,
    *,
    images: int = 1000,
    batch_size: int = 250,
    data_dir: str | None = None,
) -> ParityReport:
    model, spec = load_checkpoint(checkpoint)
    module, names = exported_module(model)
    x, _ = labelled_test_set(spec, images, data_dir)
    onnx = OnnxModel(make_session(onnx_path))
    agree, max_diff, box_diff = 0, 0.0, 0.0
    batches = tqdm(range(0, len(x), batch_size), desc="parity", unit="batch", disable=None)
    for i in batches:
        xb = x[i : i + batch_size]
        with torch.no_grad():
            out = module(torch.from_numpy(xb))
        expected = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
        actual = onnx.run(xb)
        for name, e, a in zip(names, expected, actual, strict=True):
            diff = float(np.abs(e - a).max())
            if name == "boxes":
                box_diff = max(box_diff, diff)
            else:
                max_diff = max(max_diff, diff)
        if spec.task == "classify":
            agree += int((expected[0].argmax(1) == actual[0].argmax(1)).sum())
        else:
            agree += len(xb)
    return ParityReport(
        images=len(x), top1_agreement=agree / len(x), max_abs_diff=max_diff, max_box_diff=box_diff
    )
