"""Small building blocks shared by the architecture families."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


class SamePad(nn.Module):
    """TensorFlow's 'SAME' padding: pad so that the output is ceil(input / stride), the odd
    pixel after (bottom, right). Weights ported from TensorFlow (EfficientNet-Lite) only match
    with it: PyTorch's symmetric padding shifts every strided convolution by half a pixel."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]  # static at export: only the batch axis is dynamic
        pad_h = max((math.ceil(h / self.stride) - 1) * self.stride + self.kernel - h, 0)
        pad_w = max((math.ceil(w / self.stride) - 1) * self.stride + self.kernel - w, 0)
        if not (pad_h or pad_w):
            return x
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
