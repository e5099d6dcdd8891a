"""Base64 image data, as both protocols take it in JSON."""

from __future__ import annotations

import base64
import binascii

from convserve.errors import ErrorCode, InvalidInput

# What decode_base64 accepts, as a JSON-schema pattern for the API's documents: the standard or
# URL-safe alphabet, padding optional, a `data:...;base64,` prefix allowed. (The decoder also
# forgives whitespace around and inside the text, which the pattern leaves out.)
_B64 = "[A-Za-z0-9+/_-]"
BASE64_PATTERN = rf"^(data:[^,]*;base64,)?(?:{_B64}{{4}})*(?:{_B64}{{2}}(?:==?)?|{_B64}{{3}}=?)?$"


def decode_base64(text: str, what: str) -> bytes:
    """Image bytes from base64 as clients send it: standard or URL-safe alphabet, padding
    optional, line breaks allowed, or a `data:...;base64,` URL. A URL is refused, never fetched.
    `what` names the item in the error (`images[2]`, `input 'input'`)."""
    text = text.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise InvalidInput(ErrorCode.INVALID_BASE64, f"{what}: data URL is not base64")
    if "://" in text[:16]:
        raise InvalidInput(
            ErrorCode.INVALID_BASE64,
            f"{what} looks like a URL; send the image's bytes (URLs are never fetched)",
        )
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            ErrorCode.INVALID_BASE64, f"{what} is not valid base64-encoded data"
        ) from None
