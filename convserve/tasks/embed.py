"""Embeddings for one-shot verification: f(x) of unit length, two images the same identity
when the squared L2 distance between their embeddings is at most a threshold tau."""

from __future__ import annotations

import numpy as np


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def squared_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a - b||^2 row by row (N x D, N x D -> N); for unit vectors 2 - 2 cos, in [0, 4]."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.einsum("nd,nd->n", diff, diff)


def pairwise_squared_distances(x: np.ndarray) -> np.ndarray:
    """N x D -> N x N squared L2 distances."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("nd,nd->n", x, x)
    return np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher: more likely positive) for the boolean
    `positive`: the probability that a random positive outscores a random negative, ties
    counting half (the Mann-Whitney statistic, computed from ranks)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties: each run of equal scores gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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


def best_threshold(distances: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold tau on squared distances (same identity when d <= tau) with the highest
    accuracy on these pairs, and that accuracy; tau sits midway between two observed
    distances."""
    d, same = np.asarray(distances, dtype=np.float64), np.asarray(same, dtype=bool)
    order = np.argsort(d, kind="stable")
    d, same = d[order], same[order]
    # Accepting the first i pairs (smallest distances) as "same": correct = same among them
    # plus different among the rest.
    correct = np.r_[0, np.cumsum(same)] + np.r_[(~same).sum(), (~same).sum() - np.cumsum(~same)]
    i = int(np.argmax(correct))
    tau = 0.0 if i == 0 else float(d[i - 1] if i == len(d) else (d[i - 1] + d[i]) / 2)
    return tau, float(correct[i] / len(d))


def verification_pairs(
    labels: np.ndarray, count: int = 3000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`count` index pairs of a labelled set (seeded), half the same class and half different:
    the evaluation's pairs."""
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
