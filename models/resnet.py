"""ResNet (He et al., 2016): basic blocks (18, 34, CIFAR-style 20) and bottlenecks (50).

Every block adds its input back (the skip connection); where the shape changes, the shortcut
is a 1x1 strided projection with BN (the paper's option B).
"""

from __future__ import annotations

import torch
from torch import nn

from convserve.models._registry import register_model
from convserve.models.layers import conv1x1, conv3x3, is_small


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, ch, stride)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = conv3x3(ch, ch)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, ch * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))  # the skip connection


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_ch, ch)
        self.bn1 = nn.BatchNorm2d(ch)
        # Deviation (as torchvision's "v1.5"): the stride sits on the 3x3, not the first 1x1;
        # same parameters, about 0.5 point better on ImageNet.
        self.conv2 = conv3x3(ch, ch, stride)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = conv1x1(ch, ch * self.expansion)
        self.bn3 = nn.BatchNorm2d(ch * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, ch * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))  # the skip connection


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    classifier_name = "fc"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: list[int],
        widths: list[int],
        *,
        in_channels: int = 3,
        input_size: int = 224,
        num_classes: int = 1000,
        cifar_stem: bool | None = None,  # None: by input size
    ) -> None:
        super().__init__()
        if cifar_stem if cifar_stem is not None else is_small(input_size):
            # CIFAR-style stem (the paper's section 4.2): 3x3/1, no max-pool, full resolution.
            self.stem = nn.Sequential(
                conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )  # N x 64 x 56 x 56 (224 px)
        stages = []
        in_ch = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1  # each later stage halves the map
                blocks.append(block(in_ch, width, stride))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)  # N x 512*expansion x 7 x 7 (224 px)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)  # N x 512*expansion

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # N x num_classes logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


IMAGENET_WIDTHS = [64, 128, 256, 512]


@register_model
def resnet18(*, in_channels: int = 3, input_size: int = 224, num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], IMAGENET_WIDTHS, in_channels=in_channels,
                  input_size=input_size, num_classes=num_classes)  # fmt: skip


@register_model
def resnet34(*, in_channels: int = 3, input_size: int = 224, num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], IMAGENET_WIDTHS, in_channels=in_channels,
                  input_size=input_size, num_classes=num_classes)  # fmt: skip


@register_model
def resnet50(*, in_channels: int = 3, input_size: int = 224, num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], IMAGENET_WIDTHS, in_channels=in_channels,
                  input_size=input_size, num_classes=num_classes)  # fmt: skip


@register_model
def resnet20(*, in_channels: int = 1, input_size: int = 28, num_classes: int = 10) -> ResNet:
    """The CIFAR ResNet-20 (3 stages of 3 basic blocks, 16-32-64 filters, 0.27 M parameters).
    Deviation: projection shortcuts (option B) where the paper's CIFAR nets pad with zeros."""
    return ResNet(BasicBlock, [3, 3, 3], [16, 32, 64], in_channels=in_channels,
                  input_size=input_size, num_classes=num_classes, cifar_stem=True)  # fmt: skip
