"""Fuzzing: the API against its own OpenAPI document (schemathesis, every check, every phase,
its command line as a user runs it), the decoders on arbitrary bytes (hypothesis), and the
HTTP layer on malformed requests over a raw socket.

Budgets: CONVSERVE_FUZZ_EXAMPLES cases per API operation and per decoder (default 200 here,
always the same ones; `make fuzz` runs 2,000 fresh ones). Every failure hypothesis finds is
shrunk to a minimal reproducer. The fuzzer has found: a .npy header that made numpy's parser
raise tokenize.TokenError (now a 422), and OIP routes documenting REST's error body.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from fuzz_hooks import image_content_refusals_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serving import start_server, stop_server

from convserve.errors import ConvserveError
from convserve.preprocess import ImageLimits, batch_from_images, open_image
from convserve.service import tensors
from convserve.service.protocols import rest as multipart  # its multipart/form-data splitter
from convserve.service.protocols.oip import types as oip
from convserve.service.protocols.rest import STATUS
from convserve.spec import InputSpec

EXAMPLES = int(os.environ.get("CONVSERVE_FUZZ_EXAMPLES", "200"))
# The default run is derandomized: the same cases every time, so CI is repeatable. A larger
# budget (`make fuzz`) explores afresh each run.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="CONVSERVE_FUZZ_EXAMPLES" not in os.environ,
)
SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.286,), std=(0.353,))


@pytest.fixture(scope="module")
def fuzz_server(
    bentoml_home, quick_stored, detector_stored, siamese_stored, stylizer_stored, tmp_path_factory
):
    """A model of every task, so every route is fuzzed against a model that answers it."""
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    models = [quick_stored[1].tag, detector_stored.tag, siamese_stored.tag, stylizer_stored.tag]
    proc, url = start_server(bentoml_home, log, models=",".join(models))
    yield url, log
    stop_server(proc)


def _served_schema() -> dict:
    """The document the server serves at /api/openapi.json (the same app object); the test
    below checks it is byte for byte what the running server returns."""
    from convserve.service.app import app

    return app.openapi()


HERE = Path(__file__).resolve().parent
# Every check schemathesis has, with the one allowance tests/schemathesis.toml states, and the
# custom check of tests/fuzz_hooks.py that keeps it exact.
CONFIG = schemathesis.config.SchemathesisConfig.from_path(str(HERE / "schemathesis.toml"))
schema = schemathesis.openapi.from_dict(_served_schema(), config=CONFIG)


@pytest.mark.slow
def test_the_fuzzed_schema_is_the_served_one(fuzz_server):
    url, _ = fuzz_server
    assert httpx.get(f"{url}/api/openapi.json").json() == _served_schema()


@pytest.mark.slow
@schema.parametrize()
@FUZZ
def test_every_operation_answers_as_documented(case, fuzz_server):
    url, _ = fuzz_server
    # Every check, control characters in the path included: they reach convserve too
    # (app.UnroutablePaths), which answers them as documented.
    case.call_and_validate(base_url=url, additional_checks=[image_content_refusals_only])


@pytest.mark.slow
def test_schemathesis_command_line_with_every_check_and_phase_finds_nothing(fuzz_server):
    """The run a new user tries: `schemathesis run .../api/openapi.json --checks all`, with the
    examples, coverage, fuzzing and stateful phases (following the document's links from
    GET /models to each model's routes)."""
    url, _ = fuzz_server
    seed = [] if "CONVSERVE_FUZZ_EXAMPLES" in os.environ else ["--seed", "1"]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "--config-file",
         str(HERE / "schemathesis.toml"), "run", f"{url}/api/openapi.json", "--checks", "all",
         "--max-examples", str(max(25, EXAMPLES // 4)), *seed],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(HERE), "SCHEMATHESIS_HOOKS": "fuzz_hooks"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in done.stdout, done.stdout[-3000:]


# --- decoders ------------------------------------------------------------------------------


def _documented(error: ConvserveError) -> None:
    assert error.code in STATUS and STATUS[error.code] < 500, error.code
    assert "Traceback" not in error.message and "/" not in error.message.replace("/s", "")


def _png(seed: int, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (12, 10) if mode == "L" else (12, 10, len(mode))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def _mutated(data: st.DataObject, base: bytes) -> bytes:
    """`base` with a few bytes overwritten, cut short or extended: near-valid input is where
    decoders break."""
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(0, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    return bytes(raw[:cut]) + data.draw(st.binary(max_size=16))


@FUZZ
@given(data=st.data())
def test_image_decoder_raises_only_documented_errors(data):
    base = data.draw(st.sampled_from([_png(1), _png(2, "RGB"), _png(3, "RGBA")]))
    blob = data.draw(st.one_of(st.binary(max_size=256), st.just(base)))
    blob = _mutated(data, blob) if blob else blob
    try:
        img = open_image(blob, ImageLimits(max_pixels=10_000, min_side=1), name="image 1")
        x = batch_from_images([("image 1", img)], SPEC)
    except ConvserveError as error:
        _documented(error)
    else:
        assert x.shape == (1, 1, 28, 28) and np.isfinite(x).all()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@FUZZ
@given(data=st.data())
def test_npy_decoder_raises_only_documented_errors(data):
    base = data.draw(
        st.sampled_from(
            [
                _npy(np.zeros((2, 28, 28), np.uint8)),
                _npy(np.ones((1, 1, 28, 28), np.float32)),
                _npy(np.array([1.5, np.nan], ">f4")),
                _npy(np.zeros(3, np.int64)),
            ]
        )
    )
    blob = data.draw(st.one_of(st.binary(max_size=200), st.just(base)))
    blob = _mutated(data, blob) if blob else blob
    try:
        array = tensors.read_npy(blob)
        tensors.to_model_input(array, SPEC, max_images=64)
    except ConvserveError as error:
        _documented(error)


def _oip_body(data: st.DataObject) -> tuple[bytes, str | None]:
    n = data.draw(st.integers(0, 3))
    binary = data.draw(st.booleans())
    datatype = data.draw(st.sampled_from(["UINT8", "FP32", "BYTES", "INT64", "FP16", "x"]))
    shape = data.draw(st.lists(st.integers(-2, 30), max_size=4))
    payload = data.draw(st.binary(max_size=64))
    tensor: dict = {"name": data.draw(st.sampled_from(["input", "image", "other"])),
                    "datatype": datatype, "shape": shape}  # fmt: skip
    if binary:
        tensor["parameters"] = {"binary_data_size": data.draw(st.integers(-1, 80))}
    else:
        tensor["data"] = data.draw(
            st.one_of(
                st.lists(st.integers(-300, 300), max_size=8),
                st.lists(st.floats(allow_nan=True), max_size=8),
                st.lists(st.text(max_size=8), max_size=3),
                st.text(max_size=8),
            )
        )
    header = json.dumps({"inputs": [tensor] * n, "outputs": data.draw(
        st.sampled_from([[], [{"name": "output"}], [{"name": "x"}],
                         [{"name": "output", "parameters": {"classification": -1}}]])
    )}).encode()  # fmt: skip
    header = _mutated(data, header) if data.draw(st.booleans()) else header
    if binary:
        return header + payload, str(len(header))
    return header, data.draw(st.sampled_from([None, "0", "-3", "x", str(len(header) + 5)]))


@FUZZ
@given(data=st.data())
def test_oip_decoder_raises_only_documented_errors(data):
    body, header_length = _oip_body(data)
    try:
        oip.parse_infer_request(body, header_length)
    except ConvserveError as error:
        _documented(error)


@FUZZ
@given(data=st.data())
def test_multipart_splitter_raises_only_documented_errors(data):
    boundary = "b0undary"
    good = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + _png(4)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    body = _mutated(data, good)
    content_type = data.draw(
        st.sampled_from(
            [f"multipart/form-data; boundary={boundary}", "multipart/form-data",
             "multipart/form-data; boundary=", f'multipart/form-data; boundary="{boundary}"']
        )
    )  # fmt: skip
    try:
        multipart.split(body, content_type, max_files=64)
    except ConvserveError as error:
        _documented(error)


# --- raw HTTP ------------------------------------------------------------------------------

MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(2000)) + b"\r\n",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhi\r\n0\r\n\r\n",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhi\r\n0\r\n\r\n",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"ffffffffffffffff\r\nx\r\n",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3"
    b"\r\n\r\n0\r\n\r\n",
    b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST /v2/models/quick-lenet5/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Inference-Header-Content-Length: 99\r\n\r\n{}{}",
    b"GET /%00%ff/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost",  # cut mid-pipeline
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # a TLS hello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 preface
]


def _send_raw(url: str, payload: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may hang up mid-send: that is an answer too
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer


def _statuses(answer: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3})", answer)]


@pytest.mark.slow
@pytest.mark.parametrize("payload", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_http_gets_no_5xx_and_leaves_the_server_ready(fuzz_server, payload):
    url, _ = fuzz_server
    answer = _send_raw(url, payload)
    assert all(status < 500 for status in _statuses(answer)), answer[:300]
    assert b"Traceback" not in answer and b"/work/" not in answer
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200


@pytest.mark.slow
@FUZZ
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"get", b"P\x00ST"]),
    path=st.binary(min_size=1, max_size=40),
    headers=st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=6),
    body=st.binary(max_size=200),
    chunked=st.booleans(),
)
def test_random_http_requests_get_no_5xx(fuzz_server, method, path, headers, body, chunked):
    url, _ = fuzz_server
    head = method + b" /" + path + b" HTTP/1.1\r\nHost: x\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    if chunked:
        framed = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        payload = head + b"Transfer-Encoding: chunked\r\n\r\n" + framed
    else:
        payload = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    answer = _send_raw(url, payload)
    assert all(status < 500 for status in _statuses(answer)), answer[:300]


@pytest.mark.slow
def test_the_server_is_ready_and_logged_no_unhandled_error_after_the_fuzzing(fuzz_server):
    url, log = fuzz_server
    assert httpx.get(f"{url}/readyz").status_code == 200
    text = log.read_text()
    assert "unhandled error" not in text and "Traceback" not in text, text[-3000:]


def test_fuzz_fixtures_are_what_they_claim():
    # The seeds are valid inputs: mutation starts from real images, arrays and bodies.
    assert open_image(_png(1)).size == (10, 12)
    assert tensors.read_npy(_npy(np.zeros((2, 28, 28), np.uint8))).shape == (2, 28, 28)


@FUZZ
@given(
    text=st.one_of(
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=",
                max_size=24),
        st.binary(max_size=18).map(lambda b: __import__("base64").b64encode(b).decode()),
        st.text(max_size=12),
    ),
    prefix=st.sampled_from(["", "data:image/png;base64,", "data:image/png,", "data:;base64,"]),
)  # fmt: skip
def test_the_documented_base64_pattern_is_exactly_what_the_decoder_accepts(text, prefix):
    """The JSON schema's pattern for image data (whitespace aside, which the decoder forgives)
    holds exactly the strings the server decodes: schemathesis trusts it both ways."""
    from convserve.service.wire import BASE64_PATTERN, decode_base64

    value = prefix + text
    if any(ch.isspace() for ch in value):
        return
    try:
        decode_base64(value, "x")
        accepted = True
    except ConvserveError:
        accepted = False
    assert accepted == bool(re.fullmatch(BASE64_PATTERN, value)), value
