"""The Open Inference Protocol over gRPC, spoken to a real `bentoml serve` by Triton's own
client (tritonclient.grpc) and by perf_analyzer: metadata a client can fill as listed, the same
answers as the HTTP routes, streaming, the documented status codes for bad calls (a fuzz of
ModelInfer messages included), request ids, metrics, and a server that stays healthy."""

from __future__ import annotations

import os
import struct
import subprocess

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from bad_inputs import encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serving import free_port, start_server, stop_server
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from convserve.preprocess import from_pixels

pytestmark = pytest.mark.slow
MODEL = "quick-lenet5"
EXAMPLES = int(os.environ.get("CONVSERVE_FUZZ_EXAMPLES", "200"))


def png(image: np.ndarray) -> bytes:
    return encode(Image.fromarray(image))


@pytest.fixture(scope="module")
def server(bentoml_home, quick_stored, tmp_path_factory):
    older, _ = quick_stored
    port = free_port()
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    proc, url = start_server(
        bentoml_home, log, models=f"{MODEL}:latest,{older.tag}", grpc_port=str(port),
        warmup_requests="2",
    )  # fmt: skip
    yield url, f"127.0.0.1:{port}", log
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    with tgrpc.InferenceServerClient(server[1]) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server[1]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def images(fashion_test) -> np.ndarray:
    return fashion_test.images[:16]


@pytest.fixture(scope="module")
def classify_answer(server, images) -> dict:
    files = [("images", (f"{i}.png", png(img))) for i, img in enumerate(images)]
    resp = httpx.post(f"{server[0]}/classify", files=files, params={"top_k": 10})
    assert resp.status_code == 200
    return resp.json()


def _top1(classify_answer: dict) -> list[int]:
    return [r["predictions"][0]["index"] for r in classify_answer["results"]]


def _images_input(pngs: list[bytes]) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("image", [len(pngs), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_).reshape(-1, 1))
    return tensor


# --- metadata ----------------------------------------------------------------------------------


def test_server_health_and_metadata(client, quick_stored):
    older, latest = quick_stored
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "convserve" and "classification" in meta.extensions
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL + ".image")
    assert client.is_model_ready(MODEL, older.version)
    assert not client.is_model_ready("no-such-model")


def test_each_view_lists_exactly_the_inputs_a_client_fills(client, quick_stored):
    older, latest = quick_stored
    tensors = client.get_model_metadata(MODEL, as_json=True)
    assert tensors["name"] == MODEL and tensors["versions"] == [latest.version, older.version]
    assert tensors["inputs"] == [
        {"name": "input", "datatype": "UINT8", "shape": ["-1", "1", "28", "28"]}
    ]
    assert tensors["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}
    ]
    images = client.get_model_metadata(MODEL + ".image", as_json=True)
    assert images["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1", "1"]}]
    config = client.get_model_config(MODEL + ".image", as_json=True)["config"]
    assert int(config["max_batch_size"]) > 0
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("image", "TYPE_STRING", ["1"])
    ]
    tensor_config = client.get_model_config(MODEL, as_json=True)["config"]
    assert tensor_config["input"][0]["dims"] == ["1", "28", "28"]


def test_http_metadata_lists_the_same_views_and_the_model_listing_is_unchanged(server):
    url = server[0]
    meta = httpx.get(f"{url}/v2/models/{MODEL}").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    image = httpx.get(f"{url}/v2/models/{MODEL}.image").json()
    assert image["name"] == f"{MODEL}.image"
    assert image["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    listed = [m["name"] for m in httpx.get(f"{url}/models").json()["models"]]
    assert MODEL in listed and not any(n.endswith(".image") for n in listed)


# --- inference ---------------------------------------------------------------------------------


def test_16_encoded_images_get_the_top1_of_post_classify(client, images, classify_answer):
    result = client.infer(
        MODEL + ".image",
        [_images_input([png(img) for img in images])],
        outputs=[tgrpc.InferRequestedOutput("probabilities", class_count=3)],
    )
    rows = result.as_numpy("probabilities")
    assert rows.shape == (16, 3)
    top1 = [int(row[0].decode().split(":")[1]) for row in rows]
    assert top1 == _top1(classify_answer)
    assert (
        rows[0][0].decode().split(":")[2]
        == classify_answer["results"][0]["predictions"][0]["label"]
    )


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_tensors_give_the_probabilities_of_post_classify(
    client, images, classify_answer, quick_stored, datatype
):
    spec = quick_stored[1].spec
    x = images[:, None] if datatype == "UINT8" else from_pixels(images, spec.input)
    tensor = tgrpc.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(np.ascontiguousarray(x))
    probabilities = client.infer(MODEL, [tensor]).as_numpy("probabilities")
    expected = np.zeros_like(probabilities)
    for i, result in enumerate(classify_answer["results"]):
        for p in result["predictions"]:
            expected[i, p["index"]] = p["probability"]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_typed_contents_and_a_version_are_served(stub, images, quick_stored):
    older, _ = quick_stored
    request = pb.ModelInferRequest(model_name=MODEL, model_version=older.version, id="typed-1")
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=[2, 1, 28, 28])
    tensor.contents.uint_contents.extend(images[:2].ravel().tolist())
    response = stub.ModelInfer(request)
    assert response.model_version == older.version and response.id == "typed-1"
    assert list(response.outputs[0].shape) == [2, 10]
    assert len(response.raw_output_contents[0]) == 2 * 10 * 4


def test_a_stream_answers_every_request_with_its_id(client, images, classify_answer):
    results: list = []
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    try:
        for i in range(4):
            client.async_stream_infer(
                MODEL + ".image", [_images_input([png(images[i])])], request_id=f"s{i}"
            )
        client.async_stream_infer(MODEL, [_images_input([b"not an image"])], request_id="bad")
    finally:
        client.stop_stream()  # waits for every answer
    by_id = {r.get_response().id: r for r, e in results if e is None}
    errors = [e for r, e in results if e is not None]
    assert sorted(by_id) == ["s0", "s1", "s2", "s3"]
    for i in range(4):
        assert int(by_id[f"s{i}"].as_numpy("probabilities").argmax()) == _top1(classify_answer)[i]
    assert len(errors) == 1 and "image" in str(errors[0])


# --- bad calls and their codes ------------------------------------------------------------------


def _call(stub, request) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    try:
        _, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "req-42"),))
    except grpc.RpcError as error:
        return error.code(), error.details(), dict(error.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", dict(call.trailing_metadata() or ())


def _uint8(name: str = "input", shape=(1, 1, 28, 28), raw: bytes | None = None):
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=name, datatype="UINT8", shape=list(shape))
    request.raw_input_contents.append(raw if raw is not None else bytes(int(np.prod(shape))))
    return request


def _bytes_request(elements: list[bytes], model: str = MODEL + ".image"):
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[len(elements), 1])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in elements))
    return request


def _raw(request, data: bytes):
    del request.raw_input_contents[:]
    request.raw_input_contents.append(data)
    return request


def _renamed(request, model: str, version: str = ""):
    request.model_name, request.model_version = model, version
    return request


BAD = {
    "unknown model": (lambda: _renamed(_uint8(), "nope"), grpc.StatusCode.NOT_FOUND),
    "unknown version": (lambda: _renamed(_uint8(), MODEL, "v0"), grpc.StatusCode.NOT_FOUND),
    "no inputs": (lambda: pb.ModelInferRequest(model_name=MODEL), grpc.StatusCode.INVALID_ARGUMENT),
    "wrong shape": (lambda: _uint8(shape=(1, 1, 28, 27)), grpc.StatusCode.INVALID_ARGUMENT),
    "short raw data": (lambda: _uint8(raw=b"\0" * 10), grpc.StatusCode.INVALID_ARGUMENT),
    "wrong input name": (lambda: _uint8(name="pixels"), grpc.StatusCode.INVALID_ARGUMENT),
    "tensor to the image view": (lambda: _renamed(_uint8(), MODEL + ".image"),
        grpc.StatusCode.INVALID_ARGUMENT),
    "not an image": (lambda: _bytes_request([b"hello"]), grpc.StatusCode.INVALID_ARGUMENT),
    "truncated BYTES": (lambda: _raw(_bytes_request([b"x"]), b"\x09\0\0\0ab"),
        grpc.StatusCode.INVALID_ARGUMENT),
    "too many images": (lambda: _bytes_request([b"x"] * 65), grpc.StatusCode.INVALID_ARGUMENT),
    "message over the size limit": (lambda: _raw(_uint8(), b"\0" * (33 * 1024 * 1024)),
        grpc.StatusCode.RESOURCE_EXHAUSTED),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_calls_get_their_documented_code_and_the_server_stays_ready(stub, client, case):
    make, expected = BAD[case]
    code, details, trailing = _call(stub, make())
    assert code == expected, (case, code, details)
    assert details and "Traceback" not in details and "/" not in details.split("GET /")[0]
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # refused by gRPC before convserve saw it
        assert trailing["x-request-id"] == "req-42"
        assert trailing["convserve-error-code"]
    assert client.is_server_ready()


def test_a_passed_deadline_cancels_the_call_and_the_server_stays_ready(stub, client, images):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(_bytes_request([png(images[0])] * 64), timeout=0.0005)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.is_server_ready()


def test_the_request_id_travels_in_the_metadata(stub):
    code, _, trailing = _call(stub, _uint8())
    assert code == grpc.StatusCode.OK and trailing["x-request-id"] == "req-42"
    _, call = stub.ModelInfer.with_call(_uint8())
    made = dict(call.trailing_metadata())["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="CONVSERVE_FUZZ_EXAMPLES" not in os.environ,
)
DATATYPES = ["UINT8", "FP32", "BYTES", "INT64", "FP16", "BOOL", "", "uint8"]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from([MODEL, MODEL + ".image", "nope", "", ".image"])),
        model_version=draw(st.sampled_from(["", "latest", "v1"])),
        id=draw(st.text(max_size=8)),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["input", "image", "x", ""])),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(st.sampled_from([-1, 0, 1, 2, 28, 1 << 40]), max_size=5)),
        )
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=3200)))
        else:
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=40)))
            elements = draw(st.lists(st.binary(max_size=20), max_size=3))
            tensor.contents.bytes_contents.extend(elements)
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["probabilities", "x"])))
        if draw(st.booleans()):
            out.parameters["classification"].int64_param = draw(st.integers(-2, 20))
    return request


@given(request=infer_requests())
@FUZZ
def test_fuzzed_infer_messages_get_documented_codes(stub, request):
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, (error.code(), error.details(), request)
        assert error.details() and "Traceback" not in error.details()


def test_the_server_stayed_healthy_and_counts_grpc_calls_by_method_and_code(server, client):
    url, _, log = server
    assert client.is_server_ready()
    metrics = httpx.get(f"{url}/metrics").text
    assert 'convserve_grpc_requests_total{code="OK",method="ModelInfer"}' in metrics
    assert 'method="ModelStreamInfer"' in metrics and 'code="INVALID_ARGUMENT"' in metrics
    assert 'code="internal_error"' not in metrics
    assert "Traceback" not in log.read_text()


# --- perf_analyzer ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_runs_clean_with_its_documented_flags(server, protocol, tmp_path):
    from convserve.loadtest.perf_analyzer import ensure, images_input

    binary, env = ensure()
    url = server[1] if protocol == "grpc" else server[0].removeprefix("http://")
    pngs = ["--input-data", str(images_input(tmp_path / "images.json", 8))]
    for model, extra in ((MODEL, []), (MODEL + ".image", pngs)):
        done = subprocess.run(
            # Whether it runs clean, not a measurement: any window counts as stable (the test
            # machine is busy with other tests).
            [str(binary), "-m", model, "-i", protocol, "-u", url, "--concurrency-range", "4",
             "--measurement-mode", "count_windows", "--measurement-request-count", "50",
             "--stability-percentage", "1000", *extra],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        assert "error" not in output.lower(), output[-3000:]
        assert "Throughput:" in output
