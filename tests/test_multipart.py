"""The multipart/form-data splitter of the raw inference path, against the forms real clients
(httpx, requests, curl) send, and against malformed ones."""

from __future__ import annotations

import string

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convserve.errors import InvalidInput
from convserve.service.protocols import rest as multipart  # its multipart/form-data splitter


def form(files: list, data: dict | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_the_parts_an_http_client_sends_come_back_in_order():
    body, ctype = form(
        [("images", ("a.png", b"\x89PNG one")), ("images", ("b b.png", b"two\r\n--x"))],
        data={"note": "hello"},
    )
    parts = multipart.split(body, ctype, max_files=10)
    images = [(p.filename, p.data) for p in parts if p.name == "images"]
    assert images == [("a.png", b"\x89PNG one"), ("b b.png", b"two\r\n--x")]
    assert [(p.name, p.filename, p.data) for p in parts if p.name == "note"] == [
        ("note", None, b"hello")
    ]


def test_preamble_epilogue_quoted_boundary_and_rfc5987_filename():
    body = (
        b"ignored preamble\r\n--b 1\r\n"
        b"Content-Disposition: form-data; name=\"images\"; filename*=UTF-8''%C3%A9t%C3%A9.png\r\n"
        b"Content-Type: image/png\r\n\r\nDATA\r\n--b 1--\r\nepilogue"
    )
    (part,) = multipart.split(body, 'multipart/form-data; boundary="b 1"', max_files=1)
    assert (part.name, part.filename, part.data) == ("images", "été.png", b"DATA")


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"--x\r\nnonsense", "multipart/form-data; boundary=x"),  # headers never end
        (
            b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nno end',
            "multipart/form-data; boundary=x",
        ),
        (b"--x\r\nX-Other: 1\r\n\r\ndata\r\n--x--", "multipart/form-data; boundary=x"),
        (
            b"--x\r\nContent-Disposition: attachment\r\n\r\nd\r\n--x--",
            "multipart/form-data; boundary=x",
        ),
        (b"no delimiter at all", "multipart/form-data; boundary=x"),
        (b"--x--", "multipart/form-data"),  # no boundary parameter
    ],
)
def test_malformed_forms_are_malformed_body(body, ctype):
    with pytest.raises(InvalidInput) as err:
        multipart.split(body, ctype, max_files=5)
    assert err.value.code == "malformed_body"


def test_too_many_files_and_too_many_parts_are_refused_early():
    body, ctype = form([("images", (f"{i}.png", b"x")) for i in range(6)])
    with pytest.raises(InvalidInput) as err:
        multipart.split(body, ctype, max_files=5)
    assert err.value.code == "too_many_images"
    body, ctype = form([], data={f"f{i}": "v" for i in range(20)})
    with pytest.raises(InvalidInput) as err:
        multipart.split(body, ctype, max_files=5, max_parts=10)
    assert err.value.code == "malformed_body"


BCHARS = "'()+_,./:=?-"  # RFC 2046's boundary characters besides letters and digits


@given(
    st.text(alphabet=string.ascii_letters + string.digits + "_-.", min_size=1, max_size=20),
    st.one_of(st.none(), st.text(alphabet=string.ascii_letters + " _-.()", max_size=30)),
    st.text(alphabet=string.ascii_letters + string.digits + BCHARS, min_size=1, max_size=70),
)
def test_the_common_headers_read_fast_as_the_full_parser_reads_them(name, filename, boundary):
    """The one-match reading of what clients usually send (`boundary=`, `form-data; name=...;
    filename=...`) gives what python-multipart's header parser gives."""
    from python_multipart.multipart import parse_options_header

    content_type = f"multipart/form-data; boundary={boundary}"
    assert multipart.boundary_of(content_type) == parse_options_header(content_type)[1][b"boundary"]
    disposition = f'form-data; name="{name}"' + (
        "" if filename is None else f'; filename="{filename}"'
    )
    body = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\nxy\r\n--{boundary}--\r\n"
    (part,) = multipart.split(body.encode(), content_type, max_files=1)
    _, params = parse_options_header(disposition.encode())
    expected = params.get(b"filename")
    assert (part.name, part.filename) == (
        params[b"name"].decode(),
        None if expected is None else expected.decode(),
    )
