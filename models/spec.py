"""The contract a trained model carries with it: architecture, input, normalization, labels.

Written beside the weights (checkpoint), inside the ONNX metadata and into the model store,
so preprocessing is read, never guessed, at serving time. Torch-free: the service imports it.
"""

from __future__ import annotations

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
    kwargs: dict[str, Any] = Field(default_factory=dict, description="builder arguments")
    input: InputSpec
    labels: tuple[str, ...]
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)
