"""One readable training loop: data -> (schedule, forward/backward, step) -> eval -> checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import create_model
from models.data import load_digits, load_fashion_mnist, load_image_folder
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
LAST_NAME = "last.pt"  # everything needed to resume, rewritten every epoch


@dataclass(frozen=True)
class TrainConfig:
    model: str = "lenet5"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"  # or "digits" (scikit-learn's), or a folder-per-class root
    epochs: int = 12
    batch_size: int = 128
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: momentum 0.9, Nesterov
    lr: float = 2e-3  # peak rate of the schedule
    weight_decay: float = 1e-4
    schedule: Literal["onecycle", "cosine"] = "onecycle"  # onecycle: 15 % warm-up, cosine down
    label_smoothing: float = 0.0
    seed: int = 0
    data_dir: str | None = None
    out_dir: str = "runs/lenet5"
    augment: bool = True  # random crop with padding (a shift of up to 2 px)
    hflip: bool = True  # horizontal flip; off for data where it changes the class (digits)
    random_erasing: float = 0.0  # probability of erasing a random rectangle of an image
    train_limit: int | None = None  # first N training images only (quick runs, tests)
    test_limit: int | None = None
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)
    amp: bool = True  # mixed precision, on a CUDA device only
    # NHWC activations: oneDNN's convolutions run 1.1-1.9x faster on CPU for these networks
    # (ResNet-20 1.1x, VGG 1.5x, Inception 1.9x, measured); the weights saved are the same.
    channels_last: bool = True
    resume: str | None = None  # a run's last.pt: continue where it stopped
    stop_after: int | None = None  # end this invocation after that epoch (time-boxed jobs)
    init_from: str | None = None  # transfer learning: weights whose shapes fit, new head
    freeze_backbone: bool = False  # with init_from: train only what was not loaded
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any]


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
    n_classes = int(y.max()) + 1
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    total_loss = 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device or "cpu")).float().cpu()
        target = y[i : i + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        np.add.at(confusion, (target.numpy(), logits.argmax(1).numpy()), 1)
    return total_loss / len(x), float(np.trace(confusion) / len(x)), confusion


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


@dataclass(frozen=True)
class Prepared:
    x_train: torch.Tensor  # N x C x H x W, normalized
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_spec: InputSpec
    labels: tuple[str, ...]


def _normalized(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 N x H x W (x C) -> float32 N x C x H x W, normalized as the service does."""
    x = torch.from_numpy(np.ascontiguousarray(images).copy()).float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != spec.channels:  # grey data for a 3-channel model: replicate, as PIL does
        x = x.expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def prepare_data(config: TrainConfig, model_kwargs: dict[str, Any]) -> Prepared:
    channels, size = model_kwargs["in_channels"], model_kwargs["input_size"]
    if config.dataset == "fashion-mnist":
        if size != 28:
            raise ValueError("Fashion-MNIST is 28 x 28: input_size must be 28")
        train_set = load_fashion_mnist("train", config.data_dir)
        test_set = load_fashion_mnist("test", config.data_dir)
        train_images, train_labels = train_set.images, train_set.labels
        test_images, test_labels = test_set.images, test_set.labels
        labels = FASHION_MNIST_LABELS
        mean, std = FASHION_MNIST_MEAN * channels, FASHION_MNIST_STD * channels
    else:
        if config.dataset == "digits":
            train = load_digits("train", size=size)
            test = load_digits("test", size=size)
        else:
            train = load_image_folder(config.dataset, "train", channels=channels, size=size)
            test = load_image_folder(config.dataset, "test", channels=channels, size=size)
        train_images, train_labels = train.images, train.labels
        test_images, test_labels = test.images, test.labels
        labels = train.classes
        pixels = train.images.astype(np.float64) / 255.0
        per_channel = pixels.reshape(-1, pixels.shape[-1])
        mean = tuple(float(m) for m in per_channel.mean(0)) * (channels // pixels.shape[-1])
        std = tuple(float(s) for s in per_channel.std(0)) * (channels // pixels.shape[-1])
    spec = InputSpec(channels=channels, height=size, width=size, mean=mean, std=std)
    return Prepared(
        x_train=_normalized(train_images[: config.train_limit], spec),
        y_train=torch.from_numpy(np.asarray(train_labels[: config.train_limit])),
        x_test=_normalized(test_images[: config.test_limit], spec),
        y_test=torch.from_numpy(np.asarray(test_labels[: config.test_limit])),
        input_spec=spec,
        labels=tuple(labels),
    )


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (a world of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        # gloo on CPU, nccl between GPUs; torchrun has set the rendezvous variables.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=torch.distributed.get_rank(), world_size=world)


def _head_prefix(model: torch.nn.Module) -> str:
    """The classifier layer: the last Linear of the network, in every family here."""
    name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    return name + "."


def _load_transfer(model: torch.nn.Module, path: str, freeze: bool) -> list[str]:
    """Copy every weight of `path` whose name and shape fit, except the classifier layer, which
    keeps its fresh initialization (a new head for the new classes). With `freeze`, only the
    head trains. Returns the names that were not loaded."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    own = model.state_dict()
    head = _head_prefix(model)
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


def _param_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train(config: TrainConfig) -> TrainResult:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = Distributed.from_environment(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.rank % torch.cuda.device_count())
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    np.random.seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # --- data ---
    defaults = {"in_channels": 1, "input_size": 28}
    model_kwargs = {**defaults, **config.model_kwargs}
    data = prepare_data(config, model_kwargs)
    model_kwargs.setdefault("num_classes", len(data.labels))
    x_train, y_train = data.x_train, data.y_train

    # --- model, optimizer, schedule ---
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = create_model(config.model, **model_kwargs).to(device, memory_format=layout)
    if config.init_from:
        fresh = _load_transfer(model, config.init_from, config.freeze_backbone)
        log.info("initialized from %s; trained from scratch: %s", config.init_from, fresh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            trainable, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    # Each rank takes its shard of every epoch (padded to equal size, so steps stay in step).
    sampler = torch.utils.data.DistributedSampler(
        range(len(x_train)), num_replicas=dist.world_size, rank=dist.rank, seed=config.seed
    )
    steps_per_epoch = -(-len(sampler) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        scheduler: torch.optim.lr_scheduler.LRScheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        )
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15,
            anneal_strategy="cos",
        )  # fmt: skip
    trained = torch.nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    # Augmentation draws differ per rank; the shuffle is the sampler's (seeded per epoch).
    generator = torch.Generator().manual_seed(config.seed + dist.rank)
    black = (0.0 - data.input_spec.mean[0]) / data.input_spec.std[0]

    history: list[dict[str, float]] = []
    best_accuracy = -1.0
    best_confusion: np.ndarray | None = None
    first_epoch = 1
    if config.resume:
        state = torch.load(config.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_accuracy = state["history"], state["best_accuracy"]
        best_confusion = np.asarray(state["best_confusion"])
        first_epoch = state["epoch"] + 1
        log.info("resumed from %s at epoch %d", config.resume, first_epoch)
    started = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    last_epoch = min(config.epochs, config.stop_after or config.epochs)
    for epoch in range(first_epoch, last_epoch + 1):
        # --- forward/backward, step ---
        trained.train()
        if dist.world_size > 1:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        else:  # one process: the training stream of earlier releases, run for run identical
            order = torch.randperm(len(x_train), generator=generator)
        running_loss, seen, correct = 0.0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=None if config.progress and dist.is_main else True,  # None: off if no TTY
            leave=False,
        )
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if config.augment:
                xb = augment_batch(xb, generator, fill=black, flip=config.hflip)
            if config.random_erasing:
                xb = random_erase(xb, generator, p=config.random_erasing, fill=black)
            xb = xb.to(device, memory_format=layout, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = trained(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running_loss += loss.item() * len(xb)
            seen += len(xb)
            correct += int((logits.argmax(1) == yb).sum())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running_loss / seen:.4f}", acc=f"{correct / seen:.3f}")

        # --- eval + checkpoint (rank 0; the others wait at the barrier) ---
        if dist.is_main:
            test_loss, test_accuracy, confusion = evaluate(model, data.x_test, data.y_test, device)
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
                    input=data.input_spec,
                    labels=data.labels,
                    metrics={
                        "test_accuracy": test_accuracy,
                        "test_loss": test_loss,
                        "epoch": epoch,
                    },
                )
                torch.save(
                    {
                        "spec": spec.model_dump(mode="json"),
                        "state_dict": model.state_dict(),
                        "config": asdict(config),
                    },
                    out / CHECKPOINT_NAME,
                )
            torch.save(
                {
                    "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "best_accuracy": best_accuracy,
                    "best_confusion": best_confusion.tolist(),
                    "epoch": epoch,
                    "config": asdict(config),
                },
                out / LAST_NAME,
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
        if dist.world_size > 1:
            torch.distributed.barrier()

    # --- report ---
    digests = [_param_digest(model)]
    if dist.world_size > 1:
        digests = [None] * dist.world_size
        torch.distributed.all_gather_object(digests, _param_digest(model))
        torch.distributed.destroy_process_group()
    if not dist.is_main:
        return TrainResult(checkpoint=out / CHECKPOINT_NAME, metrics={})
    metrics = {
        "model": config.model,
        "model_kwargs": model_kwargs,
        "dataset": config.dataset,
        "best_test_accuracy": best_accuracy,
        "best_epoch": max(history, key=lambda h: h["test_accuracy"])["epoch"],
        "train_time_s": time.perf_counter() - started,
        "train_images": len(x_train),
        "test_images": len(data.x_test),
        "world_size": dist.world_size,
        "rank_weight_digests": digests,
        "device": str(device),
        "history": history,
        "config": asdict(config),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(history, out / "curves.png")
    assert best_confusion is not None
    plot_confusion(
        best_confusion,
        data.labels,
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
