"""Small building blocks shared by the architecture families."""

from __future__ import annotations

from torch import nn

# Below this input size the ImageNet stems (large strided kernels, early max-pools) would
# shrink a 28-32 px image to almost nothing; the families switch to CIFAR-style stems.
SMALL_INPUT = 64


def is_small(input_size: int) -> bool:
    return input_size < SMALL_INPUT


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias: BN has one) -> BN -> ReLU, 'same' padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )
