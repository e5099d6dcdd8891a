"""AlexNet (Krizhevsky et al., 2012) in its common single-stream form (as torchvision has it:
64-192-384-256-256 filters, no local response normalization, one GPU's worth of channels)."""

from __future__ import annotations

import torch
from torch import nn

from convserve.models._registry import register_model
from convserve.models.layers import is_small


class AlexNet(nn.Module):
    classifier_name = "classifier.6"  # the last Linear of the classifier Sequential

    def __init__(
        self,
        *,
        in_channels: int = 3,
        input_size: int = 224,
        num_classes: int = 1000,
        width: float = 1.0,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (max(8, round(c * width)) for c in (64, 192, 384, 256, 256))
        small = is_small(input_size)
        if small:
            # Deviation: an 11x11/4 stem and 3x3/2 pools would leave 28 px inputs at 1x1; a
            # 3x3/1 stem and 2x2 pools keep 28 -> 14 -> 7 -> 3.
            stem = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1)
            pool = lambda: nn.MaxPool2d(2)  # noqa: E731
        else:
            stem = nn.Conv2d(in_channels, c1, 11, stride=4, padding=2)
            pool = lambda: nn.MaxPool2d(3, stride=2)  # noqa: E731 - overlapping pooling
        self.features = nn.Sequential(
            stem, nn.ReLU(inplace=True), pool(),                     # N x 64 x 27 x 27 (224)
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), pool(),  # N x 192 x 13 x 13
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), pool(),  # N x 256 x 6 x 6
        )  # fmt: skip
        pooled = 2 if small else 6  # small inputs reach 3x3 (28 px) or 4x4 (32 px) here
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c5 * pooled * pooled, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)  # N x 9216 (224 px)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)  # N x num_classes logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def alexnet(
    *,
    in_channels: int = 3,
    input_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    hidden: int = 4096,
    dropout: float = 0.5,
) -> AlexNet:
    return AlexNet(
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        width=width,
        hidden=hidden,
        dropout=dropout,
    )
