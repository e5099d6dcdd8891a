"""Checkpoints: `best.pt` rebuilds the model from the file alone; `last.pt` resumes a run.

Both load with `weights_only=True`: a checkpoint is data (tensors, numbers, strings), never
code, so a tampered file cannot run anything when it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from convserve.models import create_model
from convserve.spec import ModelSpec

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"  # everything needed to resume, rewritten every epoch


def save_best(path: Path, model: nn.Module, spec: ModelSpec, config: dict[str, Any]) -> None:
    """The weights with the spec that rebuilds, preprocesses for and labels them."""
    payload = {"spec": spec.model_dump(mode="json"), "state_dict": model.state_dict()}
    torch.save({**payload, "config": config}, path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model from the checkpoint file alone, in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.model_validate(payload["spec"])
    model = create_model(spec.architecture, **spec.kwargs)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), spec


def save_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_state(path: str | Path) -> dict[str, Any]:
    """A `last.pt`: weights, optimizer, schedule, random streams, history."""
    return torch.load(path, map_location="cpu", weights_only=True)


def classifier_prefix(model: nn.Module) -> str:
    """The classifier layer's parameter prefix, as the model names it (`classifier_name`)."""
    name = getattr(model, "classifier_name", None)
    if name is None or not isinstance(model.get_submodule(name), nn.Linear):
        raise ValueError(f"{type(model).__name__} does not name its classifier Linear layer")
    return name + "."


def load_transfer(
    model: nn.Module, source: str | Path | dict[str, torch.Tensor], freeze: bool
) -> list[str]:
    """Copy every weight of `source` (a checkpoint's path, or a state dict) whose name and
    shape fit, except the classifier layer, which keeps its fresh initialization (a new head
    for the new classes). With `freeze`, only what was not loaded trains. Returns the names
    that were not loaded."""
    if isinstance(source, dict):
        state = source
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    own = model.state_dict()
    head = classifier_prefix(model)
    fitting = {
        k: v
        for k, v in state.items()
        if k in own and own[k].shape == v.shape and not k.startswith(head)
    }
    model.load_state_dict(fitting, strict=False)
    if freeze:
        for name, param in model.named_parameters():
            param.requires_grad = name not in fitting
    return [k for k in own if k not in fitting]


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """Batch-norm layers none of whose parameters train: a frozen backbone's. Training keeps
    them in eval mode, so their running statistics stay those the weights were trained with
    (a few hundred new images would otherwise pull them off)."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return [
        m
        for m in model.modules()
        if isinstance(m, norms) and not any(p.requires_grad for p in m.parameters())
    ]
