"""VGG (Simonyan & Zisserman, 2015): configurations A (VGG-11) and D (VGG-16)."""

from __future__ import annotations

import torch
from torch import nn

from convserve.models._registry import register_model
from convserve.models.layers import is_small

# Filters per 3x3 conv; "M" is a 2x2 max-pool.
CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    classifier_name = "classifier.6"  # the last Linear of the classifier Sequential

    def __init__(
        self,
        config: str,
        *,
        in_channels: int = 3,
        input_size: int = 224,
        num_classes: int = 1000,
        batch_norm: bool = False,
        width: float = 1.0,
        hidden: int | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        small = is_small(input_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in CONFIGS[config]:
            if item == "M":
                # Deviation for small inputs: ceil_mode keeps 28 px alive through five pools
                # (28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of reaching zero.
                layers.append(nn.MaxPool2d(2, ceil_mode=small))
                continue
            out = max(8, round(int(item) * width))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:  # not in the paper (it predates BN); an option, off by default
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)  # N x 512 x 7 x 7 (224 px)
        # Deviation for small inputs: a 1x1 map and a 512-wide classifier (CIFAR-style VGG)
        # instead of 7x7 and 4096, which would be 90 % of the weights for a 1x1 feature map.
        pooled = 1 if small else 7
        hidden = hidden or (512 if small else 4096)
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        self.classifier = nn.Sequential(
            nn.Linear(channels * pooled * pooled, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)  # N x 25088 (224 px)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)  # N x num_classes logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def vgg11(
    *,
    in_channels: int = 3,
    input_size: int = 224,
    num_classes: int = 1000,
    batch_norm: bool = False,
    width: float = 1.0,
) -> VGG:
    return VGG("A", in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                batch_norm=batch_norm, width=width)  # fmt: skip


@register_model
def vgg16(
    *,
    in_channels: int = 3,
    input_size: int = 224,
    num_classes: int = 1000,
    batch_norm: bool = False,
    width: float = 1.0,
) -> VGG:
    return VGG("D", in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                batch_norm=batch_norm, width=width)  # fmt: skip
