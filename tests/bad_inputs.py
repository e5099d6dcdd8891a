"""Bad requests shared by the in-process and real-server tests: generated fixtures, the
expected status and code of each, and the check that an error body shows no internals."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib

from PIL import Image

BODY_LIMIT = 32 * 1024 * 1024  # CONVSERVE_MAX_BODY_BYTES's default
INTERNALS = re.compile(r"Traceback|File \"|0x[0-9a-f]{6,}|(/[\w.-]+){2,}|site-packages")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def assert_error(resp, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == code, error
    assert error["message"] and not INTERNALS.search(error["message"]), error["message"]


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb's shape."""
    data = bytearray(encode(Image.new("L", (8, 8))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def foreign_formats() -> dict[str, bytes]:
    img = Image.new("RGB", (32, 32), (200, 10, 10))
    return {
        "pdf": encode(img, "PDF"),
        "eps": encode(img, "EPS"),
        "tiff": encode(img, "TIFF"),
        "bmp": encode(img, "BMP"),
        "jpeg 2000": encode(img, "JPEG2000"),
        "ico": encode(img, "ICO"),
        "psd": b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x20\x00\x00\x00\x20\x00\x08",
        "fits": b"SIMPLE  =                    T" + b" " * 50 + b"END" + b" " * 2797,
    }


def bad_requests(garment: bytes) -> dict[str, tuple[int, str, dict]]:
    one = {"files": [("images", ("a.png", garment))]}
    cases: dict[str, tuple[int, str, dict]] = {
        "not an image": (415, "unsupported_image", {"files": [("images", ("a.png", b"hello"))]}),
        "empty file": (400, "empty_image", {"files": [("images", ("a.png", b""))]}),
        "truncated png": (
            400,
            "invalid_image",
            {"files": [("images", ("a.png", garment[: len(garment) // 2]))]},
        ),
        "corrupt jpeg": (
            400,
            "invalid_image",
            {"files": [("images", ("a.jpg", encode(Image.new("L", (64, 64)), "JPEG")[:200]))]},
        ),
        "pixel bomb": (
            413,
            "image_too_large",
            {"files": [("images", ("a.png", png_with_header(50_000, 50_000)))]},
        ),
        "zero width": (
            400,
            "invalid_image",
            {"files": [("images", ("a.png", png_with_header(0, 8)))]},
        ),
        "one by n": (
            422,
            "image_too_small",
            {"files": [("images", ("a.png", encode(Image.new("L", (1, 300)))))]},
        ),
        "extreme aspect": (
            422,
            "bad_aspect_ratio",
            {"files": [("images", ("a.png", encode(Image.new("L", (8, 400)))))]},
        ),
        "url instead of file": (
            422,
            "invalid_request",
            {"data": {"images": "http://127.0.0.1:9/x.png"}},
        ),
        "no images": (422, "invalid_request", {"data": {"other": "x"}}),
        "top_k zero": (422, "invalid_request", {**one, "params": {"top_k": 0}}),
        "top_k over classes": (422, "invalid_top_k", {**one, "params": {"top_k": 11}}),
        "top_k not a number": (422, "invalid_request", {**one, "params": {"top_k": "five"}}),
        "too many images": (
            422,
            "too_many_images",
            {"files": [("images", (f"{i}.png", garment)) for i in range(65)]},
        ),
        "unknown model": (404, "model_not_found", {**one, "params": {"model": "nope"}}),
        "unknown version": (
            404,
            "version_not_found",
            {**one, "params": {"model": "quick-lenet5", "version": "v0"}},
        ),
        "json bad base64": (422, "invalid_base64", {"json": {"images": ["not*base64!"]}}),
        "json url": (422, "invalid_base64", {"json": {"images": ["https://example.com/a.png"]}}),
        "json malformed": (
            422,
            "invalid_request",
            {"content": b"{images: [", "headers": {"content-type": "application/json"}},
        ),
        "json no images": (422, "invalid_request", {"json": {"images": []}}),
        "json conflicting top_k": (
            422,
            "conflicting_parameters",
            {
                "json": {"images": [base64.b64encode(garment).decode()], "top_k": 2},
                "params": {"top_k": 3},
            },
        ),
        "plain text body": (
            415,
            "unsupported_media_type",
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
        ),
        "broken multipart": (
            400,
            "malformed_body",
            {"content": b"--x\r\nnonsense", "headers": {"content-type": "multipart/form-data"}},
        ),
        "body over the limit": (
            413,
            "body_too_large",
            {"files": [("images", ("a.png", b"\0" * (BODY_LIMIT + 1)))]},
        ),
    }
    for name, data in foreign_formats().items():
        # Whatever the part claims, the bytes are not an allowed format.
        cases[f"{name} claiming png"] = (
            415,
            "unsupported_image",
            {"files": [("images", ("a.png", data, "image/png"))]},
        )
    return cases
