"""A YOLO-style detector (Redmon et al., 2016; anchors as in YOLOv2, 2017): one forward pass of a
fully convolutional network predicts every cell of an S x S grid at once (the convolutional
implementation of sliding windows). Each cell has B anchor boxes; each anchor predicts 5 + C
numbers: its box (x, y offsets in the cell, width and height relative to the anchor), whether an
object is there, and the object's class.

    raw output      N x S x S x B x (5 + C)   (what the loss trains)
    decoded output  boxes  N x (S*S*B) x 4   x1, y1, x2, y2 in input pixels
                    scores N x (S*S*B) x C   objectness x class probability

The backbone is the zoo's blocks (conv-BN-ReLU, ResNet basic blocks), halving the map four
times: a 128 px input gives an 8 x 8 grid of 16 px cells. Non-max suppression is not in the
graph: it runs per request with the request's thresholds (`convserve.tasks.detect`).
"""

from __future__ import annotations

import torch
from torch import nn

from convserve.models._registry import register_model
from convserve.models.layers import conv_bn_relu
from convserve.models.resnet import BasicBlock
from convserve.spec import TaskName

# Box sizes are exp(t) x anchor: a bound keeps an untrained net's exp finite in float16 too.
MAX_LOG_SCALE = 4.0


class YoloDetector(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int = 1,
        input_size: int = 128,
        num_classes: int = 10,
        anchors: tuple[tuple[float, float], ...] = ((24.0, 30.0), (38.0, 48.0), (56.0, 62.0)),
        widths: tuple[int, ...] = (16, 32, 64, 128),
    ) -> None:
        super().__init__()
        self.num_classes, self.stride = num_classes, 2 ** len(widths)
        self.grid = input_size // self.stride
        layers: list[nn.Module] = []
        in_ch = in_channels
        for i, width in enumerate(widths):
            layers.append(conv_bn_relu(in_ch, width, 3, stride=2))  # halves the map
            if i >= len(widths) - 2:  # the last two scales, where objects span cells: a block
                layers.append(BasicBlock(width, width))
            in_ch = width
        # 128 px: N x 16 x 64 x 64 -> 32 x 32 x 32 -> 64 x 16 x 16 -> 128 x 8 x 8 (62 M MACs)
        self.backbone = nn.Sequential(*layers)
        self.neck = conv_bn_relu(in_ch, in_ch, 3)  # N x 128 x S x S
        self.head = nn.Conv2d(in_ch, len(anchors) * (5 + num_classes), 1)  # N x B(5+C) x S x S
        self.anchors: torch.Tensor
        self.cell_x: torch.Tensor
        self.cell_y: torch.Tensor
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))  # B x 2, px
        cells = torch.arange(self.grid, dtype=torch.float32)
        # Cell offsets, S x S x 1: column (x) and row (y) of each cell.
        self.register_buffer("cell_x", cells.view(1, -1, 1).expand(self.grid, -1, 1).clone())
        self.register_buffer("cell_y", cells.view(-1, 1, 1).expand(-1, self.grid, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.neck(self.backbone(x)))  # N x B(5+C) x S x S
        n, _, s, _ = out.shape
        return out.view(n, -1, 5 + self.num_classes, s, s).permute(
            0, 3, 4, 1, 2
        )  # N x S x S x B x (5+C)

    def decode(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw predictions -> boxes (x1, y1, x2, y2, input pixels) and per-class scores."""
        n = raw.shape[0]
        cx = (torch.sigmoid(raw[..., 0]) + self.cell_x) * self.stride  # N x S x S x B
        cy = (torch.sigmoid(raw[..., 1]) + self.cell_y) * self.stride
        w = self.anchors[:, 0] * torch.exp(raw[..., 2].clamp(max=MAX_LOG_SCALE))
        h = self.anchors[:, 1] * torch.exp(raw[..., 3].clamp(max=MAX_LOG_SCALE))
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        scores = torch.sigmoid(raw[..., 4:5]) * torch.softmax(raw[..., 5:], dim=-1)
        return boxes.reshape(n, -1, 4), scores.reshape(n, -1, self.num_classes)

    def for_export(self) -> tuple[nn.Module, list[str]]:
        """What ONNX export writes: the decoding network, and its outputs' names."""
        return Decoded(self), ["boxes", "scores"]


class Decoded(nn.Module):
    """The detector with its grid decoded, as it is served."""

    def __init__(self, detector: YoloDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.decode(self.detector(x))


@register_model(task=TaskName.DETECT)
def yolo_fashion(
    *,
    in_channels: int = 1,
    input_size: int = 128,
    num_classes: int = 10,
    anchors: tuple[tuple[float, float], ...] = ((24.0, 30.0), (38.0, 48.0), (56.0, 62.0)),
) -> YoloDetector:
    """An 8 x 8 grid over 128 px scenes, 3 anchors per cell (k-means on the training boxes)."""
    return YoloDetector(
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        anchors=tuple((float(w), float(h)) for w, h in anchors),
    )
