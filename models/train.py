"""One readable training loop: data -> (schedule, forward/backward, step) -> eval -> checkpoint.

`TrainConfig` holds every default; `convserve train` derives its options from its fields. What
is trained for is the model's task's `Objective` (`objectives.py`: classification; `detection.py`,
`siamese.py`): its data, each step's loss, the evaluation that keeps the best epoch, the spec.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from convserve.models import create_model
from convserve.models._registry import task_of
from convserve.models.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    frozen_norms,
    load_state,
    load_transfer,
    save_best,
    save_state,
)
from convserve.models.objectives import Objective, Prepared, objective_for
from convserve.models.plots import plot_curves
from convserve.spec import FASHION_MNIST, ModelSpec

log = logging.getLogger(__name__)


def _opt(help: str, **cli: Any) -> dict[str, Any]:
    """A field's command-line help (and flag name, where it differs from the field's)."""
    return {"help": help, **cli}


@dataclass(frozen=True)
class TrainConfig:
    model: str = field(default="lenet5", metadata=_opt("a registered model", positional=True))
    model_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata=_opt("builder argument KEY=VALUE, JSON value (e.g. filters=[8,16])", flag="arg"),
    )
    dataset: str = field(
        default=FASHION_MNIST,
        metadata=_opt(
            "fashion-mnist, digits (scikit-learn's), or a folder-per-class root "
            "(ROOT/train/CLASS/*.png, ROOT/test/CLASS/*.png)"
        ),
    )
    epochs: int = field(default=40, metadata=_opt("epochs of the schedule"))
    batch_size: int = field(default=128, metadata=_opt("images per step"))
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata=_opt("sgd: momentum 0.9, Nesterov")
    )
    lr: float = field(default=2e-3, metadata=_opt("peak learning rate of the schedule"))
    weight_decay: float = field(default=1e-4, metadata=_opt("decoupled (adamw) or L2 (sgd)"))
    schedule: Literal["onecycle", "cosine"] = field(
        default="onecycle", metadata=_opt("onecycle: 15 %% warm-up, then cosine down")
    )
    label_smoothing: float = field(default=0.0, metadata=_opt("cross-entropy label smoothing"))
    seed: int = field(default=0, metadata=_opt("weights, shuffling and augmentation draws"))
    data_dir: str | None = field(
        default=None, metadata=_opt("directory with the four Fashion-MNIST IDX .gz files")
    )
    out_dir: str = field(
        default="runs/lenet5", metadata=_opt("run directory (default runs/MODEL)", flag="out")
    )
    augment: bool = field(default=True, metadata=_opt("random crop with padding (2 px shift)"))
    hflip: bool = field(
        default=True, metadata=_opt("horizontal flips (off where they change the class)")
    )
    random_erasing: float = field(
        default=0.0, metadata=_opt("probability of erasing a random rectangle", metavar="P")
    )
    look_alikes: int = field(
        default=0,
        metadata=_opt(
            "verification: split each class into N groups of similar images (k-means), mined "
            "as identities too",
            metavar="N",
        ),
    )
    shapes: int = field(
        default=0,
        metadata=_opt(
            "verification: a second embedding head whose identities are each class split into N "
            "shapes (k-means on silhouettes)",
            metavar="N",
        ),
    )
    reconstruction: float = field(
        default=0.0,
        metadata=_opt(
            "verification: weight of a decoder's reconstruction cost (training-only)", metavar="W"
        ),
    )
    train_limit: int | None = field(
        default=None, metadata=_opt("use only the first N training images")
    )
    per_class: int | None = field(
        default=None,
        metadata=_opt("use only the first N training images of each class (a small labelled set)"),
    )
    test_limit: int | None = field(default=None, metadata=_opt("use only the first N test images"))
    threads: int | None = field(default=None, metadata=_opt("torch threads (default: all cores)"))
    amp: bool = field(default=True, metadata=_opt("mixed precision on a GPU"))
    # NHWC activations: oneDNN's convolutions run 1.1-1.9x faster on CPU for these networks
    # (ResNet-20 1.1x, VGG 1.5x, Inception 1.9x, measured); the weights saved are the same.
    channels_last: bool = field(default=True, metadata=_opt("NHWC activations (else NCHW)"))
    resume: str | None = field(
        default=None, metadata=_opt("continue a run from its last.pt", metavar="LAST_PT")
    )
    eval_every: int = field(
        default=1,
        metadata=_opt("evaluate (and checkpoint) every N epochs, and after the last", metavar="N"),
    )
    stop_after: int | None = field(
        default=None, metadata=_opt("end this invocation after that epoch", metavar="EPOCH")
    )
    init_from: str | None = field(
        default=None,
        metadata=_opt(
            "transfer learning: weights that fit, a new classifier; a checkpoint, or a "
            "pretrained source (imagenet, for efficientnet_lite0)",
            metavar="CKPT|SOURCE",
        ),
    )
    freeze_backbone: bool = field(
        default=False, metadata=_opt("with --init-from: train the classifier only")
    )
    progress: bool = field(default=True, metadata=_opt("a progress bar on a terminal"))


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any]


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


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            trainable, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch: onecycle warms up for 15 % of the steps, then anneals (cosine)."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15, anneal_strategy="cos"
    )


@dataclass
class Trainer:
    """What one epoch needs: the model (wrapped for DDP or not), its optimizer and schedule,
    the augmentation stream, the objective. `train_one_epoch` is the whole inner loop."""

    config: TrainConfig
    objective: Objective
    model: torch.nn.Module  # the bare model: evaluated and saved
    trained: torch.nn.Module  # what the step runs: the model, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    device: torch.device
    layout: torch.memory_format
    black: float  # the background after normalization: augmentation's fill value

    def to_device(self, xb: torch.Tensor) -> torch.Tensor:
        return xb.to(self.device, memory_format=self.layout, non_blocking=True)

    def train_one_epoch(
        self, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, desc: str, show: bool
    ) -> tuple[float, float]:
        """One pass over `order` (indices into x, y); returns mean loss and the fraction the
        objective counted right (accuracy, for a classifier)."""
        config, use_amp = self.config, self.scaler.is_enabled()
        self.trained.train()
        for norm in frozen_norms(self.model):  # a frozen backbone's statistics stay its own
            norm.eval()
        steps = math.ceil(len(order) / config.batch_size)
        running_loss, seen, correct = 0.0, 0, 0
        # disable=None: a bar on a terminal only.
        bar = tqdm(
            range(steps), desc=desc, unit="batch", disable=None if show else True, leave=False
        )
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=use_amp):
                loss, right = self.objective.loss(self, x[idx], y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            running_loss += loss.item() * len(idx)
            seen += len(idx)
            correct += right
            if step % 20 == 0:
                shown = {"loss": f"{running_loss / seen:.4f}"}
                if self.objective.counts_right:
                    shown["acc"] = f"{correct / seen:.3f}"
                bar.set_postfix(shown)
        return running_loss / seen, correct / seen

    def state(self) -> dict[str, Any]:
        """What `last.pt` holds besides the history, to continue run for run identically."""
        return {
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])


def _write_history(history: list[dict[str, float]], out: Path) -> None:
    """history.csv and curves.png, rewritten after every epoch so a long run can be watched."""
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plot_curves(history, out / "curves.png")


def _param_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _rank_digests(trainer: Trainer, dist: Distributed) -> list[str | None]:
    """Every rank's weight digest (identical after DDP); ends the process group."""
    if dist.world_size == 1:
        return [_param_digest(trainer.model)]
    digests: list[str | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(digests, _param_digest(trainer.model))
    # Every rank is past the gather before any rank tears its sockets down.
    torch.distributed.barrier()
    # DDP's reducer holds the process group: left alive, gloo's threads were destroyed at
    # interpreter exit and aborted the rank now and then ("terminate called without an
    # active exception"). Drop the wrapper and collect it while the interpreter is whole.
    trainer.trained = trainer.model
    gc.collect()
    torch.distributed.destroy_process_group()
    return digests


@dataclass
class RunState:
    """What the loop carries from epoch to epoch; `last.pt` saves it beside the trainer's.
    `best_score` is the objective's metric at its best epoch, `best_artifact` what the report
    draws of that epoch (a classifier's confusion matrix)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -1.0
    best_artifact: Any = None

    def saved(self) -> dict[str, Any]:
        artifact = self.best_artifact
        if isinstance(artifact, np.ndarray):
            artifact = artifact.tolist()
        return {"history": self.history, "best_score": self.best_score, "best_artifact": artifact}

    @classmethod
    def restored(cls, state: dict[str, Any]) -> RunState:
        return cls(state["history"], state["best_score"], state["best_artifact"])


def end_of_epoch(
    trainer: Trainer,
    data: Prepared,
    run: RunState,
    epoch: int,
    train_loss: float,
    train_accuracy: float,
    spec_of: Callable[[dict[str, float], dict[str, Any]], ModelSpec],
    started: float,
) -> None:
    """Evaluate, record, checkpoint (best.pt when it improved, last.pt always), redraw."""
    config, out, objective = trainer.config, Path(trainer.config.out_dir), trainer.objective
    evaluation = objective.evaluate(trainer.model, data, trainer.device)
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        **evaluation.metrics,
        "elapsed_s": time.perf_counter() - started,
    }
    run.history.append(row)
    score = evaluation.metrics[objective.metric]
    improved = score > run.best_score
    if improved:
        run.best_score, run.best_artifact = score, evaluation.artifact
        metrics = {**evaluation.metrics, "epoch": epoch}
        spec = spec_of(metrics, objective.spec_parts(data, evaluation))
        save_best(out / BEST_NAME, trainer.model, spec, asdict(config))
    extra = {"epoch": epoch, "config": asdict(config)}
    save_state(out / LAST_NAME, {**trainer.state(), **run.saved(), **extra})
    _write_history(run.history, out)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items())
    accuracy = f" acc {100 * train_accuracy:.2f}%" if objective.counts_right else ""
    log.info(
        "epoch %d/%d  train loss %.4f%s  %s%s  (%.0f s)",
        epoch,
        config.epochs,
        train_loss,
        accuracy,
        shown,
        "  *best*" if improved else "",
        row["elapsed_s"],
    )


def _pretrained(config: TrainConfig):  # noqa: ANN202 - a Pretrained, or None
    """The pretrained source `--init-from` names (None: a checkpoint path, or no transfer)."""
    from convserve.models.pretrained import PRETRAINED

    if config.init_from is None or Path(config.init_from).exists():
        return None
    return PRETRAINED.get((config.model, config.init_from))


def transfer_source(config: TrainConfig) -> str | dict[str, torch.Tensor]:
    """What `--init-from` names: a pretrained source's weights, or a checkpoint's path."""
    assert config.init_from is not None
    found = _pretrained(config)
    if found is not None:
        return found.weights()
    if not Path(config.init_from).exists():
        raise FileNotFoundError(
            f"--init-from {config.init_from}: neither a checkpoint nor a pretrained source of "
            f"{config.model} (see convserve.models.pretrained)"
        )
    return config.init_from


def build_trainer(
    config: TrainConfig,
    objective: Objective,
    data: Prepared,
    model_kwargs: dict[str, Any],
    device: torch.device,
    dist: Distributed,
) -> Trainer:
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = create_model(config.model, **model_kwargs)
    model = model.to(device, memory_format=layout)  # pyright: ignore[reportCallIssue] - accepted
    if config.init_from:
        fresh = load_transfer(model, transfer_source(config), config.freeze_backbone)
        log.info("initialized from %s; trained from scratch: %s", config.init_from, fresh)
    optimizer = make_optimizer(config, model)
    per_rank = math.ceil(len(data.x_train) / dist.world_size)  # the sampler pads to equal shards
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    return Trainer(
        config=config,
        objective=objective,
        model=model,
        trained=torch.nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model,
        optimizer=optimizer,
        scheduler=make_schedule(config, optimizer, config.epochs * steps_per_epoch),
        scaler=torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda"),
        # Augmentation draws differ per rank; the shuffle is the sampler's (seeded per epoch).
        generator=torch.Generator().manual_seed(config.seed + dist.rank),
        device=device,
        layout=layout,
        black=(0.0 - data.input_spec.mean[0]) / data.input_spec.std[0],
    )


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

    # --- data, model, optimizer, schedule ---
    pretrained = _pretrained(config)
    defaults = {"in_channels": 1, "input_size": 28}
    if pretrained is not None:  # the pretrained network's own input: 3 x 224 x 224
        defaults = {"in_channels": pretrained.input.channels, "input_size": pretrained.input.height}
    model_kwargs = {**defaults, **config.model_kwargs}
    objective = objective_for(task_of(config.model))
    data = objective.prepare(config, model_kwargs, pretrained.input if pretrained else None)
    model_kwargs = {**model_kwargs, **data.model_kwargs}  # what the data chose (anchors)
    if data.labels:
        model_kwargs.setdefault("num_classes", len(data.labels))
    trainer = build_trainer(config, objective, data, model_kwargs, device, dist)
    # Each rank takes its shard of every epoch (padded to equal size, so steps stay in step).
    sampler = torch.utils.data.DistributedSampler(
        range(len(data.x_train)),  # pyright: ignore[reportArgumentType] - it needs len() only
        num_replicas=dist.world_size,
        rank=dist.rank,
        seed=config.seed,
    )

    run, first_epoch = RunState(), 1
    if config.resume:
        state = load_state(config.resume)
        trainer.restore(state)
        run, first_epoch = RunState.restored(state), state["epoch"] + 1
        log.info("resumed from %s at epoch %d", config.resume, first_epoch)

    def spec_of(metrics: dict[str, float], parts: dict[str, Any]) -> ModelSpec:
        return ModelSpec(
            architecture=config.model,
            dataset=parts.pop("dataset", config.dataset),
            kwargs=model_kwargs,
            input=data.input_spec,
            labels=data.labels,
            metrics=metrics,
            **parts,
        )

    started = time.perf_counter() - (run.history[-1]["elapsed_s"] if run.history else 0.0)
    for epoch in range(first_epoch, min(config.epochs, config.stop_after or config.epochs) + 1):
        # --- forward/backward, step ---
        if dist.world_size > 1:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        else:  # one process: the training stream of earlier releases, run for run identical
            order = objective.order(data, trainer.generator)
        desc = f"epoch {epoch}/{config.epochs}"
        show = config.progress and dist.is_main
        train_loss, train_accuracy = trainer.train_one_epoch(
            data.x_train, data.y_train, order, desc, show
        )

        # --- eval + checkpoint (rank 0; the others wait at the barrier) ---
        due = epoch % config.eval_every == 0 or epoch in (config.epochs, config.stop_after)
        if dist.is_main and due:
            end_of_epoch(trainer, data, run, epoch, train_loss, train_accuracy, spec_of, started)
        if dist.world_size > 1:
            torch.distributed.barrier()

    # --- report ---
    digests = _rank_digests(trainer, dist)
    if not dist.is_main:
        return TrainResult(checkpoint=out / BEST_NAME, metrics={})
    metrics = {
        "model": config.model,
        "model_kwargs": model_kwargs,
        "dataset": config.dataset,
        objective.summary: run.best_score,
        "best_epoch": max(run.history, key=lambda h: h[objective.metric])["epoch"],
        "train_time_s": time.perf_counter() - started,
        "train_images": len(data.x_train),
        "test_images": len(data.x_test),
        "world_size": dist.world_size,
        "rank_weight_digests": digests,
        "device": str(device),
        "history": run.history,
        "config": asdict(config),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    objective.report(run.best_artifact, data, out, config.model, run.best_score)
    return TrainResult(checkpoint=out / BEST_NAME, metrics=metrics)
