"""The contract a trained model carries with it: architecture, dataset, input, normalization,
labels.

Written beside the weights (checkpoint), inside the ONNX metadata and into the model store,
so preprocessing is read, never guessed, at serving time, and export calibrates and checks
parity on the data the model was trained on. Torch-free: the service imports it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Per-channel statistics of the Fashion-MNIST training set (pixel values scaled to [0, 1]).
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)

ONNX_METADATA_KEY = "convserve.spec"
FASHION_MNIST = "fashion-mnist"
DIGITS = "digits"
# Short names for the model store: `fashion-lenet5`, `digits-lenet5`, `<folder>-lenet5`.
_STORE_PREFIX = {FASHION_MNIST: "fashion", DIGITS: "digits"}


class InputSpec(BaseModel):
    """What one input image must look like once preprocessed: NCHW float32, normalized."""

    model_config = ConfigDict(frozen=True)

    channels: int = Field(ge=1, description="1 (grey) or 3 (RGB)")
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    mean: tuple[float, ...] = Field(description="per channel, on pixel values scaled to [0, 1]")
    std: tuple[float, ...]

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.channels, self.height, self.width)


class ModelSpec(BaseModel):
    """Everything needed to rebuild, preprocess for and label a trained model."""

    model_config = ConfigDict(frozen=True)

    architecture: str = Field(description="registry name, e.g. 'lenet5'")
    # Checkpoints written before the field existed were all trained on Fashion-MNIST.
    dataset: str = Field(
        FASHION_MNIST,
        description="what it was trained on: 'fashion-mnist', 'digits', or a folder-per-class root",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="builder arguments")
    input: InputSpec
    labels: tuple[str, ...]
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def store_name(self) -> str:
        """The model store name this model is saved under unless one is given."""
        prefix = _STORE_PREFIX.get(self.dataset)
        if prefix is None:  # a folder: its last path component, as a store-safe slug
            tail = self.dataset.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
            prefix = re.sub(r"[^a-z0-9]+", "-", tail.lower()).strip("-") or "images"
        return f"{prefix}-{self.architecture}"
