"""Style weights for a multi-style network, and the stylized tensor back to an image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from convserve.errors import ErrorCode, InvalidInput


def style_weights(text: str, styles: int) -> np.ndarray:
    """`"7"` (one style) or `"3:0.5,12:0.5"` (a blend) -> float32 weights over `styles`,
    summing to 1. Indices outside 0..styles-1, negative or all-zero weights: `invalid_style`."""
    weights = np.zeros(styles, dtype=np.float64)
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise InvalidInput(
            ErrorCode.INVALID_STYLE, f"style: give an index 0-{styles - 1} or a blend"
        )
    for part in parts:
        index_text, sep, weight_text = part.partition(":")
        try:
            index = int(index_text)
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise InvalidInput(
                ErrorCode.INVALID_STYLE, f"style {part[:20]!r}: expected INDEX or INDEX:WEIGHT"
            ) from None
        if not 0 <= index < styles:
            raise InvalidInput(
                ErrorCode.INVALID_STYLE, f"style index {index} is not in 0-{styles - 1}"
            )
        if not np.isfinite(weight) or weight < 0:
            raise InvalidInput(
                ErrorCode.INVALID_STYLE, "style weights must be finite and non-negative"
            )
        weights[index] += weight
    total = weights.sum()
    if total <= 0:
        raise InvalidInput(ErrorCode.INVALID_STYLE, "style weights must not all be zero")
    return (weights / total).astype(np.float32)


def to_png(chw: np.ndarray, width: int, height: int) -> bytes:
    """A stylized 3 x H' x W' tensor (values 0..1, H' >= height, W' >= width: padded for the
    network) -> PNG bytes of its top-left width x height."""
    rgb = np.clip(chw[:, :height, :width], 0.0, 1.0).transpose(1, 2, 0)
    buf = io.BytesIO()
    # compress_level 1: the stylized image is answered at once; level 6 costs 3x the time for
    # a few percent fewer bytes.
    Image.fromarray((rgb * 255 + 0.5).astype(np.uint8), "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()
