"""Batch augmentation on tensors: random crop with padding, horizontal flip, random erasing.

Each works on the whole N x C x H x W batch at once: a per-image loop in Python would dominate a
LeNet step. Every draw comes from the caller's generator, so runs are reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, *, fill: float, pad: int = 2, flip: bool = True
) -> torch.Tensor:
    """Random crop with zero padding (a shift of up to `pad` px) and horizontal flip, per image.

    `fill` is black after normalization, the background of the images.
    Done on the whole batch tensor: a per-image loop in Python would dominate a LeNet step.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)  # N x C x (H+2p) x (W+2p)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # N x 1 x H x 1
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # N x 1 x 1 x W
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    out = padded[batch, channel, rows, cols]  # N x C x H x W
    flips = torch.rand(n, generator=generator) < 0.5  # drawn either way: same stream
    if flip:
        out[flips] = out[flips].flip(-1)
    return out


def random_erase(
    x: torch.Tensor, generator: torch.Generator, *, p: float, fill: float
) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020): with probability p per image, a rectangle of 2-20 %
    of the area and aspect ratio 0.3-3.3 is set to `fill`. Vectorized over the batch."""
    n, _, h, w = x.shape
    area = torch.empty(n).uniform_(0.02, 0.2, generator=generator) * h * w
    log_ratio = torch.empty(n).uniform_(np.log(0.3), np.log(1 / 0.3), generator=generator)
    eh = (area * log_ratio.exp()).sqrt().round().clamp(1, h).long()
    ew = (area / log_ratio.exp()).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    inside = ((rows >= top[:, None]) & (rows < (top + eh)[:, None]))[:, :, None] & (
        (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    )[:, None, :]  # N x H x W
    erase = (torch.rand(n, generator=generator) < p)[:, None, None] & inside
    return x.masked_fill(erase[:, None], fill)
