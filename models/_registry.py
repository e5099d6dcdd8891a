"""Name-keyed registry of architecture builders.

The family modules import torch, so they are loaded on the first lookup rather than at
import time: torch-free callers (the service) can import `models.spec` cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from convserve.spec import TaskName

if TYPE_CHECKING:
    from torch import nn

Builder = Callable[..., "nn.Module"]

# One module per architecture family; each registers its builders when imported.
_FAMILY_MODULES: tuple[str, ...] = (
    "convserve.models.lenet",
    "convserve.models.alexnet",
    "convserve.models.vgg",
    "convserve.models.resnet",
    "convserve.models.inception",
    "convserve.models.efficientnet",
    "convserve.models.yolo",
    "convserve.models.embedding",
)

_REGISTRY: dict[str, Builder] = {}
_TASKS: dict[str, TaskName] = {}  # name -> what it is trained for


def register_model(fn: Builder | None = None, *, task: TaskName = TaskName.CLASSIFY) -> Any:
    """Register `fn` under its own name (`@register_model`, or
    `@register_model(task=TaskName.DETECT)` for a model trained for another task); a second
    builder with the same name is refused."""

    def register(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        _TASKS[name] = task
        return builder

    return register if fn is None else register(fn)


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def task_of(name: str) -> TaskName:
    """What the registered architecture `name` is trained for: classify, detect or embed."""
    _load_families()
    if name not in _TASKS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _TASKS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered architecture `name` with builder arguments `kwargs`."""
    _load_families()
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return builder(**kwargs)
