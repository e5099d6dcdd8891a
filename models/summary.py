"""Per-layer table of activation shape, activation size and parameter count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str
    shape: tuple[int, ...]  # activation shape without the batch axis, channels last (H, W, C)
    size: int
    params: int

    @property
    def shape_text(self) -> str:
        if len(self.shape) == 1:
            return str(self.shape[0])
        return "(" + ",".join(str(d) for d in self.shape) + ")"


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = getattr(model, "summary_layers", None)
    if callable(layers):  # a family's own grouping of its layers
        grouped: list[tuple[str, nn.Module]] = layers()  # type: ignore[assignment]
        return grouped
    return [(name.upper(), module) for name, module in model.named_children()]


def summarize(model: nn.Module, in_channels: int, input_size: int) -> list[LayerRow]:
    """Run one dummy image through `model` and record every summary layer's output."""
    rows: list[LayerRow] = [
        LayerRow("INPUT", (input_size, input_size, in_channels), input_size**2 * in_channels, 0)
    ]
    hooks = []

    def record(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            dims = tuple(out.shape[1:])
            if len(dims) == 3:  # C x H x W -> H x W x C, the convention of the LeNet-5 table
                dims = (dims[1], dims[2], dims[0])
            params = sum(p.numel() for p in module.parameters())
            rows.append(LayerRow(name, dims, int(torch.tensor(dims).prod()), params))

        return hook

    for name, module in _layers(model):
        hooks.append(module.register_forward_hook(record(name, module)))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    return rows


def format_table(rows: list[LayerRow], total_params: int) -> str:
    header = f"{'layer':<10} {'activation shape':>18} {'activation size':>16} {'parameters':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<10} {r.shape_text:>18} {r.size:>16} {r.params:>12}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<10} {'':>18} {'':>16} {total_params:>12}")
    return "\n".join(lines)
