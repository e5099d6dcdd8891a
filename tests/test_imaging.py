"""Image decoding and conversion to the input spec, on real Fashion-MNIST pictures."""

import io

import numpy as np
import pytest
from PIL import Image

from convserve.errors import ConvserveError
from convserve.preprocess import ImageLimits, decode, from_bytes, from_pixels, image_to_input
from convserve.service.protocols.rest import status_of
from convserve.spec import FASHION_MNIST_MEAN, FASHION_MNIST_STD, InputSpec

SPEC = InputSpec(channels=1, height=28, width=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def garment(fashion_test) -> np.ndarray:
    return fashion_test.images[0]


def test_grey_png_matches_training_preprocessing_exactly(garment):
    x = from_bytes(encode(Image.fromarray(garment)), SPEC)
    expected = from_pixels(garment[None], SPEC)[0]
    assert x.dtype == np.float32 and x.shape == (1, 28, 28)
    assert np.array_equal(x, expected)


def test_rgb_and_alpha_and_16bit_give_the_same_pixels(garment):
    grey = image_to_input(Image.fromarray(garment), SPEC)
    rgb = Image.fromarray(np.stack([garment] * 3, -1))
    rgba = Image.fromarray(np.dstack([np.stack([garment] * 3, -1), np.full_like(garment, 255)]))
    la = Image.fromarray(np.dstack([garment, np.full_like(garment, 255)]), mode="LA")
    sixteen = Image.fromarray(garment.astype(np.uint16) * 257)  # full 16-bit range, I;16
    for img in (rgb, rgba, la, sixteen):
        assert np.allclose(image_to_input(decode(encode(img)), SPEC), grey, atol=1e-6)


def test_transparent_pixels_become_the_black_background():
    img = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    x = image_to_input(img, SPEC)
    assert np.allclose(x, (0 - SPEC.mean[0]) / SPEC.std[0])


def test_any_size_is_resized_to_the_spec(garment):
    big = Image.fromarray(garment).resize((300, 200))
    assert image_to_input(decode(encode(big, "JPEG")), SPEC).shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (b"hello, not an image", 415, "unsupported_image"),
        (b"GIF89a" + b"\0" * 64, 400, "invalid_image"),  # an allowed format, corrupt
        (b"8BPS\x00\x01" + b"\0" * 64, 415, "unsupported_image"),  # Photoshop
    ],
)
def test_bad_bytes_are_client_errors(data, status, code):
    with pytest.raises(ConvserveError) as err:
        decode(data, name="image 1")
    assert (status_of(err.value), err.value.code) == (status, code)


def test_truncated_png_is_a_client_error(garment):
    data = encode(Image.fromarray(garment))
    with pytest.raises(ConvserveError) as err:
        decode(data[: len(data) // 2])
    assert status_of(err.value) == 400


def test_pixel_cap_is_checked_before_decoding():
    data = encode(Image.new("L", (2000, 2000)))
    with pytest.raises(ConvserveError) as err:
        decode(data, ImageLimits(max_pixels=1_000_000))
    assert (status_of(err.value), err.value.code) == (413, "image_too_large")
