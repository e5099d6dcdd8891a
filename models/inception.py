"""GoogLeNet / Inception v1 (Szegedy et al., 2015): Inception modules whose 3x3 and 5x5
branches are preceded by 1x1 reductions; no auxiliary classifiers (inference-time network)."""

from __future__ import annotations

import torch
from torch import nn

from convserve.models._registry import register_model
from convserve.models.layers import conv_bn_relu, is_small

# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per module, the paper's Table 1.
MODULES: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class Inception(nn.Module):
    def __init__(
        self, in_ch: int, c1: int, r3: int, c3: int, r5: int, c5: int, pp: int, k5: int = 5
    ) -> None:
        super().__init__()
        self.b1 = conv_bn_relu(in_ch, c1, 1)
        self.b3 = nn.Sequential(conv_bn_relu(in_ch, r3, 1), conv_bn_relu(r3, c3, 3))
        # k5 = 5: a true 5x5, as in the paper; torchvision's GoogLeNet has a 3x3 here.
        self.b5 = nn.Sequential(conv_bn_relu(in_ch, r5, 1), conv_bn_relu(r5, c5, k5))
        self.bp = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), conv_bn_relu(in_ch, pp, 1)
        )
        self.out_channels = c1 + c3 + c5 + pp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


class GoogLeNet(nn.Module):
    """Deviations: batch norm after every convolution in place of local response
    normalization (as torchvision); CIFAR-style stem for inputs under 64 px."""

    classifier_name = "fc"

    def __init__(
        self,
        *,
        in_channels: int = 3,
        input_size: int = 224,
        num_classes: int = 1000,
        width: float = 1.0,
        dropout: float = 0.4,
        branch5_kernel: int = 5,
        stem_pool: bool = False,
    ) -> None:
        super().__init__()

        def w(c: int) -> int:
            return max(4, round(c * width))

        if is_small(input_size):
            self.stem = conv_bn_relu(in_channels, w(192), 3)  # N x 192 x 28 x 28 (28 px)
            if stem_pool:  # the modules then run at 14/7/4 px, a quarter of the compute
                self.stem = nn.Sequential(self.stem, nn.MaxPool2d(2))  # N x 192 x 14 x 14
        else:
            self.stem = nn.Sequential(
                conv_bn_relu(in_channels, w(64), 7, stride=2),
                nn.MaxPool2d(3, stride=2, ceil_mode=True),
                conv_bn_relu(w(64), w(64), 1),
                conv_bn_relu(w(64), w(192), 3),
                nn.MaxPool2d(3, stride=2, ceil_mode=True),
            )  # N x 192 x 28 x 28 (224 px)
        blocks: list[nn.Module] = []
        channels = w(192)
        for name, spec in MODULES.items():
            if name in ("4a", "5a"):
                blocks.append(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True))
            module = Inception(channels, *(w(c) for c in spec), k5=branch5_kernel)
            blocks.append(module)
            channels = module.out_channels
        self.blocks = nn.Sequential(*blocks)  # N x 1024 x 7 x 7 (224 px)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)  # N x 1024

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))  # N x num_classes logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def googlenet(
    *,
    in_channels: int = 3,
    input_size: int = 224,
    num_classes: int = 1000,
    width: float = 1.0,
    branch5_kernel: int = 5,
) -> GoogLeNet:
    """7.01 M parameters at 224 px / 1000 classes with the paper's 5x5 branches; 6.62 M with
    branch5_kernel=3, torchvision's layout."""
    return GoogLeNet(
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        width=width,
        branch5_kernel=branch5_kernel,
    )


@register_model
def inception_small(
    *, in_channels: int = 1, input_size: int = 28, num_classes: int = 10, width: float = 0.25
) -> GoogLeNet:
    """GoogLeNet's nine modules at a quarter of the width, for 28-32 px: a CIFAR-style 3x3
    stem, then a 2x2 max-pool so that the modules see 14/7/4 px (28 px input), as GoogLeNet's
    see 28/14/7 of its 224 px input after the stem's 8x reduction."""
    return GoogLeNet(
        in_channels=in_channels, input_size=input_size, num_classes=num_classes, width=width,
        stem_pool=True,
    )  # fmt: skip
