"""Safe image decoding and conversion to a model's input spec. The only place pixels are read."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.spec import InputSpec
from service.errors import ApiError

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


def decode(data: bytes, limits: ImageLimits = ImageLimits(), *, name: str = "image") -> Image.Image:
    """Open `data` as an allowed format and check its size before any pixel is decoded.

    Multi-frame GIF and WebP give their first frame.
    """
    if not data:
        raise ApiError(400, "empty_image", f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        if _has_allowed_signature(data):
            raise ApiError(400, "invalid_image", f"{name} is corrupt") from None
        raise ApiError(
            415,
            "unsupported_image",
            f"{name} is not a {', '.join(ALLOWED_FORMATS[:-1])} or {ALLOWED_FORMATS[-1]} image",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "image_too_large", f"{name} has too many pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise ApiError(400, "invalid_image", f"{name} could not be read as an image") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ApiError(400, "invalid_image", f"{name} has no pixels")
    if width * height > limits.max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{name} is {width}x{height} pixels; at most {limits.max_pixels} pixels are accepted",
        )
    if min(width, height) < limits.min_side:
        raise ApiError(
            422,
            "image_too_small",
            f"{name} is {width}x{height} pixels; each side must be at least {limits.min_side}",
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ApiError(
            422,
            "bad_aspect_ratio",
            f"{name} is {width}x{height} pixels; the aspect ratio may be at most "
            f"{limits.max_aspect_ratio:g}:1",
        )
    try:
        img.load()  # decode now, inside the error mapping; truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(400, "invalid_image", f"{name} is truncated or corrupt") from None
    return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
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


def to_input(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Any-size, any-mode image -> float32 C x H x W normalized as the model was trained."""
    img = ImageOps.exif_transpose(img)
    img = _to_8bit(_flatten_alpha(img))
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # -> C x H x W
    return normalize_pixels(pixels, spec.mean, spec.std)


def normalize_pixels(
    pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """Pixels 0..255 with channels on axis -3 (C x H x W or N x C x H x W) -> float32,
    scaled to [0, 1] and normalized per channel: the one normalization every input path uses."""
    x = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return (x - m) / s


def to_inputs(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 images N x H x W (x C) -> N x C x H x W, exactly as uploads are preprocessed."""
    return np.stack([to_input(Image.fromarray(img), spec) for img in images])


def preprocess(
    data: bytes, spec: InputSpec, limits: ImageLimits = ImageLimits(), *, name: str = "image"
) -> np.ndarray:
    return to_input(decode(data, limits, name=name), spec)
