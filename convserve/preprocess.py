"""The one preprocessing path: encoded image bytes, or uint8 pixels, to a model's input.

Training evaluation, export parity, INT8 calibration, the known answer, the service and the
load tests all come through here, so a model sees the same numbers wherever it runs:

    from_bytes(data, spec)    PNG/JPEG/WebP/GIF bytes -> C x H x W float32, normalized
    from_pixels(images, spec) uint8 N x H x W (x C)   -> N x C x H x W float32, normalized
    normalize(pixels, spec)   uint8 ... x C x H x W   -> float32, the one normalization

Decoding is safe for untrusted bytes: the format comes from the bytes, sizes are checked from
the header before pixels are decoded, and every failure is an `InvalidInput` with a stable code.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convserve.errors import InvalidInput
from convserve.spec import InputSpec

# Formats whose decoders are mature and in scope; PIL would otherwise try every plugin it has
# (PSD, EPS, PDF, FITS, JPEG 2000, ...). The bytes decide the format, never the Content-Type.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Alpha is composited on black: Fashion-MNIST garments are light on a black background.
BACKGROUND = 0


def _has_allowed_signature(data: bytes) -> bool:
    """The file starts like PNG, JPEG, WebP or GIF: a failure to open it is corruption."""
    return data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")) or (
        data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    )


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 25_000_000
    min_side: int = 1
    max_aspect_ratio: float = math.inf


def open_image(
    data: bytes, limits: ImageLimits = ImageLimits(), *, name: str = "image"
) -> Image.Image:
    """Open `data` as an allowed format and check its size from the header: no pixel is
    decoded yet, so this is cheap whatever the image's size. Multi-frame GIF and WebP give their
    first frame."""
    if not data:
        raise InvalidInput("empty_image", f"{name} is empty")
    try:
        # Pillow's own bomb guard (a warning past 89 M pixels) never fires first: the limit
        # below is checked from the same header, before any pixel is decoded.
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        if _has_allowed_signature(data):
            raise InvalidInput("invalid_image", f"{name} is corrupt") from None
        raise InvalidInput(
            "unsupported_image",
            f"{name} is not a {', '.join(ALLOWED_FORMATS[:-1])} or {ALLOWED_FORMATS[-1]} image",
        ) from None
    except Image.DecompressionBombError:
        raise InvalidInput("image_too_large", f"{name} has too many pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise InvalidInput("invalid_image", f"{name} could not be read as an image") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidInput("invalid_image", f"{name} has no pixels")
    if width * height > limits.max_pixels:
        raise InvalidInput(
            "image_too_large",
            f"{name} is {width}x{height} pixels; at most {limits.max_pixels} pixels are accepted",
        )
    if min(width, height) < limits.min_side:
        raise InvalidInput(
            "image_too_small",
            f"{name} is {width}x{height} pixels; each side must be at least {limits.min_side}",
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise InvalidInput(
            "bad_aspect_ratio",
            f"{name} is {width}x{height} pixels; the aspect ratio may be at most "
            f"{limits.max_aspect_ratio:g}:1",
        )
    return img


def load(img: Image.Image, *, name: str = "image") -> Image.Image:
    """Decode an opened image's pixels, inside the error mapping: truncated files fail here."""
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InvalidInput("invalid_image", f"{name} is truncated or corrupt") from None
    return img


def decode(data: bytes, limits: ImageLimits = ImageLimits(), *, name: str = "image") -> Image.Image:
    """`open_image` then `load`: checked, fully decoded."""
    return load(open_image(data, limits, name=name), name=name)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # no copy of a large upload
        canvas = Image.new("RGBA", rgba.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit grey is scaled to 0..255 by its bit depth, never clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if arr.max(initial=0) <= 65535 else 2**31 - 1
        return Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L")
    return img


def image_pixels(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Any-size, any-mode image -> uint8 C x H x W in the model's channels and size."""
    if "exif" in img.info or "Raw profile type exif" in img.info:  # where Pillow keeps EXIF
        img = ImageOps.exif_transpose(img)
    img = _to_8bit(_flatten_alpha(img))
    mode = "L" if spec.channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # -> C x H x W


def image_to_input(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Any-size, any-mode image -> float32 C x H x W normalized as the model was trained."""
    return normalize(image_pixels(img, spec), spec)


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Pixels 0..255 with channels on axis -3 (C x H x W or N x C x H x W) -> float32, scaled
    to [0, 1] and normalized per channel with the spec's mean and std."""
    x = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    m = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return (x - m) / s


def from_pixels(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 images N x H x W or N x H x W x C -> N x C x H x W, exactly as uploads are
    preprocessed. Images already of the spec's size skip PIL: grey is replicated to RGB as PIL's
    convert does, so both ways give the same numbers; anything else goes through PIL."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]  # N x H x W x 1
    n, height, width, channels = images.shape
    same_size = (height, width) == (spec.height, spec.width)
    if same_size and images.dtype == np.uint8 and channels in (1, spec.channels):
        nchw = images.transpose(0, 3, 1, 2)  # N x C x H x W
        if channels != spec.channels:
            nchw = np.broadcast_to(nchw, (n, spec.channels, height, width))
        return np.ascontiguousarray(normalize(nchw, spec))
    squeezed = images[..., 0] if channels == 1 else images
    return np.stack([image_to_input(Image.fromarray(img), spec) for img in squeezed])


def from_bytes(
    data: bytes, spec: InputSpec, limits: ImageLimits = ImageLimits(), *, name: str = "image"
) -> np.ndarray:
    """Encoded image bytes -> C x H x W float32 for `spec`; `InvalidInput` if they are not one."""
    return image_to_input(decode(data, limits, name=name), spec)


def batch_from_images(images: list[tuple[str, Image.Image]], spec: InputSpec) -> np.ndarray:
    """Opened images (name, image) -> N x C x H x W float32: each decoded and converted, then
    the whole batch normalized at once. The first bad image's `InvalidInput` is raised.

    Each image is closed once its pixels are taken, so one full-size decode at a time is held
    (a 25 M pixel RGBA upload is ~100 MB decoded), not the whole request's."""
    pixels = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.uint8)
    done = 0
    try:
        for name, img in images:
            pixels[done] = image_pixels(load(img, name=name), spec)
            img.close()
            done += 1
    finally:
        for _, img in images[done:]:
            img.close()  # after an error: the rest are never decoded
    return normalize(pixels, spec)
