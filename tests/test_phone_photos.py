"""Phone-camera uploads: decoded at the size the recipe needs (a JPEG at a DCT scale, other
formats box-reduced), answering as a full decode does, within limits that admit 48-50 MP
photos while still refusing bombs from their headers."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from bad_inputs import encode, png_with_header
from PIL import Image

from convserve.errors import InvalidInput
from convserve.models.data import PHONE_PHOTOS, phone_photos
from convserve.preprocess import (
    ImageLimits,
    decoded_size,
    from_bytes,
    from_pixels,
    image_pixels,
    open_image,
)
from convserve.runtime import make_session
from convserve.spec import InputSpec

EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def phone() -> list[bytes]:
    return phone_photos()


@pytest.fixture(scope="module")
def lite0(imagenet_stored):
    session = make_session(imagenet_stored.path)
    name = session.get_inputs()[0].name

    def probabilities(x: np.ndarray) -> np.ndarray:
        logits = session.run(None, {name: x})[0]
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    return imagenet_stored.spec.input, probabilities


def _full(spec: InputSpec) -> InputSpec:
    return spec.model_copy(update={"reduced_decode": False})


def test_the_photos_are_phone_sized_jpegs(phone):
    assert len(phone) == len(PHONE_PHOTOS) == 6
    for data in phone:
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.size) == ("JPEG", (4000, 3000))
        assert 1_000_000 < len(data) < 4_000_000


def test_a_phone_photo_is_decoded_at_a_dct_scale_leaving_twice_the_resize(lite0, phone):
    spec, _ = lite0
    with Image.open(io.BytesIO(phone[0])) as img:
        # The recipe's first resize is 341 x 256: 1/4 leaves 1000 x 750, 1/8 would leave 500 x 375.
        assert decoded_size(img, spec) == (1000, 750)
        assert decoded_size(img, _full(spec)) == (4000, 3000)


def test_reduced_decode_answers_as_a_full_decode(lite0, phone):
    spec, probabilities = lite0
    reduced = probabilities(np.stack([from_bytes(d, spec) for d in phone]))
    full = probabilities(np.stack([from_bytes(d, _full(spec)) for d in phone]))
    np.testing.assert_array_equal(reduced.argmax(1), full.argmax(1))
    assert np.abs(reduced - full).max() <= 0.02, np.abs(reduced - full).max(1)


def test_a_multi_picture_jpeg_is_decoded_reduced_as_a_jpeg_is(lite0, phone):
    """MPO, as many phones write their photos (the photo, then a depth map or a preview)."""
    spec, _ = lite0
    with Image.open(io.BytesIO(phone[0])) as img:
        img.load()
        jpeg = encode(img, "JPEG", quality=90)  # the same first picture as the MPO's
        mpo = encode(img, "MPO", quality=90, save_all=True, append_images=[img.resize((400, 300))])
    with Image.open(io.BytesIO(mpo)) as img:
        assert img.format == "MPO" and decoded_size(img, spec) == (1000, 750)
    np.testing.assert_array_equal(from_bytes(mpo, spec), from_bytes(jpeg, spec))


def _turned_jpeg(data: bytes) -> bytes:
    """The same photo stored a quarter-turn off, with EXIF orientation 6 (turn it 90 degrees
    clockwise to show it), as a phone held upright writes it."""
    with Image.open(io.BytesIO(data)) as img:
        stored = img.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: 3000 x 4000
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(stored, "JPEG", quality=90, exif=exif.tobytes())


def test_exif_rotated_photos_answer_as_upright_ones(lite0, phone):
    spec, probabilities = lite0
    turned = [_turned_jpeg(d) for d in phone[:3]]
    with Image.open(io.BytesIO(turned[0])) as img:
        assert img.size == (3000, 4000) and decoded_size(img, spec) == (750, 1000)
    upright = probabilities(np.stack([from_bytes(d, spec) for d in phone[:3]]))
    rotated = probabilities(np.stack([from_bytes(d, spec) for d in turned]))
    np.testing.assert_array_equal(upright.argmax(1), rotated.argmax(1))
    assert np.abs(upright - rotated).max() <= 0.02


def test_boxes_map_back_to_the_upload_after_a_reduced_decode():
    """Where the pixels landed is computed from the upload's own size, so a detector's boxes
    land on the upload whatever size it was decoded at."""
    spec = InputSpec(channels=1, height=128, width=128, mean=(0.5,), std=(0.5,), resize="letterbox")
    canvas = np.zeros((2400, 3200), np.uint8)
    canvas[800:1600, 1000:2000] = 255  # one bright box, 1000 x 800 at (1000, 800)
    img = Image.open(io.BytesIO(encode(Image.fromarray(canvas), "JPEG", quality=95)))
    assert decoded_size(img, spec) == (400, 300)
    chw, placement = image_pixels(img, spec)
    ys, xs = np.nonzero(chw[0] > 127)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    np.testing.assert_allclose(placement.to_upload(box), [1000, 800, 2000, 1600], atol=30)


def test_pixels_and_their_png_are_reduced_alike(lite0, phone):
    """The known answer (recorded from pixels at export and import) goes through the same
    reduction as an upload of those pixels: a PNG is box-reduced as the array is."""
    spec, _ = lite0
    with Image.open(io.BytesIO(phone[1])) as img:
        pixels = np.asarray(img.convert("RGB").resize((2000, 1500)))
    served = from_bytes(encode(Image.fromarray(pixels)), spec)
    np.testing.assert_array_equal(from_pixels(pixels[None], spec)[0], served)
    assert not np.array_equal(from_pixels(pixels[None], _full(spec))[0], served)


# --- limits --------------------------------------------------------------------------------


def test_a_48_mp_jpeg_is_admitted_and_decoded_under_a_megapixel(lite0):
    spec, probabilities = lite0
    (data,) = phone_photos((8000, 6000), ("coffee.png",))
    img = open_image(data, ImageLimits(max_pixels=25_000_000), spec=spec)
    assert img.size == (8000, 6000) and decoded_size(img, spec) == (1000, 750)
    img.close()
    assert probabilities(from_bytes(data, spec)[None]).argmax() == 967  # espresso
    with pytest.raises(InvalidInput) as err:  # decoded in full, it is over the decode limit
        open_image(data, ImageLimits(max_pixels=25_000_000), spec=_full(spec))
    assert err.value.code == "image_too_large"


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A 64 x 64 JPEG whose frame header (SOF0) claims width x height: a bomb's shape, its
    few bytes standing for a huge image."""
    data = bytearray(encode(Image.new("RGB", (64, 64), (90, 120, 150)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_jpeg_declaring(10_000, 9_000), "a 90 MP JPEG: over the declared limit even reduced"),
        (png_with_header(6_000, 5_000), "a 30 MP PNG: decoded in full, over the decode limit"),
        (png_with_header(60_000, 60_000), "a 3.6 G pixel PNG bomb"),
    ],
)
def test_oversized_and_bomb_files_are_refused_from_their_headers(lite0, data, why):
    spec, _ = lite0
    with pytest.raises(InvalidInput) as err:
        open_image(data, ImageLimits(max_pixels=25_000_000), spec=spec)
    assert err.value.code == "image_too_large", why
