"""Verification and style transfer against hand-worked values: the triplet loss, online
mining, ROC-AUC and the threshold, the Gram matrix and the Gatys costs, style weights, and
the stylized PNG's crop."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from convserve.errors import InvalidInput
from convserve.models.embedding import EmbeddingNet, head_parts
from convserve.models.evaluation import best_threshold, one_shot_accuracy, roc_auc, roc_auc_by_kind
from convserve.models.objectives import Prepared
from convserve.models.siamese import (
    GROUP_IMAGES,
    Verification,
    look_alike_groups,
    mine_triplets,
    shape_identities,
    triplet_loss,
)
from convserve.models.style import content_cost, gram, layer_style_cost, style_cost
from convserve.spec import InputSpec
from convserve.tasks.embed import pairwise_squared_distances, unit
from convserve.tasks.stylize import style_weights, to_png


def test_triplet_loss_is_the_margin_violation_and_zero_when_satisfied():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.0, 1.0]])  # ||a - p||^2 = 2
    n = torch.tensor([[1.0, 0.0]])  # ||a - n||^2 = 0: the worst case
    assert math.isclose(float(triplet_loss(a, p, n, margin=0.2)), 2.2, rel_tol=1e-6)
    far = torch.tensor([[-1.0, 0.0]])  # ||a - n||^2 = 4: 2 - 4 + 0.2 < 0
    assert float(triplet_loss(a, p, far, margin=0.2)) == 0.0
    # Exactly at the margin: d_ap - d_an + alpha = 0 -> no loss.
    assert float(triplet_loss(a, a, torch.tensor([[0.0, 1.0]]), margin=2.0)) == 0.0


def test_mining_picks_the_hardest_positive_and_a_semi_hard_negative():
    # Class 0 at x = 0, 1, 3; class 1 at x = 2 (between) and 10 (far), all on a line.
    e = torch.tensor([[0.0], [1.0], [3.0], [2.0], [10.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    anchors, positives, negatives = (t.tolist() for t in mine_triplets(e, labels))
    mined = dict(zip(anchors, zip(positives, negatives, strict=True), strict=True))
    # Anchor 0: hardest positive x=3 (d=9); negatives x=2 (d=4, closer: not semi-hard) and
    # x=10 (d=100, farther: semi-hard) -> 10.
    assert mined[0] == (2, 4)
    # Anchor 1: hardest positive x=3 (d=4); negative x=2 (d=1) is closer, x=10 (d=81) farther.
    assert mined[1] == (2, 4)
    # Anchor 3 (class 1): its only positive is x=10 (d=64); no negative is farther, so the
    # hardest negative, x=1 or x=3 (d=1): the first, x=1.
    assert mined[3] == (4, 1)
    assert sorted(anchors) == [0, 1, 2, 3, 4]


def test_look_alike_groups_split_a_class_by_looks_and_never_span_two():
    rng = np.random.default_rng(0)
    # Class 3: 30 dark images and 30 bright ones; class 5: 30 images with a bright left half.
    dark = rng.integers(0, 40, (30, 8, 8))
    bright = rng.integers(200, 255, (30, 8, 8))
    half = np.zeros((30, 8, 8), dtype=np.int64)
    half[:, :, :4] = rng.integers(200, 255, (30, 8, 4))
    images = np.concatenate([dark, bright, half]).astype(np.uint8)
    labels = np.repeat([3, 3, 5], 30)
    groups = look_alike_groups(images, labels, per_class=2)
    assert np.array_equal(groups // 2, labels)  # group c * 2 + k lies in class c
    assert len(set(groups[:30])) == 1 and len(set(groups[30:60])) == 1  # dark apart
    assert groups[0] != groups[30]  # from bright
    assert set(groups[60:]) <= {10, 11}


def test_shape_identities_split_a_class_by_silhouette_not_by_shade():
    rng = np.random.default_rng(0)
    # Class 5: low shoes (the bottom rows) and high ones (and the right columns), half of each
    # dark and half bright. Pixels split them by shade; the shapes must split them by height.
    shade = np.repeat([[30, 60], [200, 255]], 20, axis=0)  # 40 x 2: dark, then bright
    low = np.zeros((40, 8, 8), dtype=np.int64)
    high = np.zeros((40, 8, 8), dtype=np.int64)
    for i, (lo, hi) in enumerate(shade):
        low[i, 5:, :] = rng.integers(lo, hi, (3, 8))
        high[i, 5:, :] = rng.integers(lo, hi, (3, 8))
        high[i, :5, 5:] = rng.integers(lo, hi, (5, 3))
    images = np.concatenate([low, high]).astype(np.uint8)
    labels = np.full(80, 5)
    shapes = shape_identities(images, labels, per_class=2)
    assert set(shapes) <= {10, 11}  # shape c * 2 + k lies in class c
    assert len(set(shapes[:40])) == 1 and len(set(shapes[40:])) == 1
    assert shapes[0] != shapes[40]  # low apart from high, dark and bright alike
    by_pixels = look_alike_groups(images, labels, per_class=2)
    assert by_pixels[0] != by_pixels[20]  # what the pixels split instead: the shade


def test_look_alike_batches_hold_groups_of_four_with_positives_and_negatives():
    groups = np.repeat(np.arange(12), [1, 2, 3, 5, 8, 13, 1, 2, 3, 5, 8, 13])
    y = torch.from_numpy(np.stack([groups // 6, groups], axis=1))
    spec = InputSpec(channels=1, height=2, width=2, mean=(0.0,), std=(1.0,))
    data = Prepared(
        torch.zeros(len(groups), 1, 2, 2), y, torch.zeros(0), torch.zeros(0), spec, (),
        extra={"batch_size": 16, "look_alikes": True},
    )  # fmt: skip
    order = Verification().order(data, torch.Generator().manual_seed(0))
    assert len(order) == 16 * -(-len(groups) // 16)  # the schedule's steps, full batches
    for batch in order.view(-1, 16):
        drawn = y[batch, 1].view(-1, GROUP_IMAGES)  # 4 groups x 4 images
        assert (drawn == drawn[:, :1]).all()  # each four from one group
        assert len(set(drawn[:, 0].tolist())) == 4  # four different groups


def test_the_exported_embedder_leaves_the_decoder_behind_and_matches_the_network():
    torch.manual_seed(0)
    net = EmbeddingNet(decoder=True).eval()
    x = torch.randn(3, 1, 28, 28)
    embedder, names = net.for_export()
    assert names == ["embedding"]
    assert not any(name.startswith("decoder") for name, _ in embedder.named_parameters())
    e, rebuilt = net(x, reconstruct=True)
    assert rebuilt.shape == x.shape
    assert torch.allclose(embedder(x), e) and torch.allclose(net(x), e)
    assert torch.allclose(e.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError):
        EmbeddingNet()(x, reconstruct=True)  # no decoder, nothing to rebuild with


def test_two_heads_are_each_unit_length_and_the_distance_is_their_mean():
    torch.manual_seed(0)
    net = EmbeddingNet(dim=128, heads=2).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        e = net(x)  # 4 x 128
        embedder, _ = net.for_export()
        assert torch.allclose(embedder(x), e)
    assert e.shape == (4, 128) and torch.allclose(e.norm(dim=1), torch.ones(4))
    first, second = head_parts(e, 2)  # 4 x 64 each
    assert torch.allclose(first.norm(dim=1), torch.ones(4))
    assert torch.allclose(second.norm(dim=1), torch.ones(4))
    d = (e[0] - e[1]).pow(2).sum()
    d_heads = [(h[0] - h[1]).pow(2).sum() for h in (first, second)]
    assert torch.isclose(d, (d_heads[0] + d_heads[1]) / 2)
    with pytest.raises(ValueError):
        EmbeddingNet(dim=65, heads=2)  # heads share the embedding equally


def test_roc_auc_and_the_threshold_of_hand_worked_scores():
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0], bool)) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0], bool)) == 0.0
    # One inversion of four positive-negative pairs.
    assert roc_auc(np.array([0.9, 0.3, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0], bool)) == 0.5  # a tie counts half
    d = np.array([0.1, 0.2, 0.9, 1.5])
    tau, accuracy = best_threshold(d, np.array([True, True, False, False]))
    assert math.isclose(tau, 0.2) and accuracy == 1.0  # the largest distance called "same"
    # same, different, same, different: no cut gets more than 3 of 4 right
    tau, accuracy = best_threshold(np.array([0.1, 0.3, 0.9, 1.5]), np.array([1, 0, 1, 0], bool))
    assert accuracy == 0.75 and tau in (0.1, 0.9)
    tau, accuracy = best_threshold(np.array([0.4, 0.5]), np.array([False, False]))
    assert tau == 0.0 and accuracy == 1.0  # calling every pair different is right


def test_roc_auc_by_kind_isolates_each_same_class_against_each_class_pair():
    # Same pairs of A at 0.1 and 0.3, of B at 0.9; different pairs A/B at 0.5, A/C at 0.2,
    # B/C at 1.0 (the pair's order does not matter: (C, A) is an A/C pair).
    d = np.array([0.1, 0.3, 0.9, 0.5, 0.2, 1.0])
    labels = np.array([[0, 0], [0, 0], [1, 1], [1, 0], [2, 0], [1, 2]])
    table = roc_auc_by_kind(d, labels, {0: "A", 1: "B", 2: "C"})
    assert set(table) == {"A", "B", "C"} and set(table["A"]) == {"A / B", "A / C", "B / C"}
    assert table["A"]["A / B"] == 1.0  # 0.1 and 0.3 both below 0.5
    assert table["A"]["A / C"] == 0.5  # 0.1 below 0.2, 0.3 above it
    assert table["B"]["A / B"] == 0.0 and table["B"]["B / C"] == 1.0
    assert math.isnan(table["C"]["A / B"])  # no same pair of C


def test_unit_vectors_and_distances():
    v = unit(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(v[0], [0.6, 0.8]) and np.array_equal(v[1], [0.0, 0.0])
    d = pairwise_squared_distances(np.array([[0.0, 0.0], [3.0, 4.0]]))
    assert np.allclose(d, [[0, 25], [25, 0]])


def test_one_shot_accuracy_is_perfect_for_separated_classes():
    rng = np.random.default_rng(0)
    e = np.concatenate([rng.normal(c, 0.01, (20, 2)) for c in ([0, 0], [5, 0], [0, 5])])
    labels = np.repeat([7, 8, 9], 20)
    assert one_shot_accuracy(e, labels, trials=200) == 1.0


def test_gram_matrix_and_costs_of_a_known_tensor():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]])  # C=2, H=W=2
    # Channel 0 flattened: 1 2 3 4; channel 1: 0 1 0 1.
    assert gram(a).tolist() == [[30.0, 6.0], [6.0, 2.0]]
    assert float(content_cost(a, a)) == 0.0
    b = a + 1.0  # every activation one higher: sum of squares 8, over 4 * 2 * 2 * 2 = 32
    assert math.isclose(float(content_cost(a, b)), 8 / 32)
    # b: channel 0 is 2 3 4 5, channel 1 is 1 2 1 2; G_01 = 2 + 6 + 4 + 10 = 22.
    assert gram(b).tolist() == [[54.0, 22.0], [22.0, 10.0]]
    # Differences from gram(a): 24, 16, 16, 8 -> squares sum 1152, over (2 * 2 * 2 * 2)^2.
    assert math.isclose(float(layer_style_cost(a, b)), 1152 / 256)
    total = style_cost([a, a], [b, a], [0.5, 0.5])
    assert math.isclose(float(total), 0.5 * 1152 / 256)


def test_style_weights_parse_blends_and_refuse_what_is_out_of_range():
    w = style_weights("3:0.5,12:0.5", 26)
    assert w.shape == (26,) and w[3] == w[12] == 0.5 and math.isclose(float(w.sum()), 1.0)
    assert style_weights("7", 26)[7] == 1.0
    assert np.allclose(style_weights("1:1,1:3", 26)[1], 1.0)  # repeated: added, then normalized
    for bad in ("26", "-1", "3:-1", "3:0", "x", "", "3:,", "1:inf"):
        with pytest.raises(InvalidInput) as err:
            style_weights(bad, 26)
        assert err.value.code == "invalid_style", bad


def test_the_stylized_png_is_cropped_to_the_upload():
    padded = np.random.default_rng(0).random((3, 36, 52)).astype(np.float32)
    img = Image.open(io.BytesIO(to_png(padded, 50, 33)))
    assert img.size == (50, 33) and img.mode == "RGB"
    expected = (np.clip(padded[:, :33, :50], 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(img), expected)


def test_tau_is_chosen_on_held_out_classes_and_transfers_to_unseen_ones(
    siamese_run, siamese_stored
):
    """tau comes from pairs of classes the network never trained on (the training split's),
    and on the unseen test pairs it is right more often than tau chosen on seen classes: their
    distances are not the unseen classes'."""
    import json

    import onnxruntime as ort

    from convserve.models.data import load_fashion_mnist
    from convserve.models.evaluation import verification_pairs
    from convserve.models.siamese import UNSEEN
    from convserve.preprocess import from_pixels
    from convserve.tasks.embed import squared_distance

    metrics = json.loads((siamese_run / "metrics.json").read_text())
    best = next(h for h in metrics["history"] if h["epoch"] == metrics["best_epoch"])
    tau, seen_tau = siamese_stored.spec.embed.threshold, best["seen_classes_threshold"]
    assert tau == pytest.approx(best["threshold"]) and tau != seen_tau
    test = load_fashion_mnist("test")
    idx = np.flatnonzero(np.isin(test.labels, UNSEEN))
    session = ort.InferenceSession(str(siamese_stored.path), providers=["CPUExecutionProvider"])
    x = from_pixels(test.images[idx], siamese_stored.spec.input)
    embeddings = session.run(None, {session.get_inputs()[0].name: x})[0]
    pairs, same = verification_pairs(test.labels[idx], 2000, seed=2)
    d = squared_distance(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]])
    assert ((d <= tau) == same).mean() > ((d <= seen_tau) == same).mean()
