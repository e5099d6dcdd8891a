"""Object detection's arithmetic, vectorized in numpy: intersection over union, non-max
suppression per class, from a detector's decoded outputs to the detections of one image, and
anchor-shape IoU for assigning objects to anchors.

Boxes are (x1, y1, x2, y2), x to the right and y down, in pixels; a box's area is
(x2 - x1) * (y2 - y1), so boxes that only touch share no area. Torch-free: training (anchor
assignment) and the service both use it; average precision is the training side's
(`convserve.models.evaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Candidates kept for suppression, best first (as torchvision's detectors keep 1,000): with a
# score threshold near 0 every (box, class) pair would qualify, and suppression is quadratic.
PRE_NMS_TOP = 500


def area(boxes: np.ndarray) -> np.ndarray:
    """... x 4 -> ..., zero for empty or inverted boxes."""
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(
        boxes[..., 3] - boxes[..., 1], 0, None
    )


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in `a` (N x 4) with every box in `b` (M x 4):
    N x M, in [0, 1]; 0 where both boxes are empty."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)  # N x M
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def shape_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box shapes (width, height) as if they shared a centre: N x 2, M x 2 -> N x M.
    YOLO assigns each object to the anchor whose shape fits it best by this."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    inter = np.minimum(a[:, None, 0], b[None, :, 0]) * np.minimum(a[:, None, 1], b[None, :, 1])
    union = (a[:, 0] * a[:, 1])[:, None] + (b[:, 0] * b[:, 1])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-max suppression: keep the best-scoring box, discard every box whose IoU with
    it is over `iou_threshold`, repeat. Returns kept indices, best first (ties: lower index)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    overlaps = iou(boxes, boxes)
    alive = np.ones(len(order), dtype=bool)  # by position in `order`
    for pos, i in enumerate(order):
        if not alive[pos]:
            continue
        keep.append(int(i))
        alive[pos + 1 :] &= overlaps[i, order[pos + 1 :]] <= iou_threshold
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """Non-max suppression within each class independently (boxes of different classes never
    suppress each other): kept indices, best first."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    # One pass over all classes: shifting each class's boxes far apart makes cross-class
    # overlaps zero, the trick torchvision's batched_nms uses.
    boxes = np.asarray(boxes, dtype=np.float64)
    span = float(boxes.max() - min(0.0, boxes.min())) + 1.0
    shifted = boxes + (np.asarray(classes, dtype=np.float64) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


@dataclass(frozen=True)
class Detections:
    """One image's detections, best first: boxes K x 4, scores K, class indices K."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def select(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
) -> Detections:
    """A detector's decoded outputs for one image -> its detections.

    boxes: M x 4 candidate boxes; scores: M x classes (objectness times class probability).
    Each (box, class) pair scoring at least `score_threshold` is a candidate (the best
    `PRE_NMS_TOP` of them); non-max suppression runs per class; the best `max_detections`
    remain, by score."""
    rows, classes = np.nonzero(scores >= score_threshold)
    candidate_scores = scores[rows, classes]
    if len(rows) > PRE_NMS_TOP:
        best = np.argsort(-candidate_scores, kind="stable")[:PRE_NMS_TOP]
        rows, classes, candidate_scores = rows[best], classes[best], candidate_scores[best]
    keep = batched_nms(boxes[rows], candidate_scores, classes, iou_threshold)[:max_detections]
    return Detections(boxes[rows[keep]], candidate_scores[keep], classes[keep])
