"""Scenes for object detection, composed from real objects with exact boxes: Fashion-MNIST
garments pasted onto a black canvas, the standard honest substitute where no photographs with
labelled boxes are at hand.

Each scene is `size` x `size` grey, with 0 to `max_objects` garments (uniformly many), each
scaled by 0.8x to 2.5x (22 to 70 px for 28 px garments, bilinear), placed uniformly where it
fits and where its box overlaps every earlier box by an IoU of at most `max_iou` (a few tries,
then it is left out), and pasted by maximum (garments are light on black). Its true box is the
smallest box holding every pixel of the pasted garment above `threshold` (of 255); its label
is the garment's class. Deterministic from the seed: train scenes use the training split's
images only, test scenes the test split's, so no test object was ever seen in training.

Torch-free: export (parity, known answers) and the benchmark read test scenes too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from convserve.tasks.detect import iou

SIZE = 128
TEST_SEED = 20_210  # the test scenes are always the same ones
TRAIN_SEED = 1


@dataclass(frozen=True)
class SceneConfig:
    size: int = SIZE
    max_objects: int = 6
    min_scale: float = 0.8
    max_scale: float = 2.5
    max_iou: float = 0.1  # "placed with little overlap"
    threshold: int = 10  # a pixel above this belongs to the garment's box
    tries: int = 20  # placements tried per garment before it is left out


@dataclass(frozen=True)
class Scenes:
    images: np.ndarray  # N x size x size, uint8
    boxes: list[np.ndarray]  # per scene K x 4 float32: x1, y1, x2, y2 in pixels (x2, y2 past)
    classes: list[np.ndarray]  # per scene K, int64

    def __len__(self) -> int:
        return len(self.images)


def tight_box(patch: np.ndarray, threshold: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) of the pixels above `threshold`, x2/y2 one past the last; None if none."""
    rows, cols = np.nonzero(patch > threshold)
    if len(rows) == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def compose(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    seed: int,
    config: SceneConfig = SceneConfig(),
) -> Scenes:
    """`count` scenes from garments `images` (N x 28 x 28 uint8) with classes `labels`."""
    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, config.size, config.size), dtype=np.uint8)
    all_boxes, all_classes = [], []
    for n in range(count):
        boxes: list[tuple[int, int, int, int]] = []
        classes: list[int] = []
        for _ in range(int(rng.integers(0, config.max_objects + 1))):
            k = int(rng.integers(len(images)))
            side = round(images.shape[1] * rng.uniform(config.min_scale, config.max_scale))
            patch = np.asarray(
                Image.fromarray(images[k]).resize((side, side), Image.Resampling.BILINEAR)
            )
            inner = tight_box(patch, config.threshold)
            if inner is None:
                continue
            for _ in range(config.tries):
                x = int(rng.integers(0, config.size - side + 1))
                y = int(rng.integers(0, config.size - side + 1))
                box = (x + inner[0], y + inner[1], x + inner[2], y + inner[3])
                if not boxes or iou(np.array([box]), np.array(boxes)).max() <= config.max_iou:
                    break
            else:
                continue  # no room with little overlap: left out, never a crowded box
            region = canvases[n, y : y + side, x : x + side]
            np.maximum(region, patch, out=region)
            boxes.append(box)
            classes.append(int(labels[k]))
        all_boxes.append(np.array(boxes, dtype=np.float32).reshape(-1, 4))
        all_classes.append(np.array(classes, dtype=np.int64))
    return Scenes(canvases, all_boxes, all_classes)
