"""Training curves and confusion matrix as PNG (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from convserve.models.evaluation import of_kind, pair_kinds

CURVE_KEYS = {"epoch", "elapsed_s", "train_loss", "test_loss"}


def plot_curves(history: Sequence[dict[str, float]], path: Path) -> None:
    """Loss per epoch, and every other measure the objective records (accuracy for a
    classifier; mAP for a detector; ROC-AUC for an embedding), in percent."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], marker="o", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    measures = [k for k in history[0] if k not in CURVE_KEYS]
    if "test_accuracy" not in measures:  # the objective has no accuracy of its own
        measures = [k for k in measures if k != "train_accuracy"]
    for key in measures:
        label = {"train_accuracy": "train", "test_accuracy": "test"}.get(key, key)
        ax_metric.plot(epochs, [100 * h[key] for h in history], marker="o", label=label)
    title = "Accuracy" if "test_accuracy" in measures else "Test set"
    ax_metric.set(
        xlabel="epoch", ylabel="%" if title != "Accuracy" else "accuracy (%)", title=title
    )
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    """`matrix[true, predicted]` counts, drawn row-normalized so each row reads as recall."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    _save(fig, path)


def plot_runs(histories: dict[str, Sequence[dict[str, float]]], path: Path, title: str) -> None:
    """Test accuracy per epoch, one line per run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        ax.plot(
            [h["epoch"] for h in history],
            [100 * h["test_accuracy"] for h in history],
            marker="o",
            label=name,
        )
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_detections(images, found, truths, labels: Sequence[str], path: Path, title: str) -> None:  # noqa: ANN001
    """Scenes with their true boxes (green) and the detections (orange, label and score)."""
    from matplotlib.patches import Rectangle

    cols = min(3, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, dets, (boxes, _) in zip(axes.ravel(), images, found, truths, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        for x1, y1, x2, y2 in boxes:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="#3ddc84", lw=1.5))
        for (x1, y1, x2, y2), score, c in zip(dets.boxes, dets.scores, dets.classes, strict=True):
            ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="#f5a623", lw=1.2, ls="--")
            )
            ax.text(
                x1,
                y1 - 1,
                f"{labels[int(c)]} {score:.2f}",
                color="black",
                fontsize=6,
                bbox={"facecolor": "#f5a623", "pad": 0.5, "lw": 0},
            )
    fig.suptitle(title + "  (green: truth, orange: detected)")
    _save(fig, path, dpi=110)


def plot_embeddings(
    points: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    unseen: Sequence[int],
    path: Path,
    title: str,
) -> None:
    """Embeddings projected on their first two principal components, one colour per class;
    classes never seen in training drawn as crosses."""
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(8, 6.5))
    cmap = plt.get_cmap("tab10")
    for c in sorted(set(labels.tolist())):
        mine = labels == c
        marker = "x" if c in unseen else "."
        tag = " (unseen)" if c in unseen else ""
        ax.scatter(
            xy[mine, 0],
            xy[mine, 1],
            s=10,
            marker=marker,
            color=cmap(c),
            label=f"{names[int(c)]}{tag}",
            alpha=0.7,
        )
    ax.set(xlabel="first principal component", ylabel="second principal component", title=title)
    ax.legend(fontsize=7, markerscale=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_pair_distances(
    distances: np.ndarray, labels: np.ndarray, names: dict[int, str], tau: float, path: Path,
    title: str,
) -> None:  # fmt: skip
    """Histograms of the squared distance per kind of pair (labels: P x 2 classes): same-class
    pairs solid, different-class pairs dashed, the threshold tau as a vertical line. Where a
    same kind's histogram reaches into a different kind's, the verifier confuses them."""
    bins = np.linspace(0, max(float(distances.max()), tau) * 1.02, 41).tolist()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab10")
    for k, (p, q) in enumerate(pair_kinds(labels)):
        mine = of_kind(labels, p, q)
        if not mine.any():
            continue
        ax.hist(
            distances[mine], bins=bins, histtype="step", density=True, lw=1.6,
            ls="-" if p == q else "--", color=cmap(k), label=f"{names[p]} / {names[q]}",
        )  # fmt: skip
    ax.axvline(tau, color="black", lw=1, label=f"τ = {tau:.3f}")
    ax.set(xlabel="squared distance ‖f(a) − f(b)‖²", ylabel="density", title=title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig: Figure, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
