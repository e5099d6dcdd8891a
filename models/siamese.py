"""A Siamese embedding network for one-shot verification, trained with the triplet loss.

The network maps an image x to f(x), a unit-length vector; two images are the same
identity when ||f(x1) - f(x2)||^2 <= tau. Training pulls an anchor towards a positive (same
class) and pushes it from a negative (another class) until the gap is at least a margin:

    L = max(||f(A) - f(P)||^2 - ||f(A) - f(N)||^2 + alpha, 0)

with triplets mined online in each batch (P classes x K images): for each anchor its hardest
positive, and a semi-hard negative (the closest negative farther than that positive, FaceNet's
choice; the hardest negative when none is), so that training sees triplets it can learn from.

The one-shot setting, honestly: Fashion-MNIST classes 0-6 (T-shirt/top ... Shirt) are the
"people seen in training" (their training images, less a validation set); classes 7-9
(Sneaker, Bag, Ankle boot) are never seen, and the test split of those is where the model is
judged, as a face verifier is judged on people it never saw. tau is chosen on the validation
set of seen classes, never on the unseen ones.

A class is a coarse identity: the triplet loss alone pulls all of a class's images to one point,
and forgets how garments within a class differ, which is exactly what telling apart garments of
an unseen class needs. Two aids keep that (both optional, both from the seen training images
only): *look-alike identities*, each seen class split into groups of similar images by k-means
on the pixels, mined as identities beside the classes, and a *reconstruction cost*, a decoder
(training-only, not exported) that rebuilds the image from its embedding.

A class also teaches what does *not* matter, and that can be what an unseen class turns on:
sandals, flat and high, are one class, so the class loss teaches that a shoe's height does not
change its identity, the very cue between a sneaker and an ankle boot. Hence an optional second
head, trained on *shape identities* (each seen class split in two by k-means on the
silhouettes: flat sandals apart from high ones) where the first is trained on the classes; the
embedding holds both, and its distance is their mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from convserve.models.data import load_fashion_mnist
from convserve.models.embedding import head_parts
from convserve.models.evaluation import (
    best_threshold,
    one_shot_accuracy,
    roc_auc,
    verification_pairs,
)
from convserve.models.objectives import OBJECTIVES, Evaluation, Objective, Prepared, to_inputs
from convserve.spec import (
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    EmbedSpec,
    InputSpec,
)
from convserve.tasks.embed import squared_distance

if TYPE_CHECKING:
    from convserve.models.train import TrainConfig, Trainer

SEEN = (0, 1, 2, 3, 4, 5, 6)  # T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt
UNSEEN = (7, 8, 9)  # Sneaker, Bag, Ankle boot: never in training
VALIDATION = 500  # per class, held out of training: the epoch and tau are chosen there
GROUP_IMAGES = 4  # images of each look-alike group in a batch (P groups x K = 4)
SILHOUETTE = 20  # a garment's pixels: above 20 of 255 (the background is 0, with faint noise)
HEAD_DIM = 64  # each head's share of the embedding
MARGIN = 0.2  # alpha, on squared distances between unit vectors (which lie in [0, 4])


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = MARGIN
) -> torch.Tensor:
    """Mean of max(||a - p||^2 - ||a - n||^2 + margin, 0) over the triplets (rows)."""
    d_ap = (anchor - positive).pow(2).sum(1)
    d_an = (anchor - negative).pow(2).sum(1)
    return F.relu(d_ap - d_an + margin).mean()


def split_classes(
    features: np.ndarray, labels: np.ndarray, per_class: int, max_iter: int = 25
) -> np.ndarray:
    """Each class split into `per_class` clusters of its images' features (k-means): ids
    c * per_class + k, so a cluster never spans two classes. features: N x F."""
    from sklearn.cluster import KMeans

    ids = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(per_class, len(members))
        kmeans = KMeans(n_clusters=k, n_init="auto", max_iter=max_iter, random_state=0)
        ids[members] = int(c) * per_class + np.asarray(kmeans.fit_predict(features[members]))
    return ids


def look_alike_groups(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Each class split into `per_class` groups of similar images (k-means on the pixels).
    images: N x H x W uint8."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0  # N x H*W
    return split_classes(flat, labels, per_class)


def shape_identities(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Each class split into `per_class` shapes (k-means on the silhouettes, not the shades:
    a flat sandal apart from a high one, whatever their print). images: N x H x W uint8."""
    silhouettes = (images > SILHOUETTE).reshape(len(images), -1).astype(np.float32)  # N x H*W
    return split_classes(silhouettes, labels, per_class, max_iter=50)


def mine_triplets(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Indices (anchor, positive, negative) for every anchor with a positive in the batch: its
    hardest positive, and its semi-hard negative (the closest negative farther than that
    positive), or its hardest negative when no negative is farther."""
    with torch.no_grad():
        d = torch.cdist(embeddings, embeddings).pow(2)  # N x N squared distances
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positives = same & ~eye
        has = positives.any(1)
        d_pos = torch.where(positives, d, torch.full_like(d, -1.0))
        hardest_pos = d_pos.argmax(1)  # N
        far = d_pos.max(1).values[:, None]  # the hardest positive's distance
        negatives = ~same
        semi = negatives & (d > far)
        inf = torch.full_like(d, float("inf"))
        semi_hard = torch.where(semi, d, inf).argmin(1)
        hardest_neg = torch.where(negatives, d, inf).argmin(1)
        negative = torch.where(semi.any(1), semi_hard, hardest_neg)
        anchors = torch.arange(len(labels), device=labels.device)[has]
    return anchors, hardest_pos[has], negative[has]


class Verification(Objective):
    task = "embed"
    metric = "val_auc"  # chosen on seen classes' validation images, never on unseen ones
    summary = "best_val_auc"

    def prepare(
        self, config: TrainConfig, model_kwargs: dict[str, Any], pretrained: InputSpec | None
    ) -> Prepared:
        train = load_fashion_mnist("train", config.data_dir)
        test = load_fashion_mnist("test", config.data_dir)
        spec = InputSpec(
            channels=1, height=28, width=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
        )
        seen = np.isin(train.labels, SEEN)
        held = np.zeros(len(train.labels), dtype=bool)
        for c in SEEN:  # the last VALIDATION images of each seen class: tau is chosen there
            held[np.flatnonzero(train.labels == c)[-VALIDATION:]] = True
        fit = np.flatnonzero(seen & ~held)[: config.train_limit]
        val = np.flatnonzero(held)
        # tau is chosen on pairs of classes held out of training, as the unseen ones are: the
        # training split's last images of those classes (the test pairs come from the test
        # split). A tau chosen on seen classes does not transfer: the network learned to
        # pull their pairs together, and unseen classes' distances fall elsewhere.
        outside = np.concatenate([np.flatnonzero(train.labels == c)[-VALIDATION:] for c in UNSEEN])
        limit = config.test_limit
        unseen_test = np.flatnonzero(np.isin(test.labels, UNSEEN))[:limit]
        seen_test = np.flatnonzero(np.isin(test.labels, SEEN))[:limit]
        labels = train.labels[fit].astype(np.int64)
        groups = labels  # one group per class: the classes alone
        if config.look_alikes:
            groups = look_alike_groups(train.images[fit], labels, config.look_alikes)
        shapes = labels  # one shape per class: the classes alone
        if config.shapes:
            shapes = shape_identities(train.images[fit], labels, config.shapes)
        heads = head_count(config)
        return Prepared(
            x_train=to_inputs(train.images[fit], spec),
            # N x 3: the class, its look-alike group and its shape (each the class, without)
            y_train=torch.from_numpy(np.stack([labels, groups, shapes], axis=1)),
            x_test=to_inputs(train.images[val], spec),  # validation: picks the epoch
            y_test=torch.from_numpy(train.labels[val]),
            input_spec=spec,
            labels=(),
            model_kwargs={
                "dim": model_kwargs.get("dim", HEAD_DIM * heads),
                "heads": heads,
                "grid": bool(model_kwargs.get("grid", True)),
                "decoder": config.reconstruction > 0,
            },
            extra={
                "batch_size": config.batch_size,
                "look_alikes": bool(config.look_alikes),
                "held_out_classes": (to_inputs(train.images[outside], spec), train.labels[outside]),
                "unseen": (to_inputs(test.images[unseen_test], spec), test.labels[unseen_test]),
                "seen": (to_inputs(test.images[seen_test], spec), test.labels[seen_test]),
            },
        )

    def order(self, data: Prepared, generator: torch.Generator) -> torch.Tensor:
        """Batches in which every anchor has positives and negatives: the seen classes in equal
        parts, interleaved (c0 c1 ... c6 c0 ...); with look-alike groups, P groups x 4 images
        (drawn with replacement: a small group's images recur, differently augmented)."""
        classes, groups = data.y_train[:, 0], data.y_train[:, 1]
        if not data.extra["look_alikes"]:
            per_class = [torch.nonzero(classes == c).flatten() for c in torch.unique(classes)]
            shuffled = [idx[torch.randperm(len(idx), generator=generator)] for idx in per_class]
            rounds = min(len(s) for s in shuffled)
            return torch.stack([s[:rounds] for s in shuffled], dim=1).flatten()
        size = data.extra["batch_size"]
        members = [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
        steps = -(-len(groups) // size)  # as many steps as the schedule counts
        per_batch = max(2, size // GROUP_IMAGES)
        batches = []
        for _ in range(steps):
            picked = torch.randperm(len(members), generator=generator)[:per_batch]
            for g in picked.tolist():
                m = members[g]
                batches.append(m[torch.randint(len(m), (GROUP_IMAGES,), generator=generator)])
        return torch.cat(batches)

    def loss(
        self, trainer: Trainer, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        config = trainer.config
        clean = trainer.to_device(xb)
        if config.augment:
            from convserve.models.augment import augment_batch

            xb = augment_batch(xb, trainer.generator, fill=trainer.black, flip=config.hflip)
        xb = trainer.to_device(xb)
        if config.reconstruction > 0:
            embeddings, rebuilt = trainer.trained(xb, reconstruct=True)
        else:
            embeddings, rebuilt = trainer.trained(xb), None
        classes, groups, shapes = (yb[:, i].to(trainer.device) for i in range(3))
        # Each head's identities: the classes for the first, the shapes for the second; the
        # look-alike groups for both. The class triplets are mined once: the loss and the
        # count of those holding their margin share them.
        heads = head_parts(embeddings, head_count(config))
        e = heads[0]
        a, p, n = mine_triplets(e, classes)
        levels = [(heads[-1], shapes)] * bool(config.shapes)
        if config.look_alikes:
            levels += [(head, groups) for head in heads]
        terms = [triplet_loss(e[a], e[p], e[n])] + [_mined_loss(h, ids) for h, ids in levels]
        loss = torch.stack(terms).sum()
        if rebuilt is not None:  # the clean image, from the augmented view's embedding
            loss = loss + config.reconstruction * F.mse_loss(rebuilt.float(), clean)
        with torch.no_grad():  # how many class triplets already hold their margin
            d_ap = (e[a] - e[p]).pow(2).sum(1)
            d_an = (e[a] - e[n]).pow(2).sum(1)
        return loss, int((d_ap + MARGIN <= d_an).sum())

    def evaluate(self, model: torch.nn.Module, data: Prepared, device: torch.device) -> Evaluation:
        embed = lambda x: _embed(model, x, device)  # noqa: E731
        val = embed(data.x_test)
        val_labels = data.y_test.numpy()
        pairs, same = verification_pairs(val_labels)
        d_val = squared_distance(val[pairs[:, 0]], val[pairs[:, 1]])
        x_out, out_labels = data.extra["held_out_classes"]
        out_pairs, out_same = verification_pairs(out_labels, seed=3)
        out = embed(x_out)
        d_out = squared_distance(out[out_pairs[:, 0]], out[out_pairs[:, 1]])
        tau, _ = best_threshold(d_out, out_same)
        metrics = {"test_loss": _batch_loss(val, val_labels), "val_auc": roc_auc(-d_val, same)}
        metrics["seen_classes_threshold"] = best_threshold(d_val, same)[0]  # the old rule's
        for name in ("unseen", "seen"):
            x, labels = data.extra[name]
            emb = embed(x)
            p, s = verification_pairs(labels, seed=1)
            d = squared_distance(emb[p[:, 0]], emb[p[:, 1]])
            metrics[f"{name}_auc"] = roc_auc(-d, s)
            metrics[f"{name}_verify_accuracy"] = float(((d <= tau) == s).mean())
            metrics[f"{name}_one_shot"] = one_shot_accuracy(emb, labels)
        metrics["threshold"] = tau
        points, point_labels = [], []  # a sample of the test embeddings, for the picture
        for name in ("seen", "unseen"):
            x, labels = data.extra[name]
            step = max(1, len(labels) // 700)
            points += embed(x[::step]).tolist()
            point_labels += labels[::step].tolist()
        return Evaluation(metrics, {"threshold": tau, "points": points, "labels": point_labels})

    def spec_parts(self, data: Prepared, evaluation: Evaluation) -> dict[str, Any]:
        dim = int(data.model_kwargs["dim"])
        return {
            "task": "embed",
            "embed": EmbedSpec(dim=dim, threshold=evaluation.artifact["threshold"]),
        }

    def report(self, artifact: Any, data: Prepared, out: Path, model: str, score: float) -> None:
        from convserve.models.plots import plot_embeddings

        plot_embeddings(
            np.asarray(artifact["points"]),
            np.asarray(artifact["labels"]),
            FASHION_MNIST_LABELS,
            UNSEEN,
            out / "embeddings.png",
            f"{model}: test embeddings (validation AUC {score:.3f})",
        )


def head_count(config: TrainConfig) -> int:
    """The embedding's heads: the classes', and a second on shapes when classes are split."""
    return 2 if config.shapes else 1


def _mined_loss(embeddings: torch.Tensor, identities: torch.Tensor) -> torch.Tensor:
    a, p, n = mine_triplets(embeddings, identities)
    return triplet_loss(embeddings[a], embeddings[p], embeddings[n])


def _embed(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(x[i : i + 1000].to(device)).cpu().numpy() for i in range(0, len(x), 1000)]
        )


def _batch_loss(embeddings: np.ndarray, labels: np.ndarray, size: int = 700) -> float:
    """The mined triplet loss over batches of the validation set (the curve's test loss), in a
    fixed shuffled order so every batch holds every class."""
    order = np.random.default_rng(0).permutation(len(labels))
    e, y = torch.from_numpy(embeddings[order]), torch.from_numpy(labels[order])
    losses = []
    for i in range(0, len(e) - size + 1, size):
        a, p, n = mine_triplets(e[i : i + size], y[i : i + size])
        eb = e[i : i + size]
        losses.append(float(triplet_loss(eb[a], eb[p], eb[n])))
    return float(np.mean(losses)) if losses else 0.0


OBJECTIVES["embed"] = Verification
