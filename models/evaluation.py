"""How well a trained model does, as papers report it: ROC-AUC and the verification threshold
(scikit-learn), the pairs and one-shot trials of verification, and detection's average
precision (PASCAL VOC's all-points and COCO's 101-point interpolation, checked in the tests
against pycocotools on the same detections).

Training, export and the served evaluation (`convserve.loadtest.evaluate`) use these; the
server never does, so none of it lives in the torch-free serving core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from convserve.tasks.detect import Detections, iou

# --- verification ----------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher: more likely positive) for the boolean
    `positive`: the chance that a random positive outscores a random negative, ties counting
    half. NaN when either kind is missing."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


def best_threshold(distances: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold tau on squared distances (same identity when d <= tau) with the highest
    accuracy on these pairs, and that accuracy; tau is one of the observed distances (0 when
    calling every pair different is best)."""
    d, same = np.asarray(distances, dtype=np.float64), np.asarray(same, dtype=bool)
    positives, negatives = int(same.sum()), int((~same).sum())
    if positives == 0 or negatives == 0:  # one kind only: call every pair that kind
        return (0.0 if positives == 0 else float(d.max())), 1.0
    # On -d, "positive" is d <= -threshold; every distinct distance is a threshold.
    fpr, tpr, thresholds = roc_curve(same, -d, drop_intermediate=False)
    correct = tpr * positives + (1 - fpr) * negatives
    best = int(np.argmax(correct))
    tau = 0.0 if not np.isfinite(thresholds[best]) else float(-thresholds[best])
    return tau, float(correct[best] / len(d))


def verification_pairs(
    labels: np.ndarray, count: int = 3000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`count` index pairs of a labelled set (seeded), half the same class and half different:
    the evaluation's pairs (P x 2 indices, P booleans)."""
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    classes = list(by_class)
    pairs, same = [], []
    for i in range(count):
        if i % 2 == 0:
            members = by_class[classes[rng.integers(len(classes))]]
            a, b = rng.choice(members, 2, replace=False)
        else:
            ca, cb = rng.choice(len(classes), 2, replace=False)
            a, b = rng.choice(by_class[classes[ca]]), rng.choice(by_class[classes[cb]])
        pairs.append((a, b))
        same.append(i % 2 == 0)
    return np.array(pairs), np.array(same)


def pair_kinds(labels: np.ndarray) -> list[tuple[int, int]]:
    """The kinds of pair among P x 2 pair classes, as (p, q) with p <= q: the same kinds
    (c, c) first, then the different ones, each in class order."""
    classes = sorted(int(c) for c in np.unique(labels))
    return [(c, c) for c in classes] + [
        (p, q) for i, p in enumerate(classes) for q in classes[i + 1 :]
    ]


def of_kind(labels: np.ndarray, p: int, q: int) -> np.ndarray:
    """P booleans: which pairs (P x 2 classes, in either order) are of kind (p, q), p <= q."""
    labels = np.asarray(labels)
    lo, hi = labels.min(axis=1), labels.max(axis=1)
    return (lo == p) & (hi == q)


def roc_auc_by_kind(
    distances: np.ndarray, labels: np.ndarray, names: dict[int, str]
) -> dict[str, dict[str, float]]:
    """Where a verifier fails: ROC-AUC of the distance restricted to the same pairs of one
    class against the different pairs of one class pair. labels: P x 2, each pair's two
    classes. Answer[same][different], e.g. ["Bag"]["Sneaker / Ankle boot"]: the chance that
    two bags are closer than a sneaker and an ankle boot. The overall ROC-AUC over balanced
    pairs is close to the mean of these cells."""
    d = np.asarray(distances, dtype=np.float64)
    kinds = pair_kinds(labels)
    different = [(p, q) for p, q in kinds if p != q]
    table: dict[str, dict[str, float]] = {}
    for s in (p for p, q in kinds if p == q):
        same = of_kind(labels, s, s)
        row = {}
        for p, q in different:
            chosen = same | of_kind(labels, p, q)
            row[f"{names[p]} / {names[q]}"] = roc_auc(-d[chosen], same[chosen])
        table[names[s]] = row
    return table


def one_shot_accuracy(
    embeddings: np.ndarray, labels: np.ndarray, trials: int = 1000, seed: int = 0
) -> float:
    """N-way one-shot recognition: one reference image per class (N = the classes present), a
    query of one of them; correct when its nearest reference is its class. Mean over trials."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    right = 0
    for _ in range(trials):
        refs = np.array([rng.choice(members) for members in by_class])
        truth = rng.integers(len(classes))
        query = rng.choice(np.setdiff1d(by_class[truth], refs[truth]))
        d = ((embeddings[refs] - embeddings[query]) ** 2).sum(1)
        right += int(np.argmin(d) == truth)
    return right / trials


# --- detection --------------------------------------------------------------------------------


def average_precision(
    scores: np.ndarray, correct: np.ndarray, truths: int, points: int | None = None
) -> float:
    """AP of one class from its detections (`scores`, and whether each matched a truth) and the
    number of true objects. `points=None`: all-points interpolation (the area under the
    precision envelope, PASCAL VOC since 2010); `points=101`: COCO's 101 recall points."""
    if truths == 0:
        return float("nan")  # a class with no object in the set has no AP
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.asarray(correct, dtype=bool)[order]
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    recall = tp / truths
    precision = tp / np.maximum(tp + fp, 1)
    # The envelope: precision at recall r is the best precision at any recall >= r.
    envelope = np.maximum.accumulate(np.concatenate([precision, [0.0]])[::-1])[::-1]
    if points is None:
        r = np.concatenate([[0.0], recall])
        return float(np.sum((r[1:] - r[:-1]) * envelope[:-1]))
    grid = np.linspace(0, 1, points)
    at = np.searchsorted(recall, grid, side="left")
    return float(np.mean(np.where(at < len(recall), envelope[np.minimum(at, len(recall))], 0.0)))


def match(
    detections: Detections, true_boxes: np.ndarray, true_classes: np.ndarray, threshold: float
) -> np.ndarray:
    """Which of one image's detections are correct at an IoU threshold: best score first, each
    takes the unmatched truth of its class it overlaps most, if that IoU is at least
    `threshold`; a truth is matched once (a second detection of it is a false positive)."""
    correct = np.zeros(len(detections), dtype=bool)
    if len(detections) == 0 or len(true_boxes) == 0:
        return correct
    overlaps = iou(detections.boxes, true_boxes)  # detections x truths
    taken = np.zeros(len(true_boxes), dtype=bool)
    for d in np.argsort(-detections.scores, kind="stable"):
        candidates = (true_classes == detections.classes[d]) & ~taken
        if not candidates.any():
            continue
        ious = np.where(candidates, overlaps[d], -1.0)
        best = int(np.argmax(ious))
        if ious[best] >= threshold:
            taken[best] = True
            correct[d] = True
    return correct


@dataclass(frozen=True)
class MeanAP:
    map50: float  # mean over classes of AP at IoU 0.5, all-points interpolation
    map50_95: float  # COCO-style: mean over IoU 0.50, 0.55, ... 0.95 and classes, 101 points
    per_class50: list[float]  # AP at 0.5 of each class (nan: no object of it)


def mean_average_precision(
    predictions: list[Detections],
    truths: list[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
) -> MeanAP:
    """mAP over a set of images: `predictions[i]` against `truths[i]` = (boxes K x 4,
    classes K)."""

    def ap_at(threshold: float, points: int | None) -> list[float]:
        per_class_scores: list[list[float]] = [[] for _ in range(num_classes)]
        per_class_hits: list[list[bool]] = [[] for _ in range(num_classes)]
        counts = np.zeros(num_classes, dtype=np.int64)
        for dets, (boxes, classes) in zip(predictions, truths, strict=True):
            correct = match(dets, boxes, classes, threshold)
            for c, s, ok in zip(dets.classes, dets.scores, correct, strict=True):
                per_class_scores[int(c)].append(float(s))
                per_class_hits[int(c)].append(bool(ok))
            counts += np.bincount(np.asarray(classes, dtype=np.int64), minlength=num_classes)
        return [
            average_precision(
                np.asarray(per_class_scores[c]),
                np.asarray(per_class_hits[c]),
                int(counts[c]),
                points,
            )
            for c in range(num_classes)
        ]

    per_class50 = ap_at(0.5, None)
    coco = [np.nanmean(ap_at(t, 101)) for t in np.arange(0.5, 0.96, 0.05)]
    return MeanAP(float(np.nanmean(per_class50)), float(np.mean(coco)), per_class50)
