"""An embedding network for one-shot verification (a Siamese network's one twin: both images
of a pair go through the same weights): 28 px grey in, a unit-length vector out. Trained with
the triplet loss (`siamese.py`).

The embedding can be made of several heads on one trunk, each a unit vector trained on its own
identities (the classes, or the classes split by shape), placed side by side and scaled by
1/sqrt(heads): the whole is unit length, and its squared distance is the mean of the heads'.

A training-only decoder, not in the exported graph, can rebuild the image from its embedding:
its reconstruction cost keeps in the embedding what the garment looks like, not only which seen
class it is, which is what telling apart garments of classes never seen needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from convserve.models._registry import register_model
from convserve.models.layers import conv_bn_relu
from convserve.models.resnet import BasicBlock
from convserve.spec import TaskName


class Decoder(nn.Module):
    """dim -> 1 x 28 x 28: the embedding back to the (normalized) image, for a reconstruction
    cost during training."""

    def __init__(self, dim: int, out_channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, 64 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),  # N x 64 x 7 x 7
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),  # N x 32 x 14 x 14
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),  # N x 16 x 28 x 28
            nn.Conv2d(16, out_channels, 3, padding=1),  # N x 1 x 28 x 28
        )  # fmt: skip

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


def head_parts(embedding: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """N x dim embedding -> each head's unit vector (N x dim/heads), undoing the 1/sqrt(heads)."""
    return tuple(part * math.sqrt(heads) for part in embedding.chunk(heads, dim=1))


class Heads(nn.Module):
    """N x F features -> N x dim: `heads` linear projections, each scaled to unit length, side
    by side and divided by sqrt(heads) (so the embedding is unit length)."""

    def __init__(self, features: int, dim: int, heads: int = 1) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"an embedding of {dim} cannot be split into {heads} equal heads")
        self.heads = nn.ModuleList(nn.Linear(features, dim // heads) for _ in range(heads))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = [F.normalize(head(features), dim=1) for head in self.heads]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))  # N x dim, unit length


class Embedder(nn.Module):
    """What is exported and served: image -> unit-length embedding (the decoder stays behind)."""

    def __init__(self, features: nn.Module, project: Heads) -> None:
        super().__init__()
        self.features, self.project = features, project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))  # N x dim, unit length


class EmbeddingNet(nn.Module):
    """28 x 28 grey -> a unit-length embedding (the zoo's conv-BN-ReLU and residual blocks), of
    `heads` heads of dim / heads each."""

    def __init__(
        self, *, in_channels: int = 1, input_size: int = 28, dim: int = 64, heads: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64), grid: bool = True, decoder: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dim, self.heads = dim, heads
        w1, w2, w3 = widths
        side = math.ceil(math.ceil(input_size / 2) / 2)  # the last maps' side: 28 -> 14 -> 7
        # A 3 x 3 grid of overlapping averages (AvgPool 3, stride 2: on 7 x 7 maps, adaptive
        # pooling to 3 x 3) keeps where the garment's mass lies, which a global average
        # forgets: an ankle boot is tall, a sneaker low, and neither is in training.
        pool = nn.AvgPool2d(3, stride=2) if grid else nn.AdaptiveAvgPool2d(1)
        cells = ((side - 3) // 2 + 1) ** 2 if grid else 1
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, w1, 3), BasicBlock(w1, w1),  # N x 16 x 28 x 28
            conv_bn_relu(w1, w2, 3, stride=2), BasicBlock(w2, w2),  # N x 32 x 14 x 14
            conv_bn_relu(w2, w3, 3, stride=2), BasicBlock(w3, w3),  # N x 64 x 7 x 7
            pool, nn.Flatten(),  # N x 64 * 3 * 3 (grid) or N x 64 (13 M MACs per image)
        )  # fmt: skip
        self.project = Heads(w3 * cells, dim, heads)
        self.decoder = Decoder(dim, in_channels) if decoder else None

    def forward(
        self, x: torch.Tensor, reconstruct: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The unit-length embedding, N x dim; with `reconstruct` (training), the decoder's
        image too. An argument of forward, not a separate call, so that DistributedDataParallel
        sees the decoder's gradients."""
        e = self.project(self.features(x))  # N x dim, unit length
        if not reconstruct:
            return e
        if self.decoder is None:
            raise ValueError("this embedding network was built without a decoder")
        return e, self.decoder(e)

    def for_export(self) -> tuple[nn.Module, list[str]]:
        # The decoder is a training cost, not part of the embedding: it stays behind.
        return Embedder(self.features, self.project), ["embedding"]


@register_model(task=TaskName.EMBED)
def siamese_fashion(
    *, in_channels: int = 1, input_size: int = 28, dim: int = 128, heads: int = 2,
    grid: bool = True, decoder: bool = False,
) -> EmbeddingNet:  # fmt: skip
    """A 0.2 M-parameter embedding network for 28 px garments, 128-d in two 64-d heads (and,
    for training only, a decoder)."""
    return EmbeddingNet(
        in_channels=in_channels, input_size=input_size, dim=dim, heads=heads, grid=grid,
        decoder=decoder,
    )  # fmt: skip
