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
from convserve.models.siamese import mine_triplets, triplet_loss
from convserve.models.style import content_cost, gram, layer_style_cost, style_cost
from convserve.tasks.embed import (
    best_threshold,
    one_shot_accuracy,
    pairwise_squared_distances,
    roc_auc,
    unit,
)
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


def test_roc_auc_and_the_threshold_of_hand_worked_scores():
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0], bool)) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0], bool)) == 0.0
    # One inversion of four positive-negative pairs.
    assert roc_auc(np.array([0.9, 0.3, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0], bool)) == 0.5  # a tie counts half
    d = np.array([0.1, 0.2, 0.9, 1.5])
    tau, accuracy = best_threshold(d, np.array([True, True, False, False]))
    assert math.isclose(tau, 0.55) and accuracy == 1.0


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
