"""The one preprocessing path: encoded image bytes, or uint8 pixels, to a model's input, as the
model's recipe (`InputSpec`) says.

Training evaluation, export parity, INT8 calibration, the known answer, import, the service and
the load tests all come through here, so a model sees the same numbers wherever it runs:

    from_bytes(data, spec)      PNG/JPEG/WebP/GIF bytes -> one input (C x H x W, or H x W x C)
    from_pixels(images, spec)   uint8 N x H x W (x C)   -> N inputs, the model's layout and dtype
    decode_batch(images, spec)  opened images           -> N inputs, and where each upload landed
    normalize(pixels, spec)     uint8 ... x C x H x W   -> float32, the one normalization

Decoding is safe for untrusted bytes: the format comes from the bytes, sizes are checked from
the header before pixels are decoded, and every failure is an `InvalidInput` with a stable code.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convserve.errors import ErrorCode, InvalidInput
from convserve.spec import InputSpec

# Formats whose decoders are mature and in scope; PIL would otherwise try every plugin it has
# (PSD, EPS, PDF, FITS, JPEG 2000, ...). The bytes decide the format, never the Content-Type.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Alpha is composited on black: Fashion-MNIST garments are light on a black background.
BACKGROUND = 0
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _has_allowed_signature(data: bytes) -> bool:
    """The file starts like PNG, JPEG, WebP or GIF: a failure to open it is corruption."""
    return data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")) or (
        data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    )


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be. `max_pixels` bounds the pixels decoded: a JPEG that the recipe
    shrinks is decoded at 1/2, 1/4 or 1/8 of its size and counts at that size.
    `max_declared_pixels` bounds what a header may declare even then (the entropy decoding
    still reads every coefficient): a 48-50 MP phone photo decoded at 1/8 holds under 1 MP."""

    max_pixels: int = 25_000_000
    min_side: int = 1
    max_aspect_ratio: float = math.inf
    max_declared_pixels: int = 70_000_000


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an upload's pixels landed in the model input: input = upload * scale + offset,
    per axis. `width` and `height` are the upload's own (after its EXIF orientation)."""

    width: int
    height: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    def to_upload(self, boxes: np.ndarray) -> np.ndarray:
        """boxes: ... x 4 (x1, y1, x2, y2) in input pixels -> the upload's pixels, clipped to
        the upload."""
        out = np.empty_like(boxes, dtype=np.float64)
        out[..., 0::2] = (boxes[..., 0::2] - self.offset_x) / self.scale_x
        out[..., 1::2] = (boxes[..., 1::2] - self.offset_y) / self.scale_y
        np.clip(out[..., 0::2], 0, self.width, out=out[..., 0::2])
        np.clip(out[..., 1::2], 0, self.height, out=out[..., 1::2])
        return out


def open_image(
    data: bytes,
    limits: ImageLimits = ImageLimits(),
    *,
    name: str = "image",
    spec: InputSpec | None = None,
) -> Image.Image:
    """Open `data` as an allowed format and check its size from the header: no pixel is
    decoded yet, so this is cheap whatever the image's size. With the recipe (`spec`) the pixel
    limit applies to the size it will be decoded at (`decoded_size`), without it to the whole
    image. Multi-frame GIF and WebP give their first frame."""
    if not data:
        raise InvalidInput(ErrorCode.EMPTY_IMAGE, f"{name} is empty")
    try:
        # Pillow's own bomb guard (a warning past 89 M pixels) never fires first: the limit
        # below is checked from the same header, before any pixel is decoded.
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        if _has_allowed_signature(data):
            raise InvalidInput(ErrorCode.INVALID_IMAGE, f"{name} is corrupt") from None
        raise InvalidInput(
            ErrorCode.UNSUPPORTED_IMAGE,
            f"{name} is not a {', '.join(ALLOWED_FORMATS[:-1])} or {ALLOWED_FORMATS[-1]} image",
        ) from None
    except Image.DecompressionBombError:
        raise InvalidInput(ErrorCode.IMAGE_TOO_LARGE, f"{name} has too many pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise InvalidInput(
            ErrorCode.INVALID_IMAGE, f"{name} could not be read as an image"
        ) from None
    width, height = img.size
    if width < 1 or height < 1:
        img.close()
        raise InvalidInput(ErrorCode.INVALID_IMAGE, f"{name} has no pixels")
    decoded = width * height if spec is None else math.prod(decoded_size(img, spec))
    problem = _size_problem(width, height, decoded, limits, name)
    if problem is not None:
        img.close()
        raise problem
    return img


def _size_problem(
    width: int, height: int, decoded: int, limits: ImageLimits, name: str
) -> InvalidInput | None:
    declared = width * height
    if declared > limits.max_declared_pixels or decoded > limits.max_pixels:
        most = limits.max_pixels
        if limits.max_declared_pixels > most:
            most_reduced = limits.max_declared_pixels
            return InvalidInput(
                ErrorCode.IMAGE_TOO_LARGE,
                f"{name} is {width}x{height} pixels; at most {most} pixels are accepted, or "
                f"{most_reduced} for a JPEG the model's recipe decodes at a reduced size",
            )
        return InvalidInput(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{name} is {width}x{height} pixels; at most {most} pixels are accepted",
        )
    if min(width, height) < limits.min_side:
        return InvalidInput(
            ErrorCode.IMAGE_TOO_SMALL,
            f"{name} is {width}x{height} pixels; each side must be at least {limits.min_side}",
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        return InvalidInput(
            ErrorCode.BAD_ASPECT_RATIO,
            f"{name} is {width}x{height} pixels; the aspect ratio may be at most "
            f"{limits.max_aspect_ratio:g}:1",
        )
    return None


def load(img: Image.Image, *, name: str = "image") -> Image.Image:
    """Decode an opened image's pixels, inside the error mapping: truncated files fail here."""
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InvalidInput(ErrorCode.INVALID_IMAGE, f"{name} is truncated or corrupt") from None
    return img


def decode(data: bytes, limits: ImageLimits = ImageLimits(), *, name: str = "image") -> Image.Image:
    """`open_image` then `load`: checked, fully decoded."""
    return load(open_image(data, limits, name=name), name=name)


# EXIF orientations 5-8 turn the image a quarter: its width is shown as its height.
_QUARTER_TURNS = (5, 6, 7, 8)
_ORIENTATION = 0x0112
# DCT scales libjpeg decodes at directly, largest first (Pillow's `draft` picks among these).
_JPEG_SCALES = (8, 4, 2, 1)
# MPO: the multi-picture JPEG many phones write (a depth map or preview after the photo);
# Pillow opens it as JPEG and decodes its first picture.
_JPEG_FORMATS = ("JPEG", "MPO")
# A reduced decode leaves at least this many times the recipe's first resize on both sides, as
# Pillow's `thumbnail` does (its `reducing_gap`): the resampling then sees enough pixels to
# filter as it would the whole image. Decoding 12 MP photos at 1/8 (1.5 x a 256 px resize)
# moved EfficientNet-Lite0's probabilities by up to 0.07 from a full decode; at 1/4, 0.02.
REDUCING_GAP = 2


def _has_exif(img: Image.Image) -> bool:
    return "exif" in img.info or "Raw profile type exif" in img.info  # where Pillow keeps it


def _turned(img: Image.Image) -> bool:
    """Whether the EXIF orientation turns the image a quarter. JPEG and WebP carry EXIF in the
    header; a PNG that keeps it in a text chunk is read only once its pixels are loaded (asking
    earlier would decode it)."""
    if not _has_exif(img) or ("exif" not in img.info and getattr(img, "tile", None)):
        return False
    return img.getexif().get(_ORIENTATION, 1) in _QUARTER_TURNS


def _first_resize(spec: InputSpec, w: int, h: int) -> tuple[int, int] | None:
    """The size the recipe first resamples a w x h (upright) image to, or None when it keeps
    the image's size: the one computation `_resized` and the reductions share."""
    W, H = spec.width, spec.height  # noqa: N806 - the input's size, as the recipe names it
    if spec.resize == "stretch":
        return W, H
    if spec.resize == "crop":
        assert spec.resize_to is not None
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = spec.resize_to, int(spec.resize_to * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    s = min(W / w, H / h)
    if spec.resize == "none" and s >= 1.0:
        return None
    return max(1, round(w * s)), max(1, round(h * s))


def _reduction(current: tuple[int, int], spec: InputSpec, upright: tuple[int, int]) -> int:
    """The whole factor an image of `current` size (upright) can be reduced by and still
    leave `REDUCING_GAP` times the recipe's first resize of the `upright` upload on both
    sides; 1 when it cannot, or when the recipe decodes in full."""
    target = _first_resize(spec, *upright) if spec.reduced_decode else None
    if target is None:
        return 1
    tw, th = target[0] * REDUCING_GAP, target[1] * REDUCING_GAP
    return max(1, min(current[0] // tw, current[1] // th))


def _jpeg_scale(img: Image.Image, spec: InputSpec) -> int:
    """The DCT scale an opened JPEG is decoded at for this recipe: the largest libjpeg offers
    that leaves `REDUCING_GAP` times the first resize on both sides (`draft` then picks it)."""
    if img.format not in _JPEG_FORMATS or len(getattr(img, "tile", ())) != 1:
        return 1
    w, h = img.size
    upright = (h, w) if _turned(img) else (w, h)
    factor = _reduction(upright, spec, upright)  # a scale shrinks both sides alike
    return next(s for s in _JPEG_SCALES if factor >= s)


def decoded_size(img: Image.Image, spec: InputSpec) -> tuple[int, int]:
    """The size an opened (not yet decoded) upload is decoded at for this recipe: a JPEG at
    its DCT scale, anything else whole. The pixel limits bound this, not the declared size."""
    w, h = img.size
    scale = _jpeg_scale(img, spec)
    return -(-w // scale), -(-h // scale)


def _decoded(img: Image.Image, spec: InputSpec, name: str) -> Image.Image:
    """An opened upload's pixels: a JPEG decoded at its DCT scale (`draft`, set before any
    pixel is decoded), anything else in full. An image already decoded is returned as is."""
    if getattr(img, "tile", None):
        size = decoded_size(img, spec)
        if size != img.size:
            img.draft(None, size)
    return load(img, name=name)


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


def _canvas(
    img: Image.Image, width: int, height: int, left: int, top: int, fill: int
) -> Image.Image:
    """`img` pasted at (left, top) on a width x height canvas of `fill`."""
    canvas = Image.new(img.mode, (width, height), (fill,) * len(img.getbands()))
    canvas.paste(img, (left, top))
    return canvas


def _resized(
    img: Image.Image, spec: InputSpec, size: tuple[int, int]
) -> tuple[Image.Image, Placement]:
    """The recipe's resize: `img` (already in the model's channels, perhaps decoded reduced)
    -> the input's size, and where the upload's pixels landed. `size` is the upload's own
    (upright) size: every target is computed from it, so a reduced decode changes only where
    the resampling starts, never the geometry."""
    w, h = size
    W, H = spec.width, spec.height  # noqa: N806 - the input's size, as the recipe names it
    target = _first_resize(spec, w, h)
    if target is None:  # none, and the image fits: its own size
        return img, Placement(w, h)
    nw, nh = target
    if img.size != target:
        img = img.resize(target, RESAMPLING[spec.interpolation])
    if spec.resize == "crop":
        # torchvision's Resize(resize_to) + CenterCrop((H, W)), on PIL images, exactly.
        if nw < W or nh < H:  # narrower than the crop: centred on the pad value, as torchvision
            pw, ph = max(W, nw), max(H, nh)
            img = _canvas(img, pw, ph, (pw - nw) // 2, (ph - nh) // 2, spec.pad_value)
            shift_x, shift_y = (pw - nw) // 2, (ph - nh) // 2
            nw, nh = pw, ph
        else:
            shift_x = shift_y = 0
        top, left = int(round((nh - H) / 2.0)), int(round((nw - W) / 2.0))
        if (left, top, W, H) != (0, 0, nw, nh):
            img = img.crop((left, top, left + W, top + H))
        sx, sy = (nw - 2 * shift_x) / w, (nh - 2 * shift_y) / h
        return img, Placement(w, h, sx, sy, shift_x - left, shift_y - top)
    if spec.resize == "letterbox":
        left, top = (W - nw) // 2, (H - nh) // 2
        if (nw, nh) != (W, H):
            img = _canvas(img, W, H, left, top, spec.pad_value)
        return img, Placement(w, h, nw / w, nh / h, left, top)
    # stretch, and none scaled down to fit the largest input
    return img, Placement(w, h, nw / w, nh / h)


def image_pixels(
    img: Image.Image, spec: InputSpec, *, name: str = "image"
) -> tuple[np.ndarray, Placement]:
    """Any-size, any-mode image, opened or already decoded -> uint8 C x H x W in the model's
    channels, channel order and size (for resize 'none': the image's, padded to
    `multiple_of`), and where it landed. An opened upload is decoded here, at a reduced size
    when the recipe allows (`decoded_size`); a truncated one raises `InvalidInput`."""
    w, h = img.size  # the upload's own, before any reduction
    img = _decoded(img, spec, name)
    size = (h, w) if _turned(img) else (w, h)  # upright
    if _has_exif(img):
        img = ImageOps.exif_transpose(img)
    img = _to_8bit(_flatten_alpha(img))
    mode = "L" if spec.channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    # Whatever the decode left above `REDUCING_GAP` times the first resize is box-reduced by a
    # whole factor (a PNG, a JPEG past 1/8): the recipe's resampling then starts from at least
    # twice its target size, at a fraction of the cost (its work grows with the source's pixels).
    factor = _reduction(img.size, spec, size)
    if factor > 1:
        img = img.reduce(factor)
    img, placement = _resized(img, spec, size)
    pixels = _pixels(img)
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # -> C x H x W
    if spec.channel_order == "bgr":
        chw = chw[::-1]
    if spec.resize == "none" and spec.multiple_of > 1:
        chw = _pad_to_multiple(chw, spec.multiple_of)
    return chw, placement


def _pixels(img: Image.Image) -> np.ndarray:
    """An L or RGB image's pixels, H x W or H x W x 3 uint8: its bytes viewed, which costs
    about half of numpy's array interface on a small image (that one goes through a dict)."""
    w, h = img.size
    shape = (h, w) if img.mode == "L" else (h, w, 3)
    return np.frombuffer(img.tobytes(), np.uint8).reshape(shape)


def _pad_to_multiple(chw: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the bottom and right up to a multiple (a network that downsamples by 4
    needs sides it can halve twice); the answer is cropped back to the content."""
    ph, pw = -chw.shape[1] % multiple, -chw.shape[2] % multiple
    if not (ph or pw):
        return chw
    mode = "reflect" if min(chw.shape[1:]) > max(ph, pw) else "edge"
    return np.pad(chw, ((0, 0), (0, ph), (0, pw)), mode=mode)


def image_to_input(img: Image.Image, spec: InputSpec, *, name: str = "image") -> np.ndarray:
    """Any-size, any-mode image -> one model input (no batch axis), as the model was trained."""
    return model_input(image_pixels(img, spec, name=name)[0][None], spec)[0]


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Pixels 0..255 with channels on axis -3 (C x H x W or N x C x H x W) -> float32, divided
    by the recipe's scale, then normalized per channel with its mean and std."""
    scale, m, s = spec.normalization
    x = np.asarray(pixels, dtype=np.float32)
    if spec.scale != 1.0:
        x = x / scale
    return (x - m) / s


def model_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 N x C x H x W pixels (the model's channel order) -> what the model takes: its
    dtype (normalized float32, or the pixels) in its layout."""
    x = pixels if spec.dtype == "uint8" else normalize(pixels, spec)
    if spec.layout == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


def _is_identity(height: int, width: int, spec: InputSpec) -> bool:
    """Pixels of this size need no resizing under the recipe."""
    if spec.resize == "none":
        fits = height <= spec.height and width <= spec.width
        return fits and height % spec.multiple_of == 0 and width % spec.multiple_of == 0
    same = (height, width) == (spec.height, spec.width)
    return same and (spec.resize != "crop" or spec.resize_to == min(height, width))


def from_pixels(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 images N x H x W or N x H x W x C (RGB or grey) -> N model inputs, exactly as
    uploads are preprocessed. Images that need no resizing skip PIL: grey is replicated to RGB
    as PIL's convert does, so both ways give the same numbers; anything else goes through PIL."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]  # N x H x W x 1
    n, height, width, channels = images.shape
    plain = images.dtype == np.uint8 and channels in (1, spec.channels)
    if plain and _is_identity(height, width, spec):
        nchw = images.transpose(0, 3, 1, 2)  # N x C x H x W
        if channels != spec.channels:
            nchw = np.broadcast_to(nchw, (n, spec.channels, height, width))
        elif spec.channel_order == "bgr":
            nchw = nchw[:, ::-1]
        return model_input(nchw, spec)
    squeezed = images[..., 0] if channels == 1 else images
    pixels = [image_pixels(Image.fromarray(img), spec)[0] for img in squeezed]
    return model_input(np.stack(pixels), spec)


def from_bytes(
    data: bytes, spec: InputSpec, limits: ImageLimits = ImageLimits(), *, name: str = "image"
) -> np.ndarray:
    """Encoded image bytes -> one input for `spec` (no batch axis), decoded as it is served
    (reduced where the recipe allows); `InvalidInput` if they are not an image."""
    img = open_image(data, limits, name=name, spec=spec)
    try:
        return image_to_input(img, spec, name=name)
    finally:
        img.close()


@dataclass(frozen=True)
class Batch:
    x: np.ndarray  # N model inputs: N x C x H x W (or N x H x W x C), as the model takes them
    placements: list[Placement]  # where each upload landed in its input


def decode_batch(images: list[tuple[str, Image.Image]], spec: InputSpec) -> Batch:
    """Opened images (name, image) -> the model's inputs, and where each landed: each decoded
    and converted, then the whole batch normalized at once. The first bad image's
    `InvalidInput` is raised.

    Each image is closed once its pixels are taken, so one full-size decode at a time is held
    (a 25 M pixel RGBA upload is ~100 MB decoded), not the whole request's."""
    pixels: list[np.ndarray] = []
    placements: list[Placement] = []
    done = 0
    try:
        for name, img in images:
            chw, placement = image_pixels(img, spec, name=name)
            img.close()
            done += 1
            pixels.append(chw)
            placements.append(placement)
    finally:
        for _, img in images[done:]:
            img.close()  # after an error: the rest are never decoded
    if len({p.shape for p in pixels}) > 1:  # resize 'none': each its own size
        raise InvalidInput(
            ErrorCode.INVALID_REQUEST,
            "this model takes images of their own size: send one per request",
        )
    return Batch(model_input(np.stack(pixels), spec), placements)


def batch_from_images(images: list[tuple[str, Image.Image]], spec: InputSpec) -> np.ndarray:
    """`decode_batch`'s inputs alone."""
    return decode_batch(images, spec).x
