"""Training a YOLO-style detector: anchors from the training boxes, each object assigned to a
cell and an anchor, the YOLO loss, and mAP on the test scenes.

- Anchors: k-means on the training boxes' shapes with 1 - IoU as the distance (YOLOv2), so the
  B anchors are the shapes the objects have.
- Assignment: an object belongs to the cell holding its centre and to the anchor whose shape
  fits it best (highest shape IoU); that anchor's target is (x, y in the cell, log of width and
  height relative to the anchor, objectness 1, class). Every other anchor's objectness is 0.
- Loss per image: box (squared error of the sigmoid offsets and the log sizes, responsible
  anchors), objectness (binary cross-entropy, negatives weighted down: most anchors hold
  nothing), class (cross-entropy, responsible anchors).
- Evaluation: mAP at IoU 0.5 (all-points) and COCO-style 0.5:0.95 on the test scenes, through
  the same decoding and non-max suppression as serving.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from convserve.models.data import SCENES, TEST_SCENES, load_scenes
from convserve.models.evaluation import mean_average_precision
from convserve.models.objectives import OBJECTIVES, Evaluation, Objective, Prepared, to_inputs
from convserve.spec import (
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DetectSpec,
    InputSpec,
)
from convserve.tasks.detect import Detections, select, shape_iou

if TYPE_CHECKING:
    from convserve.models.train import TrainConfig, Trainer

TRAIN_SCENES = 24_000
NOOBJ_WEIGHT = 0.5  # YOLO's lambda_noobj: empty anchors outnumber objects ~60 to 1
BOX_WEIGHT = 5.0  # YOLO's lambda_coord
EVAL_SCORE, EVAL_IOU, EVAL_MAX = 0.01, 0.45, 100  # detection papers evaluate with a low floor


def kmeans_anchors(shapes: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """k box shapes (w, h) clustering `shapes` (N x 2) with 1 - IoU of shapes as the distance,
    smallest first."""
    rng = np.random.default_rng(seed)
    centres = shapes[rng.choice(len(shapes), k, replace=False)].astype(np.float64)
    for _ in range(iterations):
        nearest = shape_iou(shapes, centres).argmax(1)
        moved = np.array(
            [
                np.median(shapes[nearest == j], axis=0) if (nearest == j).any() else centres[j]
                for j in range(k)
            ]
        )
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres[np.argsort(centres.prod(1))]


def encode_targets(
    boxes: list[np.ndarray], classes: list[np.ndarray], anchors: np.ndarray, grid: int, stride: int
) -> torch.Tensor:
    """Each scene's objects as YOLO targets: N x S x S x B x 6 (tx, ty, tw, th, objectness,
    class). Two objects on one cell and anchor: the larger keeps it (rare: scenes overlap
    little)."""
    target = np.zeros((len(boxes), grid, grid, len(anchors), 6), dtype=np.float32)
    for n, (b, c) in enumerate(zip(boxes, classes, strict=True)):
        if len(b) == 0:
            continue
        wh = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
        centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1) / stride
        best = shape_iou(wh, anchors).argmax(1)
        for k in np.argsort(wh.prod(1)):  # larger objects last: they win a shared anchor
            col, row = np.minimum(centre[k].astype(int), grid - 1)
            a = best[k]
            target[n, row, col, a] = (
                centre[k, 0] - col,
                centre[k, 1] - row,
                math.log(wh[k, 0] / anchors[a, 0]),
                math.log(wh[k, 1] / anchors[a, 1]),
                1.0,
                c[k],
            )
    return torch.from_numpy(target)


def yolo_loss(raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """raw: N x S x S x B x (5 + C); target: N x S x S x B x 6 -> the batch's mean loss per
    image."""
    raw = raw.float()
    obj = target[..., 4]
    has = obj > 0
    n = raw.shape[0]
    box = F.mse_loss(torch.sigmoid(raw[..., :2])[has], target[..., :2][has], reduction="sum")
    box = box + F.mse_loss(raw[..., 2:4][has], target[..., 2:4][has], reduction="sum")
    objectness = F.binary_cross_entropy_with_logits(raw[..., 4], obj, reduction="none")
    objectness = (objectness * torch.where(has, 1.0, NOOBJ_WEIGHT)).sum()
    cls = F.cross_entropy(raw[..., 5:][has], target[..., 5][has].long(), reduction="sum")
    return (BOX_WEIGHT * box + objectness + cls) / n


def detect(
    model: torch.nn.Module,
    x: torch.Tensor,
    device: torch.device,
    batch: int = 250,
    score: float = EVAL_SCORE,
    iou: float = EVAL_IOU,
    top: int = EVAL_MAX,
) -> list[Detections]:
    """Detections of each image, through the same decoding and suppression as serving."""
    model.eval()
    out: list[Detections] = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            boxes, scores = model.decode(model(x[i : i + batch].to(device)))  # type: ignore[operator]
            for b, s in zip(boxes.cpu().numpy(), scores.cpu().numpy(), strict=True):
                out.append(
                    select(b, s, score_threshold=score, iou_threshold=iou, max_detections=top)
                )
    return out


class Detection(Objective):
    task = "detect"
    metric = "map50"
    summary = "best_map50"

    def prepare(
        self, config: TrainConfig, model_kwargs: dict[str, Any], pretrained: InputSpec | None
    ) -> Prepared:
        from convserve.models import create_model

        count = config.train_limit or TRAIN_SCENES
        train = load_scenes("train", count, config.data_dir)
        test = load_scenes("test", config.test_limit or TEST_SCENES, config.data_dir)
        size = train.images.shape[1]
        spec = InputSpec(
            channels=1,
            height=size,
            width=size,
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
            resize="letterbox",
        )
        boxes = np.concatenate([b for b in train.boxes if len(b)])
        shapes = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        anchors = kmeans_anchors(shapes, k=3, seed=config.seed)
        probe = create_model(config.model, input_size=size, anchors=anchors.tolist())
        grid, stride = int(getattr(probe, "grid")), int(getattr(probe, "stride"))  # noqa: B009
        return Prepared(
            x_train=to_inputs(train.images[..., None], spec),
            y_train=encode_targets(train.boxes, train.classes, anchors, grid, stride),
            x_test=to_inputs(test.images[..., None], spec),
            y_test=encode_targets(test.boxes, test.classes, anchors, grid, stride),
            input_spec=spec,
            labels=FASHION_MNIST_LABELS,
            model_kwargs={"input_size": size, "anchors": [list(map(float, a)) for a in anchors]},
            extra={
                "test_truths": list(zip(test.boxes, test.classes, strict=True)),
                "test_images": test.images,
                "grid": grid,
            },
        )

    def loss(
        self, trainer: Trainer, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        if trainer.config.hflip:  # a mirrored scene is a scene: boxes and offsets mirror too
            flip = torch.rand(len(xb), generator=trainer.generator) < 0.5
            xb, yb = xb.clone(), yb.clone()
            xb[flip] = xb[flip].flip(-1)
            mirrored = yb[flip].flip(2)  # columns reversed
            mirrored[..., 0] = torch.where(mirrored[..., 4] > 0, 1 - mirrored[..., 0], 0.0)
            yb[flip] = mirrored
        raw = trainer.trained(trainer.to_device(xb))
        return yolo_loss(raw, yb.to(trainer.device)), 0

    def evaluate(self, model: torch.nn.Module, data: Prepared, device: torch.device) -> Evaluation:
        with torch.no_grad():
            model.eval()
            total = 0.0
            for i in range(0, len(data.x_test), 500):
                xb, yb = data.x_test[i : i + 500].to(device), data.y_test[i : i + 500].to(device)
                total += yolo_loss(model(xb), yb).item() * len(xb)
        found = detect(model, data.x_test, device)
        result = mean_average_precision(found, data.extra["test_truths"], len(data.labels))
        metrics = {
            "test_loss": total / len(data.x_test),
            "map50": result.map50,
            "map50_95": result.map50_95,
        }
        return Evaluation(
            metrics,
            {"per_class_ap50": result.per_class50, "detections": [_plain(d) for d in found[:6]]},
        )

    def spec_parts(self, data: Prepared, evaluation: Evaluation) -> dict[str, Any]:
        anchors = tuple(tuple(a) for a in data.model_kwargs["anchors"])
        return {
            "task": "detect",
            "dataset": SCENES,
            "detect": DetectSpec(grid=data.extra["grid"], anchors=anchors),
        }

    def report(self, artifact: Any, data: Prepared, out: Path, model: str, score: float) -> None:
        from convserve.models.plots import plot_detections

        found = [
            Detections(
                np.asarray(d["boxes"]).reshape(-1, 4),
                np.asarray(d["scores"]),
                np.asarray(d["classes"], dtype=np.int64),
            )
            for d in artifact["detections"]
        ]
        plot_detections(
            data.extra["test_images"][: len(found)],
            found,
            data.extra["test_truths"][: len(found)],
            data.labels,
            out / "detections.png",
            f"{model}: mAP@0.5 {score:.3f} (test scenes)",
        )


def _plain(d: Detections) -> dict[str, list]:
    """Detections as JSON-able lists (the run state saves the best epoch's)."""
    keep = d.scores >= 0.25  # what the picture shows: the served default threshold
    return {
        "boxes": d.boxes[keep].tolist(),
        "scores": d.scores[keep].tolist(),
        "classes": d.classes[keep].tolist(),
    }


OBJECTIVES["detect"] = Detection
