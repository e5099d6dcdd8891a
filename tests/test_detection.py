"""Detection's parts against hand-worked cases: IoU, non-max suppression (per class), average
precision, anchor k-means and assignment, the scenes, the YOLO loss and the decoding, and the
letterbox's way back to the upload's pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from convserve.models.evaluation import average_precision, match, mean_average_precision
from convserve.preprocess import image_pixels
from convserve.spec import InputSpec
from convserve.tasks.detect import Detections, batched_nms, iou, nms, select, shape_iou

A = [0.0, 0.0, 10.0, 10.0]


@pytest.mark.parametrize(
    ("b", "expected"),
    [
        (A, 1.0),  # identical
        ([20, 20, 30, 30], 0.0),  # disjoint
        ([10, 0, 20, 10], 0.0),  # touching: an edge has no area
        ([2, 2, 8, 8], 36 / 100),  # nested: the inner box's area over the outer's
        ([5, 0, 15, 10], 50 / 150),  # half over: 50 shared, 150 together
        ([5, 5, 15, 15], 25 / 175),  # a corner over
    ],
    ids=["identical", "disjoint", "touching", "nested", "half", "corner"],
)
def test_iou_of_hand_worked_pairs(b, expected):
    got = iou(np.array([A]), np.array([b]))
    assert got.shape == (1, 1) and math.isclose(got[0, 0], expected, rel_tol=1e-12)
    assert math.isclose(iou(np.array([b]), np.array([A]))[0, 0], expected)  # symmetric


def test_iou_of_empty_boxes_is_zero_not_nan():
    assert iou(np.array([[5, 5, 5, 5]]), np.array([[5, 5, 5, 5]]))[0, 0] == 0.0


def test_shape_iou_compares_shapes_as_if_centred():
    assert math.isclose(shape_iou(np.array([[10, 20]]), np.array([[10, 20]]))[0, 0], 1.0)
    assert math.isclose(shape_iou(np.array([[10, 10]]), np.array([[20, 20]]))[0, 0], 0.25)
    assert math.isclose(shape_iou(np.array([[10, 40]]), np.array([[40, 10]]))[0, 0], 100 / 700)


def test_nms_keeps_the_best_of_overlapping_boxes_and_every_separate_one():
    boxes = np.array([A, [1, 1, 11, 11], [20, 20, 30, 30], A, [2, 2, 8, 8]], dtype=float)
    scores = np.array([0.8, 0.9, 0.7, 0.6, 0.95])
    # Best first: [2,2,8,8] (0.95) overlaps [1,1,11,11] by 36/100 and A by 0.36: both stay at
    # 0.5; [1,1,11,11] (0.9) then suppresses A (IoU 81/119 = 0.68) and its twin; the far box stays.
    assert nms(boxes, scores, 0.5).tolist() == [4, 1, 2]
    # An IoU equal to the threshold is not "over" it: the box stays.
    pair = np.array([A, [5, 0, 15, 10]], dtype=float)  # IoU 1/3
    assert nms(pair, np.array([0.9, 0.8]), 1 / 3).tolist() == [0, 1]
    assert nms(pair, np.array([0.9, 0.8]), 0.3).tolist() == [0]


def test_identical_boxes_keep_one_and_ties_keep_the_first():
    boxes = np.array([A, A, A], dtype=float)
    assert nms(boxes, np.array([0.5, 0.9, 0.9]), 0.5).tolist() == [1]


def test_suppression_is_per_class():
    boxes = np.array([A, A, [1, 0, 11, 10]], dtype=float)
    classes = np.array([0, 1, 0])
    kept = batched_nms(boxes, np.array([0.9, 0.8, 0.7]), classes, 0.5)
    assert kept.tolist() == [0, 1]  # box 1 is another class: A does not suppress it; box 2 is
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).tolist() == []


def test_select_applies_the_score_floor_suppression_and_the_count():
    boxes = np.array([A, [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.8, 0.0], [0.2, 0.7], [0.05, 0.3]])  # M x classes
    found = select(boxes, scores, score_threshold=0.25, iou_threshold=0.45, max_detections=10)
    assert found.classes.tolist() == [0, 1, 1] and np.allclose(found.scores, [0.9, 0.7, 0.3])
    top = select(boxes, scores, score_threshold=0.25, iou_threshold=0.45, max_detections=2)
    assert len(top) == 2 and top.scores.tolist() == [0.9, 0.7]
    none = select(boxes, scores, score_threshold=0.95, iou_threshold=0.45, max_detections=10)
    assert len(none) == 0 and none.boxes.shape == (0, 4)


def test_average_precision_all_points_and_101_points():
    # 3 true objects; detections by score: hit, miss, hit -> recall 1/3, 1/3, 2/3 with
    # precision 1, 1/2, 2/3. Envelope: 1 up to 1/3, 2/3 up to 2/3, 0 after.
    scores, hits = np.array([0.9, 0.8, 0.7]), np.array([True, False, True])
    assert math.isclose(average_precision(scores, hits, 3), 1 / 3 + (1 / 3) * (2 / 3))
    points = np.linspace(0, 1, 101)
    expected = np.mean(np.where(points <= 1 / 3, 1.0, np.where(points <= 2 / 3, 2 / 3, 0.0)))
    assert math.isclose(average_precision(scores, hits, 3, points=101), expected, rel_tol=1e-9)
    assert average_precision(np.array([1.0]), np.array([True]), 1) == 1.0
    assert math.isnan(average_precision(np.zeros(0), np.zeros(0, bool), 0))


def test_a_truth_is_matched_once_and_only_by_its_class():
    dets = Detections(np.array([A, A, A], float), np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]))
    correct = match(dets, np.array([A], float), np.array([0]), 0.5)
    assert correct.tolist() == [True, False, False]  # the second is a duplicate, the third
    result = mean_average_precision([dets], [(np.array([A], float), np.array([0]))], 2)
    assert math.isclose(result.per_class50[0], 1.0) and math.isnan(result.per_class50[1])
    assert math.isclose(result.map50, 1.0) and 0 < result.map50_95 <= 1.0


def test_kmeans_finds_the_shapes_boxes_have():
    from convserve.models.detection import kmeans_anchors

    rng = np.random.default_rng(0)
    shapes = np.concatenate([rng.normal(c, 1.0, (200, 2)) for c in ([20, 30], [40, 40], [60, 25])])
    anchors = kmeans_anchors(shapes, 3)
    assert np.allclose(sorted(anchors.tolist()), [[20, 30], [40, 40], [60, 25]], atol=1.5)
    assert (np.diff(anchors.prod(1)) > 0).all()  # smallest first


def test_an_object_goes_to_the_cell_of_its_centre_and_the_anchor_of_its_shape():
    from convserve.models.detection import encode_targets

    anchors = np.array([[20.0, 20.0], [40.0, 60.0]])
    boxes = [np.array([[10, 10, 30, 30], [64, 20, 104, 80]], np.float32)]  # 20x20, 40x60
    target = encode_targets(boxes, [np.array([3, 7])], anchors, grid=8, stride=16)
    assert target.shape == (1, 8, 8, 2, 6)
    # The first: centre (20, 20), cell row 1 col 1, offsets 0.25, the 20x20 anchor exactly.
    assert target[0, 1, 1, 0].tolist() == [0.25, 0.25, 0.0, 0.0, 1.0, 3.0]
    # The second: centre (84, 50) -> col 5, row 3; offsets 0.25, 0.125; the 40x60 anchor.
    assert torch.allclose(target[0, 3, 5, 1], torch.tensor([0.25, 0.125, 0.0, 0.0, 1.0, 7.0]))
    assert target[..., 4].sum() == 2  # every other anchor holds nothing


def test_the_loss_rewards_the_targets_and_decoding_gives_boxes_in_pixels():
    from convserve.models import create_model
    from convserve.models.detection import yolo_loss

    model = create_model("yolo_fashion", anchors=[[16, 16], [32, 32], [48, 64]]).eval()
    raw = torch.zeros(1, 8, 8, 3, 15)
    boxes, scores = model.decode(raw)
    assert boxes.shape == (1, 192, 4) and scores.shape == (1, 192, 10)
    # Cell (0, 0), anchor 0, zero logits: centre at half a cell (8, 8), the anchor's size.
    assert boxes[0, 0].tolist() == [0.0, 0.0, 16.0, 16.0]
    assert torch.allclose(scores.sum(-1), torch.full((1, 192), 0.5))  # sigmoid(0) x sum 1
    target = torch.zeros(1, 8, 8, 3, 6)
    target[0, 2, 3, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0, 1.0, 4.0])
    good = torch.full((1, 8, 8, 3, 15), -10.0)
    good[0, 2, 3, 1, :5] = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])
    good[0, 2, 3, 1, 5 + 4] = 10.0
    assert yolo_loss(good, target) < 0.01 < yolo_loss(raw, target)


def test_scenes_are_seeded_tight_and_drawn_from_their_own_split():
    from convserve.models.data import load_fashion_mnist
    from convserve.models.scenes import SceneConfig, compose, tight_box

    garments = load_fashion_mnist("test")
    a = compose(garments.images[:500], garments.labels[:500], 40, seed=3)
    b = compose(garments.images[:500], garments.labels[:500], 40, seed=3)
    assert np.array_equal(a.images, b.images) and all(
        np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True)
    )
    counts = [len(boxes) for boxes in a.boxes]
    assert min(counts) >= 0 and max(counts) <= SceneConfig().max_objects and sum(counts) > 40
    for image, boxes in zip(a.images, a.boxes, strict=True):
        for x1, y1, x2, y2 in boxes.astype(int):
            side = x2 - x1, y2 - y1
            assert 5 <= max(side) <= 70
            inside = image[y1:y2, x1:x2]
            assert (inside > SceneConfig().threshold).any()
        if len(boxes) > 1:
            overlaps = iou(boxes, boxes)[np.triu_indices(len(boxes), 1)]
            assert overlaps.max() <= SceneConfig().max_iou + 1e-9
    # A lone garment's box is exactly the bounding box of its pixels above the threshold.
    lone = compose(garments.images[:1], garments.labels[:1], 30, seed=5)
    for image, boxes in zip(lone.images, lone.boxes, strict=True):
        if len(boxes) == 1:
            assert tight_box(image, 10) == tuple(int(v) for v in boxes[0])


def test_letterbox_boxes_map_back_to_the_uploads_pixels():
    spec = InputSpec(channels=1, height=128, width=128, mean=(0.0,), std=(1.0,),
                     resize="letterbox")  # fmt: skip
    upload = Image.new("L", (300, 150))  # wide: scaled by 128/300, centred vertically
    pixels, place = image_pixels(upload, spec)
    assert pixels.shape == (1, 128, 128)
    s = 128 / 300
    assert math.isclose(place.scale_x, s, rel_tol=1e-2) and place.offset_x == 0
    assert place.offset_y == (128 - round(150 * s)) // 2
    # A box drawn on the upload, as the model would see it, maps back to where it was.
    on_upload = np.array([[30.0, 15.0, 120.0, 90.0]])
    in_input = on_upload.copy()
    in_input[:, 0::2] = on_upload[:, 0::2] * place.scale_x + place.offset_x
    in_input[:, 1::2] = on_upload[:, 1::2] * place.scale_y + place.offset_y
    assert np.allclose(place.to_upload(in_input), on_upload)
    # Outside the picture (the border), boxes are clipped to the upload.
    assert place.to_upload(np.array([[-5.0, -5.0, 130.0, 130.0]])).tolist() == [
        [0.0, 0.0, 300.0, 150.0]
    ]


def test_map_equals_pycocotools_on_the_same_detections():
    """COCO's mAP@[.5:.95] (101 recall points, greedy matching by score) from pycocotools, the
    reference implementation, on random scenes and noisy detections: ours must agree."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    images, annotations, results, predictions, truths = [], [], [], [], []
    for image_id in range(1, 31):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 100, (n, 2))
        wh = rng.uniform(8, 40, (n, 2))
        boxes, classes = np.hstack([xy, xy + wh]), rng.integers(0, 3, n)
        truths.append((boxes, classes))
        images.append({"id": image_id, "width": 160, "height": 160})
        for box, c in zip(boxes, classes, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(c) + 1, "bbox": _xywh(box),
                                "area": float((box[2] - box[0]) * (box[3] - box[1])),
                                "iscrowd": 0})  # fmt: skip
        # Each truth found with jitter (IoU spread over 0.5..0.95), some twice, and false ones.
        found = np.vstack([boxes + rng.normal(0, 3, boxes.shape), boxes[:1] + 2,
                           np.hstack([xy[:1] + 50, xy[:1] + 70])])  # fmt: skip
        found = np.hstack([np.minimum(found[:, :2], found[:, 2:] - 1), found[:, 2:]])
        found_classes = np.r_[classes, classes[:1], rng.integers(0, 3, 1)]
        scores = rng.uniform(0.05, 1.0, len(found))
        predictions.append(Detections(found, scores, found_classes))
        for box, c, s in zip(found, found_classes, scores, strict=True):
            results.append({"image_id": image_id, "category_id": int(c) + 1,
                            "bbox": _xywh(box), "score": float(s)})  # fmt: skip
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c + 1, "name": str(c)} for c in range(3)]}  # fmt: skip
    coco.createIndex()
    evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    ours = mean_average_precision(predictions, truths, num_classes=3)
    assert ours.map50_95 == pytest.approx(evaluation.stats[0], abs=1e-6)


def _xywh(box: np.ndarray) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
