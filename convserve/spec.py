"""The contract a model carries with it: its task, the whole preprocessing recipe, what its
outputs mean, and its labels.

Written beside the weights (checkpoint), inside the ONNX metadata and into the model store,
so preprocessing is read, never guessed, at serving time, and export calibrates and checks
parity on the data the model was trained on. A model trained elsewhere gets one from
`convserve import`. Torch-free: the service imports it.

The recipe (`InputSpec`) is data, in the spirit of Triton's model configuration and
torchvision's transform presets: the one preprocessing path (`convserve.preprocess`) applies
it, so a Fashion-MNIST LeNet-5 (stretch to 28 x 28, grey, mean 0.286 / std 0.353, NCHW) and
an ImageNet network (shorter side to 256, centre crop 224, RGB or BGR, NHWC) are two
instances of the same few fields.
"""

from __future__ import annotations

import functools
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Per-channel statistics of the Fashion-MNIST training set (pixel values scaled to [0, 1]).
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)

ONNX_METADATA_KEY = "convserve.spec"
FASHION_MNIST = "fashion-mnist"
DIGITS = "digits"
IMAGENET = "imagenet"
IMPORTED = "imported"  # a model file made outside convserve (`convserve import`)
# Short names for the model store: `fashion-lenet5`, `digits-lenet5`, `<folder>-lenet5`.
_STORE_PREFIX = {FASHION_MNIST: "fashion", DIGITS: "digits", IMAGENET: "imagenet"}


class TaskName(StrEnum):
    """What a model is for. One name each for the spec, the model registry, the import command
    and the service's task plug-ins (a StrEnum: spec.json keeps the plain string)."""

    CLASSIFY = "classify"
    DETECT = "detect"
    EMBED = "embed"
    STYLIZE = "stylize"


# What `convserve import` takes: a detector's outputs must be convserve's own decoded boxes, so
# detectors are trained with convserve.
IMPORTABLE_TASKS = (TaskName.CLASSIFY, TaskName.EMBED, TaskName.STYLIZE)

Resize = Literal["stretch", "crop", "letterbox", "none"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]


class InputSpec(BaseModel):
    """The preprocessing recipe: any image -> one input of the model.

    Steps, in order: decode (at a reduced size when the resize shrinks the image anyway and
    `reduced_decode` is on); EXIF orientation, alpha on black, 16-bit to 8-bit; convert to the
    model's channels (grey, or RGB reordered to `channel_order`); resize as `resize` says to
    `height` x `width`; x = pixel / `scale`, then (x - mean) / std per channel (unless `dtype`
    is uint8: the model takes the pixels themselves); lay out as `layout`.

    Defaults are the recipe of every model convserve trained before the recipe was data:
    stretch, bilinear, [0, 1], RGB, NCHW, float32.
    """

    model_config = ConfigDict(frozen=True)

    channels: int = Field(ge=1, description="1 (grey) or 3 (colour)")
    height: int = Field(ge=1, description="input height; with resize 'none', the largest")
    width: int = Field(ge=1, description="input width; with resize 'none', the largest")
    mean: tuple[float, ...] = Field(description="per channel, on pixel values / `scale`")
    std: tuple[float, ...]
    resize: Resize = Field(
        default="stretch",
        description="stretch: to height x width, ignoring the aspect ratio; crop: shorter side "
        "to `resize_to`, then the centre height x width (torchvision's Resize + CenterCrop); "
        "letterbox: the whole image scaled to fit, centred, the rest `pad_value`; none: the "
        "image's own size (scaled down to fit height x width first when larger)",
    )
    resize_to: int | None = Field(
        default=None, ge=1, description="crop: the shorter side's length first"
    )
    interpolation: Interpolation = "bilinear"
    scale: float = Field(
        default=255.0,
        gt=0,
        description="pixel values are divided by this first: 255 gives [0, 1] (torchvision's "
        "ToTensor), 1 keeps 0..255 (Caffe-style models)",
    )
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    dtype: Literal["float32", "uint8"] = Field(
        default="float32", description="uint8: the model takes pixels 0..255, not normalized values"
    )
    pad_value: int = Field(
        default=0, ge=0, le=255, description="letterbox: the border's pixel value"
    )
    multiple_of: int = Field(
        default=1, ge=1, description="none: sides are reflect-padded up to a multiple of this"
    )
    reduced_decode: bool = Field(
        default=True,
        description="when the resize shrinks a large upload anyway, decode it at a reduced "
        "size first: a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8) that still leaves "
        "twice the resize's size on both sides, other formats box-reduced by a whole factor "
        "to the same bound; the recipe's own resampling then starts from there. False: every "
        "upload is decoded in full",
    )

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values, one per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.channels == 1 and self.channel_order == "bgr":
            raise ValueError("a grey input has no channel order")
        if self.resize == "crop":
            shorter = min(self.height, self.width)
            if self.resize_to is None or self.resize_to < shorter:
                raise ValueError(
                    f"crop needs resize_to of at least the input's shorter side ({shorter})"
                )
        elif self.resize_to is not None:
            raise ValueError("resize_to belongs to the crop resize")
        return self

    @functools.cached_property
    def normalization(self) -> tuple[Any, Any, Any]:
        """(scale, mean, std) as float32 numpy arrays shaped C x 1 x 1, made once: the one
        normalization (`convserve.preprocess.normalize`) runs on every request."""
        import numpy as np

        def column(values: tuple[float, ...]) -> Any:
            return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)

        return np.float32(self.scale), column(self.mean), column(self.std)

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        """The model input's shape for `batch` images, in the model's layout."""
        if self.layout == "nhwc":
            return (batch, self.height, self.width, self.channels)
        return (batch, self.channels, self.height, self.width)

    def describe(self) -> str:
        """The recipe in a line, for operators and the model listing."""
        size = f"{self.height}x{self.width}"
        how = {
            "stretch": f"stretch to {size}",
            "crop": f"shorter side to {self.resize_to}, centre crop {size}",
            "letterbox": f"letterbox to {size}",
            "none": f"own size (at most {size}, sides a multiple of {self.multiple_of})",
        }[self.resize]
        values = "pixels 0..255" if self.dtype == "uint8" else f"x/{self.scale:g}, mean/std"
        grey = self.channels == 1
        colour = "grey" if grey else self.channel_order.upper()
        decode = "reduced decode" if self.reduced_decode else "full decode"
        return f"{how}, {self.interpolation}, {colour}, {values}, {self.layout.upper()}, {decode}"


class DetectSpec(BaseModel):
    """What a detector's outputs mean (`task = detect`).

    The graph itself decodes its grid: `boxes` N x M x 4 (x1, y1, x2, y2 in input pixels)
    and `scores` N x M x classes (objectness times class probability), M = grid^2 x anchors.
    Non-max suppression runs outside the graph, per class, with the request's thresholds."""

    model_config = ConfigDict(frozen=True)

    grid: int = Field(ge=1, description="S: the S x S cells of the output")
    anchors: tuple[tuple[float, float], ...] = Field(
        min_length=1, description="B anchor boxes, (width, height) in input pixels"
    )
    boxes_output: str = "boxes"
    scores_output: str = "scores"


class EmbedSpec(BaseModel):
    """What an embedding network's output means (`task = embed`): one unit-length vector per
    image; two images are the same identity when their squared L2 distance is <= threshold."""

    model_config = ConfigDict(frozen=True)

    dim: int = Field(ge=1)
    threshold: float = Field(ge=0, le=4, description="tau, chosen at export on a validation split")
    output: str = "embedding"


class StylizeSpec(BaseModel):
    """A feed-forward style network (`task = stylize`): an image and a vector of style weights
    in, the stylized image out (values 0..1, the input's layout and size)."""

    model_config = ConfigDict(frozen=True)

    styles: int = Field(ge=1, description="length of the style-weights vector")
    image_input: str = "image"
    style_input: str = "style_weights"
    output: str = "stylized"


class ModelSpec(BaseModel):
    """Everything needed to rebuild (when convserve trained it), preprocess for, run and
    answer with a model."""

    model_config = ConfigDict(frozen=True)

    architecture: str = Field(description="registry name, e.g. 'lenet5'; 'imported' otherwise")
    # Checkpoints written before the field existed were all trained on Fashion-MNIST.
    dataset: str = Field(
        default=FASHION_MNIST,
        description="what it was trained on: 'fashion-mnist', 'digits', 'imagenet', a "
        "folder-per-class root, or 'imported'",
    )
    task: TaskName = TaskName.CLASSIFY
    kwargs: dict[str, Any] = Field(default_factory=dict, description="builder arguments")
    input: InputSpec
    labels: tuple[str, ...] = ()
    output: Literal["logits", "probabilities"] = Field(
        default="logits", description="classify: what the first output holds per class"
    )
    detect: DetectSpec | None = None
    embed: EmbedSpec | None = None
    stylize: StylizeSpec | None = None
    metrics: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _task_has_its_part(self) -> ModelSpec:
        parts = {"detect": self.detect, "embed": self.embed, "stylize": self.stylize}
        for task, part in parts.items():
            if (part is not None) != (self.task == task):
                raise ValueError(f"the {task!r} part belongs to, and only to, task {task!r}")
        if self.task in ("classify", "detect") and not self.labels:
            raise ValueError(f"a {self.task} model needs its labels")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def store_name(self) -> str:
        """The model store name this model is saved under unless one is given."""
        prefix = _STORE_PREFIX.get(self.dataset)
        if prefix is None:  # a folder: its last path component, as a store-safe slug
            tail = self.dataset.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
            prefix = re.sub(r"[^a-z0-9]+", "-", tail.lower()).strip("-") or "images"
        return f"{prefix}-{self.architecture}"
