"""What training optimizes and measures, per task: one object the training loop
(`convserve.models.train`) asks for its data, each step's loss, the evaluation that picks the
best epoch, the spec's task part and the final plots. Classification is here; detection
(`detection.py`) and verification (`siamese.py`) are their own modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from convserve.models.augment import augment_batch, random_erase
from convserve.models.data import input_spec_for, load_split
from convserve.models.plots import plot_confusion
from convserve.preprocess import from_pixels
from convserve.spec import InputSpec

if TYPE_CHECKING:
    from convserve.models.train import TrainConfig, Trainer


@dataclass(frozen=True)
class Prepared:
    x_train: torch.Tensor  # N x C x H x W, normalized
    y_train: torch.Tensor  # the objective's targets, N rows
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_spec: InputSpec
    labels: tuple[str, ...]
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # chosen from the data (anchors)
    extra: dict[str, Any] = field(default_factory=dict)  # the objective's own (true boxes)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # "test_loss" and the objective's own, for the history
    artifact: Any = None  # what the report draws for the best epoch (a confusion matrix)


class Objective:
    task: ClassVar[str]
    metric: ClassVar[str]  # the history key whose highest value picks the best epoch
    summary: ClassVar[str]  # the final metrics' name for it ("best_test_accuracy")
    counts_right: ClassVar[bool] = False  # whether `loss` counts right answers (accuracy)

    def prepare(
        self, config: TrainConfig, model_kwargs: dict[str, Any], pretrained: InputSpec | None
    ) -> Prepared:
        raise NotImplementedError

    def order(self, data: Prepared, generator: torch.Generator) -> torch.Tensor:
        """The epoch's order of training examples (indices into x_train)."""
        return torch.randperm(len(data.x_train), generator=generator)

    def loss(
        self, trainer: Trainer, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """One step's loss, and how many of the batch it got right (0 where that has no
        meaning); augmentation happens here."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, data: Prepared, device: torch.device) -> Evaluation:
        raise NotImplementedError

    def spec_parts(self, data: Prepared, evaluation: Evaluation) -> dict[str, Any]:
        """The spec's fields beyond the recipe and labels: its task and the task's part."""
        return {"task": self.task}

    def report(self, artifact: Any, data: Prepared, out: Path, model: str, score: float) -> None:
        """Plots of the best epoch (its `artifact`, its `score`), beside the curves."""


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` examples of each class, in their original order."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(keep)


def to_inputs(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 images through the serving preprocessing, in slices: 10,000 images at 3 x 112 x 112
    are 1.5 GB as float32 already."""
    chunks = [from_pixels(images[i : i + 1000], spec) for i in range(0, len(images), 1000)]
    return torch.from_numpy(np.concatenate(chunks))


class Classification(Objective):
    task = "classify"
    metric = "test_accuracy"
    summary = "best_test_accuracy"
    counts_right = True

    def prepare(
        self, config: TrainConfig, model_kwargs: dict[str, Any], pretrained: InputSpec | None
    ) -> Prepared:
        """Both splits through the serving preprocessing: Fashion-MNIST at another size or with 3
        channels is resized and replicated as an upload would be. `pretrained`: the recipe of
        the weights training starts from, whose mean and std the inputs keep (the backbone's
        features were learnt on them)."""
        channels, size = model_kwargs["in_channels"], model_kwargs["input_size"]
        shape = {"channels": channels, "size": size}
        train = load_split(config.dataset, "train", **shape, data_dir=config.data_dir)
        test = load_split(config.dataset, "test", **shape, data_dir=config.data_dir)
        spec = input_spec_for(config.dataset, train, channels, size)
        if pretrained is not None and pretrained.channels == channels:
            spec = spec.model_copy(update={"mean": pretrained.mean, "std": pretrained.std})
        chosen = np.arange(len(train.labels))
        if config.per_class is not None:
            chosen = first_per_class(np.asarray(train.labels), config.per_class)
        chosen = chosen[: config.train_limit]
        limit = config.test_limit
        return Prepared(
            x_train=to_inputs(train.images[chosen], spec),
            y_train=torch.from_numpy(np.asarray(train.labels[chosen])),
            x_test=to_inputs(test.images[:limit], spec),
            y_test=torch.from_numpy(np.asarray(test.labels[:limit])),
            input_spec=spec,
            labels=tuple(train.classes),
        )

    def loss(
        self, trainer: Trainer, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        config = trainer.config
        if config.augment:
            xb = augment_batch(xb, trainer.generator, fill=trainer.black, flip=config.hflip)
        if config.random_erasing:
            xb = random_erase(xb, trainer.generator, p=config.random_erasing, fill=trainer.black)
        logits = trainer.trained(trainer.to_device(xb))
        target = yb.to(trainer.device, non_blocking=True)
        loss = F.cross_entropy(logits, target, label_smoothing=config.label_smoothing)
        return loss, int((logits.argmax(1) == target).sum())

    def evaluate(self, model: torch.nn.Module, data: Prepared, device: torch.device) -> Evaluation:
        loss, accuracy, confusion = evaluate(model, data.x_test, data.y_test, device)
        return Evaluation({"test_loss": loss, "test_accuracy": accuracy}, confusion)

    def report(self, artifact: Any, data: Prepared, out: Path, model: str, score: float) -> None:
        title = f"{model}: test accuracy {100 * score:.2f}%"
        plot_confusion(np.asarray(artifact), data.labels, out / "confusion.png", title)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device | None = None,
    batch_size: int = 1000,
) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and the confusion matrix (rows: true class) over (x, y)."""
    model.eval()
    confusion: np.ndarray | None = None
    total_loss = 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device or "cpu")).float().cpu()
        if confusion is None:  # sized by the model's classes, not the labels seen in y
            confusion = np.zeros((logits.shape[1], logits.shape[1]), dtype=np.int64)
        target = y[i : i + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        np.add.at(confusion, (target.numpy(), logits.argmax(1).numpy()), 1)
    assert confusion is not None, "nothing to evaluate"
    return total_loss / len(x), float(np.trace(confusion) / len(x)), confusion


OBJECTIVES: dict[str, type[Objective]] = {"classify": Classification}


def objective_for(task: str) -> Objective:
    """The objective of a registered model's task (`register_model(task=...)`)."""
    if task not in OBJECTIVES:  # the modules of the other tasks register themselves
        import importlib

        importlib.import_module(
            {"detect": "convserve.models.detection", "embed": "convserve.models.siamese"}[task]
        )
    return OBJECTIVES[task]()
