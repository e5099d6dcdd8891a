"""LeNet-5 (LeCun et al., 1998), in the form of the seed: conv 5x5 -> max-pool 2 -> conv 5x5 ->
max-pool 2 -> FC -> FC -> classes.

Deviations from the paper, each deliberate:
- ReLU instead of scaled tanh, and max- instead of average-pooling with trainable coefficients
  (as the seed specifies); both train faster and better on CPU budgets.
- C3 is fully connected to S2's maps (the paper's sparse connection table was a compute saving).
- The output layer is a plain linear classifier (softmax at inference) instead of RBF units.
"""

from __future__ import annotations

import torch
from torch import nn

from convserve.models._registry import register_model


def _conv_out(size: int, kernel: int) -> int:
    return size - kernel + 1  # 'valid' convolution, stride 1


class LeNet5(nn.Module):
    # The layer transfer learning re-initializes for new classes (timm's `classifier`).
    classifier_name = "head"

    def __init__(
        self,
        *,
        in_channels: int = 1,
        input_size: int = 28,
        filters: tuple[int, int] = (6, 16),
        fc: tuple[int, int] = (120, 84),
        num_classes: int = 10,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        s = _conv_out(input_size, kernel_size) // 2
        s = _conv_out(s, kernel_size) // 2
        if s < 1:
            raise ValueError(f"input_size {input_size} is too small for LeNet-5")
        self.conv1 = nn.Conv2d(in_channels, filters[0], kernel_size)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(filters[0], filters[1], kernel_size)
        self.pool2 = nn.MaxPool2d(2)
        self.fc3 = nn.Linear(filters[1] * s * s, fc[0])
        self.fc4 = nn.Linear(fc[0], fc[1])
        self.head = nn.Linear(fc[1], num_classes)
        self.act = nn.ReLU(inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # N x C x 32 x 32 (seed) or N x 1 x 28 x 28 (Fashion-MNIST)
        x = self.pool1(self.act(self.conv1(x)))  # N x f0 x 14 x 14 (seed)
        x = self.pool2(self.act(self.conv2(x)))  # N x f1 x 5 x 5 (seed)
        return torch.flatten(x, 1)  # N x (f1 * 5 * 5)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc3(x))
        x = self.act(self.fc4(x))
        return self.head(x)  # N x num_classes logits; softmax is applied by the consumer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def summary_layers(self) -> list[tuple[str, nn.Module]]:
        """The layers of the classic LeNet-5 table, named as the literature names them."""
        return [
            ("CONV1", self.conv1),
            ("POOL1", self.pool1),
            ("CONV2", self.conv2),
            ("POOL2", self.pool2),
            ("FC3", self.fc3),
            ("FC4", self.fc4),
            ("softmax", self.head),
        ]


@register_model
def lenet5(
    *,
    in_channels: int = 1,
    input_size: int = 28,
    filters: tuple[int, int] = (6, 16),
    fc: tuple[int, int] = (120, 84),
    num_classes: int = 10,
) -> LeNet5:
    return LeNet5(
        in_channels=in_channels,
        input_size=input_size,
        filters=(filters[0], filters[1]),
        fc=(fc[0], fc[1]),
        num_classes=num_classes,
    )
