"""An embedding network for one-shot verification (a Siamese network's one twin: both images
of a pair go through the same weights): 28 px grey in, a unit-length vector out. Trained with
the triplet loss (`siamese.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convserve.models._registry import register_model
from convserve.models.layers import conv_bn_relu
from convserve.models.resnet import BasicBlock


class EmbeddingNet(nn.Module):
    """28 x 28 grey -> a unit-length embedding (the zoo's conv-BN-ReLU and residual blocks)."""

    def __init__(
        self, *, in_channels: int = 1, input_size: int = 28, dim: int = 64,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:  # fmt: skip
        super().__init__()
        self.dim = dim
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, w1, 3), BasicBlock(w1, w1),  # N x 16 x 28 x 28
            conv_bn_relu(w1, w2, 3, stride=2), BasicBlock(w2, w2),  # N x 32 x 14 x 14
            conv_bn_relu(w2, w3, 3, stride=2), BasicBlock(w3, w3),  # N x 64 x 7 x 7
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # N x 64 (13 M MACs per image)
        )  # fmt: skip
        self.project = nn.Linear(w3, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.features(x)), dim=1)  # N x dim, unit length

    def for_export(self) -> tuple[nn.Module, list[str]]:
        return self, ["embedding"]


@register_model(task="embed")
def siamese_fashion(*, in_channels: int = 1, input_size: int = 28, dim: int = 64) -> EmbeddingNet:
    """A 0.2 M-parameter embedding network for 28 px garments, 64-d."""
    return EmbeddingNet(in_channels=in_channels, input_size=input_size, dim=dim)
