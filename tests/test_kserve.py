"""The Open Inference Protocol (KServe v2), spoken to a real server by Triton's own client."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from convserve.preprocess import from_pixels

pytestmark = pytest.mark.slow


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(bentoml_home, quick_stored, tmp_path_factory):
    from serving import start_server, stop_server

    older, _ = quick_stored
    log = tmp_path_factory.mktemp("kserve") / "server.log"
    proc, url = start_server(
        bentoml_home, log, models=f"quick-lenet5:latest,{older.tag}", warmup_requests="2"
    )
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    # Only the URL differs from a Triton deployment: host:port, no scheme.
    return triton.InferenceServerClient(server.removeprefix("http://"))


@pytest.fixture(scope="module")
def images(fashion_test) -> np.ndarray:
    return fashion_test.images[:6]


@pytest.fixture(scope="module")
def classify_answer(server, images) -> dict:
    files = [("images", (f"{i}.png", png(img))) for i, img in enumerate(images)]
    resp = httpx.post(f"{server}/classify", files=files, params={"top_k": 10})
    assert resp.status_code == 200
    return resp.json()


def _probabilities(classify_answer: dict) -> np.ndarray:
    out = np.zeros((len(classify_answer["results"]), 10), np.float32)
    for i, result in enumerate(classify_answer["results"]):
        for p in result["predictions"]:
            out[i, p["index"]] = p["probability"]
    return out


def test_health_and_metadata(client, quick_stored):
    older, latest = quick_stored
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "convserve"
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"])
    meta = client.get_model_metadata("quick-lenet5")
    assert meta["name"] == "quick-lenet5" and meta["platform"] == "onnxruntime_onnx"
    assert meta["versions"] == [latest.version, older.version]
    # The tensor view lists pixels; `quick-lenet5.image` lists the encoded images (test_grpc)
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("quick-lenet5", older.version)["versions"] == [older.version]
    assert client.is_model_ready("quick-lenet5")
    assert client.is_model_ready("quick-lenet5", older.version)
    assert not client.is_model_ready("no-such-model")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_tensor_inference_equals_classify(
    client, images, classify_answer, quick_stored, binary, datatype
):
    spec = quick_stored[1].spec.input
    x = from_pixels(images, spec) if datatype == "FP32" else images[:, None]
    tensor = triton.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer("quick-lenet5", [tensor], outputs=[output], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_name"] == "quick-lenet5"
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(images), 10)
    np.testing.assert_allclose(probabilities, _probabilities(classify_answer), atol=1e-6)


@pytest.mark.parametrize("name", ["input", "image"])
def test_bytes_image_input_with_the_classification_extension(client, images, classify_answer, name):
    tensor = triton.InferInput(name, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([png(img) for img in images], dtype=np.object_))
    output = triton.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer("quick-lenet5", [tensor], outputs=[output])
    rows = result.as_numpy("probabilities")
    assert rows.shape == (len(images), 3)
    for row, expected in zip(rows, classify_answer["results"], strict=True):
        parsed = [item.decode().split(":", 2) for item in row]
        assert [int(i) for _, i, _ in parsed] == [p["index"] for p in expected["predictions"][:3]]
        assert [label for _, _, label in parsed] == [
            p["label"] for p in expected["predictions"][:3]
        ]
        np.testing.assert_allclose(
            [float(score) for score, _, _ in parsed],
            [p["probability"] for p in expected["predictions"][:3]],
            atol=1e-6,
        )


def test_versioned_inference_and_json_classification(server, images, quick_stored):
    older, _ = quick_stored
    body = {
        "id": "j1",
        "inputs": [
            {
                "name": "input",
                "shape": [2, 1, 28, 28],
                "datatype": "UINT8",
                "data": images[:2, None].tolist(),
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    resp = httpx.post(f"{server}/v2/models/quick-lenet5/versions/{older.version}/infer", json=body)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["model_version"] == older.version and answer["id"] == "j1"
    (out,) = answer["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 2] and len(out["data"]) == 4


def test_inference_goes_through_the_batcher(server, client, images):
    def batched() -> float:
        text = httpx.get(f"{server}/metrics").text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("convserve_batch_size_images_sum")
        )

    before = batched()
    tensor = triton.InferInput("input", [len(images), 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(np.ascontiguousarray(images[:, None]))
    client.infer("quick-lenet5", [tensor])
    assert batched() - before == len(images)


def _raw(server: str, body: bytes, header_length: int | None = None, model="quick-lenet5"):
    headers = (
        {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    )
    return httpx.post(f"{server}/v2/models/{model}/infer", content=body, headers=headers)


def _request(shape, datatype="FP32", data=None, name="input") -> bytes:
    tensor = {"name": name, "shape": shape, "datatype": datatype}
    tensor["data"] = data if data is not None else [0.0] * int(np.prod(shape))
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("wrong shape", lambda: (_request([1, 1, 28, 27]), None)),
        ("wrong rank", lambda: (_request([784]), None)),
        ("unknown datatype", lambda: (_request([1, 1, 28, 28], "FLOAT9"), None)),
        ("unsupported datatype", lambda: (_request([1, 1, 28, 28], "INT64"), None)),
        ("data count", lambda: (_request([1, 1, 28, 28], data=[1.0, 2.0]), None)),
        ("nan", lambda: (_request([1, 1, 1, 1], data=[float("nan")]), None)),
        ("missing input", lambda: (json.dumps({"inputs": []}).encode(), None)),
        ("no inputs key", lambda: (json.dumps({"id": "x"}).encode(), None)),
        ("wrong input name", lambda: (_request([1, 1, 28, 28], name="image"), None)),
        ("not json", lambda: (b"{inputs", None)),
        ("header beyond body", lambda: (_request([1, 1, 28, 28]), 10_000)),
        (
            "binary size beyond body",
            lambda: (
                (
                    h := json.dumps(
                        {
                            "inputs": [
                                {
                                    "name": "input",
                                    "shape": [1, 1, 28, 28],
                                    "datatype": "FP32",
                                    "parameters": {"binary_data_size": 3136},
                                }
                            ]
                        }
                    ).encode()
                )
                + b"\0" * 100,
                len(h),
            ),
        ),
        (
            "unknown output",
            lambda: (
                json.dumps(
                    {**json.loads(_request([1, 1, 28, 28])), "outputs": [{"name": "logits"}]}
                ).encode(),
                None,
            ),
        ),
        (
            "corrupt image bytes",
            lambda: (
                json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "input",
                                "shape": [1],
                                "datatype": "BYTES",
                                "data": ["aGVsbG8="],
                            }
                        ]
                    }
                ).encode(),
                None,
            ),
        ),
    ],
)
def test_malformed_requests_are_400_with_an_error_body(server, case, make):
    body, header_length = make()
    resp = _raw(server, body, header_length)
    assert resp.status_code == 400, (case, resp.text)
    error = resp.json()["error"]
    assert isinstance(error, str) and error
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def test_unknown_model_is_404_with_an_error_body(server):
    resp = _raw(server, _request([1, 1, 28, 28]), model="no-such-model")
    assert resp.status_code == 404 and isinstance(resp.json()["error"], str)
    with pytest.raises(InferenceServerException):
        triton.InferenceServerClient(server.removeprefix("http://")).get_model_metadata("nope")
