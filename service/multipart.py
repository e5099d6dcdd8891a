"""multipart/form-data (RFC 7578) split with `bytes.find`, for bodies already read whole.

Written here rather than taken from python-multipart: that parser walks headers byte by byte
in Python, which costs more than decoding a 28 px PNG. Bodies are bounded (the admission body
limit) before they arrive here; the number of parts is bounded too. Anything malformed is an
`InvalidInput("malformed_body")`; nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from python_multipart.multipart import parse_options_header

from convserve.errors import InvalidInput

CRLF = b"\r\n"


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None: a text field, not a file
    data: bytes


def _malformed(why: str) -> InvalidInput:
    return InvalidInput("malformed_body", f"the multipart body could not be parsed: {why}")


def boundary_of(content_type: str) -> bytes:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise _malformed("no boundary in Content-Type")
    return boundary


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _headers(block: bytes) -> tuple[str, str | None]:
    """The part's name and filename, from its Content-Disposition."""
    for line in block.split(CRLF):
        key, sep, value = line.partition(b":")
        if not sep:
            raise _malformed("a part header has no colon")
        if key.strip().lower() == b"content-disposition":
            kind, params = parse_options_header(value.strip())
            if kind != b"form-data" or b"name" not in params:
                raise _malformed("a part is not form-data with a name")
            filename = params.get(b"filename")
            if filename is None and b"filename*=" in value:  # RFC 5987: charset'lang'%XX
                encoded = value.split(b"filename*=", 1)[1].split(b";", 1)[0].strip()
                filename = unquote_to_bytes(encoded.split(b"'", 2)[-1])
            return _text(params[b"name"]), None if filename is None else _text(filename)
    raise _malformed("a part has no Content-Disposition")


def split(body: bytes, content_type: str, max_files: int, max_parts: int = 1000) -> list[Part]:
    """Every part of the form, in order. More than `max_files` files: `too_many_images`; more
    than `max_parts` parts in all: malformed."""
    delimiter = b"--" + boundary_of(content_type)
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble before the first delimiter is allowed, and ignored
        start = body.find(CRLF + delimiter)
        if start < 0:
            raise _malformed("no boundary in the body")
        pos = start + 2 + len(delimiter)
    parts: list[Part] = []
    files = 0
    close = CRLF + delimiter
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter; an epilogue after it is ignored
        line_end = body.find(CRLF, pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise _malformed("a delimiter is not followed by a line break")
        head_end = body.find(CRLF + CRLF, line_end)
        if head_end < 0:
            raise _malformed("a part's headers do not end")
        name, filename = _headers(body[line_end + 2 : head_end])
        data_start = head_end + 4
        data_end = body.find(close, data_start)
        if data_end < 0:
            raise _malformed("the body ends inside a part")
        if len(parts) == max_parts:
            raise _malformed(f"more than {max_parts} parts")
        parts.append(Part(name, filename, body[data_start:data_end]))
        files += filename is not None
        if files > max_files:
            raise InvalidInput("too_many_images", f"at most {max_files} images per request")
        pos = data_end + len(close)
