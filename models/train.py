"""One readable training loop: data -> (schedule, forward/backward, step) -> eval -> checkpoint."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import create_model
from models.data import load_fashion_mnist
from models.plots import plot_confusion, plot_curves
from models.spec import (
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    InputSpec,
    ModelSpec,
)

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "best.pt"


@dataclass(frozen=True)
class TrainConfig:
    model: str = "lenet5"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3  # AdamW peak rate; cosine-annealed to zero over the run
    weight_decay: float = 1e-4
    seed: int = 0
    data_dir: str | None = None
    out_dir: str = "runs/lenet5"
    augment: bool = True  # random +-2 px shift and horizontal flip of training images
    train_limit: int | None = None  # first N training images only (quick runs, tests)
    test_limit: int | None = None
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any]


def _to_tensor(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 N x 28 x 28 -> normalized float32 N x 1 x 28 x 28, the service's preprocessing."""
    x = torch.from_numpy(np.ascontiguousarray(images).copy()).float().div_(255.0).unsqueeze(1)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, *, fill: float, pad: int = 2
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
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and the confusion matrix (rows: true class) over (x, y)."""
    model.eval()
    n_classes = int(y.max()) + 1
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    total_loss = 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        target = y[i : i + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        np.add.at(confusion, (target.numpy(), logits.argmax(1).numpy()), 1)
    return total_loss / len(x), float(np.trace(confusion) / len(x)), confusion


def train(config: TrainConfig) -> TrainResult:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # --- data ---
    spec_kwargs = {"in_channels": 1, "input_size": 28, "num_classes": len(FASHION_MNIST_LABELS)}
    model_kwargs = {**spec_kwargs, **config.model_kwargs}
    if model_kwargs["in_channels"] != 1 or model_kwargs["input_size"] != 28:
        raise ValueError("Fashion-MNIST is 1 x 28 x 28: in_channels=1 and input_size=28")
    input_spec = InputSpec(
        channels=1, height=28, width=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
    )
    train_set = load_fashion_mnist("train", config.data_dir)
    test_set = load_fashion_mnist("test", config.data_dir)
    x_train = _to_tensor(train_set.images[: config.train_limit], input_spec)
    y_train = torch.from_numpy(train_set.labels[: config.train_limit])
    x_test = _to_tensor(test_set.images[: config.test_limit], input_spec)
    y_test = torch.from_numpy(test_set.labels[: config.test_limit])

    model = create_model(config.model, **model_kwargs)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=config.epochs * steps_per_epoch,
        pct_start=0.15,
        anneal_strategy="cos",
    )
    generator = torch.Generator().manual_seed(config.seed)
    black = (0.0 - input_spec.mean[0]) / input_spec.std[0]

    history: list[dict[str, float]] = []
    best_accuracy = -1.0
    best_confusion: np.ndarray | None = None
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        # --- forward/backward, step ---
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        running_loss, seen, correct = 0.0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=None if config.progress else True,  # None: off when not a terminal
            leave=False,
        )
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if config.augment:
                xb = augment_batch(xb, generator, fill=black)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += loss.item() * len(xb)
            seen += len(xb)
            correct += int((logits.argmax(1) == yb).sum())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running_loss / seen:.4f}", acc=f"{correct / seen:.3f}")

        # --- eval + checkpoint ---
        test_loss, test_accuracy, confusion = evaluate(model, x_test, y_test)
        record = {
            "epoch": epoch,
            "train_loss": running_loss / seen,
            "train_accuracy": correct / seen,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "elapsed_s": time.perf_counter() - started,
        }
        history.append(record)
        improved = test_accuracy > best_accuracy
        if improved:
            best_accuracy, best_confusion = test_accuracy, confusion
            spec = ModelSpec(
                architecture=config.model,
                kwargs=model_kwargs,
                input=input_spec,
                labels=FASHION_MNIST_LABELS,
                metrics={"test_accuracy": test_accuracy, "test_loss": test_loss, "epoch": epoch},
            )
            torch.save(
                {
                    "spec": spec.model_dump(mode="json"),
                    "state_dict": model.state_dict(),
                    "config": asdict(config),
                },
                out / CHECKPOINT_NAME,
            )
        log.info(
            "epoch %d/%d  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%%s  (%.0f s)",
            epoch,
            config.epochs,
            record["train_loss"],
            100 * record["train_accuracy"],
            test_loss,
            100 * test_accuracy,
            "  *best*" if improved else "",
            record["elapsed_s"],
        )

    # --- report ---
    metrics = {
        "model": config.model,
        "model_kwargs": model_kwargs,
        "best_test_accuracy": best_accuracy,
        "best_epoch": max(history, key=lambda h: h["test_accuracy"])["epoch"],
        "train_time_s": time.perf_counter() - started,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "history": history,
        "config": asdict(config),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(history, out / "curves.png")
    assert best_confusion is not None
    plot_confusion(
        best_confusion,
        FASHION_MNIST_LABELS,
        out / "confusion.png",
        f"{config.model}: test accuracy {100 * best_accuracy:.2f}%",
    )
    return TrainResult(checkpoint=out / CHECKPOINT_NAME, metrics=metrics)


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the model from the checkpoint file alone."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.model_validate(payload["spec"])
    model = create_model(spec.architecture, **spec.kwargs)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), spec
