"""The service's ASGI app in-process (BentoML's own app, lifecycle hooks included) over HTTP.

Serves three models at once: two versions of a quickly trained LeNet-5 (1 x 28 x 28) and an
untrained LeNet-5 for 3 x 32 x 32, so routing by name and version and per-model input specs
are visible in the answers.
"""

from __future__ import annotations

import base64
import io
import socket
import threading

import numpy as np
import pytest
from bad_inputs import assert_error, bad_requests, encode
from PIL import Image
from starlette.testclient import TestClient

from convserve.preprocess import from_bytes
from convserve.runtime import softmax
from convserve.service.loading import open_model
from convserve.service.settings import ServiceSettings


@pytest.fixture(scope="module")
def served(quick_stored, rgb_stored):
    older, latest = quick_stored
    return {"latest": latest, "older": older, "rgb": rgb_stored}


@pytest.fixture(scope="module")
def client(served):
    from convserve.service.app import Classifier

    env = {
        "CONVSERVE_MODELS": f"quick-lenet5:latest,{served['older'].tag},rgb-lenet5:latest",
        "CONVSERVE_WARMUP_REQUESTS": "2",
        "CONVSERVE_GRPC_PORT": "0",  # in this process: HTTP only
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with TestClient(Classifier.to_asgi(), raise_server_exceptions=False) as c:
            yield c


@pytest.fixture(scope="module")
def predict(served):
    """In-process answer for image bytes: the same decoder, the stored file, plain ORT."""
    settings = ServiceSettings(models=[served["latest"].tag])
    _, classifier = open_model(served["latest"].tag, settings)

    def run(data: bytes) -> np.ndarray:
        x = from_bytes(data, served["latest"].spec.input)[None]
        return softmax(classifier.logits(x))[0]

    return run


@pytest.fixture(scope="module")
def confident(fashion_test, predict) -> list[np.ndarray]:
    """Test garments the quick model is sure of, so a colour-mode change cannot flip a tie."""

    def margin(img: np.ndarray) -> float:
        p = np.sort(predict(encode(Image.fromarray(img))))
        return float(p[-1] - p[-2])

    margins = [margin(img) for img in fashion_test.images[:200]]
    best = np.argsort(margins)[::-1][:4]
    assert margins[best[-1]] > 0.3
    return [fashion_test.images[i] for i in best]


def top1(resp) -> list[int]:
    assert resp.status_code == 200, resp.text
    return [r["predictions"][0]["index"] for r in resp.json()["results"]]


# --- the API ---------------------------------------------------------------------------------


def test_multipart_answers_equal_in_process_inference(client, fashion_test, predict, served):
    files = [
        ("images", (f"{i}.png", encode(Image.fromarray(img)), "image/png"))
        for i, img in enumerate(fashion_test.images[:6])
    ]
    body = client.post("/classify", files=files, params={"top_k": 3}).json()
    assert body["model"] == served["latest"].tag
    for (_, (name, data, _)), result in zip(files, body["results"], strict=True):
        expected = predict(data)
        assert result["filename"] == name
        assert [p["index"] for p in result["predictions"]] == list(np.argsort(-expected)[:3])
        assert result["predictions"][0]["probability"] == pytest.approx(expected.max(), abs=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_an_image_as_the_whole_body_equals_the_multipart_form(client, fashion_test, fmt):
    """`curl --data-binary @x.png -H 'Content-Type: image/png'`, as TorchServe clients send."""
    data = encode(Image.fromarray(fashion_test.images[7]), fmt)
    form = client.post("/classify", files=[("images", ("x", data))], params={"top_k": 4})
    raw = client.post(
        "/classify",
        content=data,
        params={"top_k": 4},
        headers={"content-type": f"image/{fmt.lower()}"},
    )
    assert raw.status_code == 200, raw.text
    ((from_form,), (from_raw,)) = form.json()["results"], raw.json()["results"]
    assert from_raw["predictions"] == from_form["predictions"]
    assert from_raw["filename"] is None and raw.json()["model"] == form.json()["model"]


def test_a_raw_body_that_is_not_an_image_is_415_whatever_its_content_type(client):
    resp = client.post("/classify", content=b"%PDF-1.4 ...", headers={"content-type": "image/png"})
    assert_error(resp, 415, "unsupported_image")


def test_json_base64_equals_multipart(client, fashion_test):
    images = [encode(Image.fromarray(img)) for img in fashion_test.images[:4]]
    multipart = client.post("/classify", files=[("images", ("x.png", d)) for d in images])
    payload = {
        "images": [
            base64.b64encode(images[0]).decode(),
            {"data": base64.b64encode(images[1]).decode(), "filename": "b.png"},
            "data:image/png;base64," + base64.b64encode(images[2]).decode(),
            base64.urlsafe_b64encode(images[3]).decode().rstrip("="),
        ],
        "top_k": 5,
    }
    as_json = client.post("/classify", json=payload)
    assert top1(as_json) == top1(multipart)
    assert as_json.json()["results"][1]["filename"] == "b.png"
    for a, b in zip(as_json.json()["results"], multipart.json()["results"], strict=True):
        assert a["predictions"] == b["predictions"]


@pytest.mark.parametrize("layout", ["npy-uint8", "npy-float32", "raw-uint8", "raw-float32"])
def test_tensor_endpoint_equals_image_upload(client, fashion_test, served, layout):
    from convserve.preprocess import from_pixels

    pixels = fashion_test.images[:5]
    images = client.post(
        "/classify", files=[("images", ("x.png", encode(Image.fromarray(p)))) for p in pixels]
    )
    tensor = (
        pixels[:, None]
        if layout.endswith("uint8")
        else from_pixels(pixels, served["latest"].spec.input)
    )
    if layout.startswith("npy"):
        buf = io.BytesIO()
        np.save(buf, tensor)
        resp = client.post(
            "/classify/tensor",
            content=buf.getvalue(),
            headers={"content-type": "application/x-npy"},
        )
    else:
        resp = client.post(
            "/classify/tensor",
            content=tensor.tobytes(),
            params={"shape": ",".join(map(str, tensor.shape)), "dtype": tensor.dtype.name},
            headers={"content-type": "application/octet-stream"},
        )
    assert top1(resp) == top1(images)
    for a, b in zip(resp.json()["results"], images.json()["results"], strict=True):
        np.testing.assert_allclose(
            [p["probability"] for p in a["predictions"]],
            [p["probability"] for p in b["predictions"]],
            atol=1e-6,
        )


def test_models_lists_every_served_model_and_version(client, served):
    body = client.get("/models").json()
    assert body["default"] == served["latest"].tag
    by_name = {m["name"]: m["versions"] for m in body["models"]}
    assert [v["tag"] for v in by_name["quick-lenet5"]] == [
        served["latest"].tag,
        served["older"].tag,
    ]
    assert [v["default"] for v in by_name["quick-lenet5"]] == [True, False]
    (rgb,) = by_name["rgb-lenet5"]
    assert rgb["input"]["channels"] == 3 and rgb["input"]["height"] == 32
    assert rgb["labels"][0] == "class 0"
    for versions in by_name.values():
        for v in versions:
            assert v["provider"] == "CPUExecutionProvider"
            assert len(v["sha256"]) == 64
    assert by_name["quick-lenet5"][0]["metrics"]["test_accuracy"] > 0.5


def test_model_and_version_select_the_model(client, served, fashion_test):
    data = encode(Image.fromarray(fashion_test.images[0]))
    files = [("images", ("x.png", data))]
    for params, tag in [
        ({"model": "quick-lenet5"}, served["latest"].tag),
        ({"model": "quick-lenet5", "version": served["older"].version}, served["older"].tag),
        ({"model": "quick-lenet5", "version": "latest"}, served["latest"].tag),
        ({"model": "rgb-lenet5"}, served["rgb"].tag),
    ]:
        resp = client.post("/classify", files=files, params=params)
        assert resp.status_code == 200 and resp.json()["model"] == tag
    # The RGB model gets the same grey picture converted to its own spec; as JSON too.
    payload = {"images": [base64.b64encode(data).decode()], "model": "rgb-lenet5", "top_k": 10}
    resp = client.post("/classify", json=payload)
    assert resp.json()["model"] == served["rgb"].tag
    assert resp.json()["results"][0]["predictions"][0]["label"].startswith("class ")


def test_openapi_documents_both_bodies_and_the_errors(client):
    schema = client.get("/api/openapi.json").json()
    post = schema["paths"]["/classify"]["post"]
    assert {"multipart/form-data", "application/json", "image/png", "image/jpeg"} <= set(
        post["requestBody"]["content"]
    )
    assert {p["name"] for p in post["parameters"]} == {"top_k", "model", "version"}
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/ClassifyResponse")
    assert {"200", "400", "404", "413", "415", "422", "503", "504"} <= set(post["responses"])
    error_ref = post["responses"]["415"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref.endswith("/ErrorResponse")
    tensor = schema["paths"]["/classify/tensor"]["post"]
    assert {"application/x-npy", "application/octet-stream"} <= set(
        tensor["requestBody"]["content"]
    )
    assert "/models" in schema["paths"]
    assert "ModelsResponse" in schema["components"]["schemas"]


# --- colour modes and formats: same top-1 as the plain picture --------------------------------


def _variants(garment: np.ndarray) -> dict[str, bytes]:
    big = np.kron(garment, np.ones((4, 4), np.uint8))  # 112 x 112: JPEG loss stays small
    grey = Image.fromarray(big)
    rgb = grey.convert("RGB")
    on_clear = np.dstack([np.full_like(big, 255)] * 3 + [big])  # white, alpha = the garment
    palette = grey.quantize(64)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # the corner: background
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated = rgb.transpose(Image.Transpose.ROTATE_90)  # stored sideways, shown upright
    gif_frames = [grey.convert("P"), Image.fromarray(255 - big).convert("P")]
    gif = io.BytesIO()
    gif_frames[0].save(gif, "GIF", save_all=True, append_images=gif_frames[1:], duration=100)
    return {
        "cmyk jpeg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "16-bit grey": encode(Image.fromarray(big.astype(np.uint16) * 257)),
        "palette with transparency": encode(palette),
        "rgba on clear": encode(Image.fromarray(on_clear, "RGBA")),
        "la": encode(Image.fromarray(np.dstack([big, np.full_like(big, 255)]), "LA")),
        "exif-rotated jpeg": encode(rotated, "JPEG", quality=95, exif=exif),
        "webp": encode(rgb, "WEBP", lossless=True),
        "gif first frame": gif.getvalue(),
    }


@pytest.mark.parametrize("variant", list(_variants(np.zeros((28, 28), np.uint8))))
def test_colour_modes_and_formats_give_the_plain_top1(client, confident, variant):
    plain = [encode(Image.fromarray(g)) for g in confident]
    other = [_variants(g)[variant] for g in confident]
    expected = top1(client.post("/classify", files=[("images", ("p.png", d)) for d in plain]))
    # The part's Content-Type is deliberately wrong: the bytes decide.
    got = client.post("/classify", files=[("images", ("v", d, "text/plain")) for d in other])
    assert top1(got) == expected


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(bad_requests(b"").keys()))
def test_bad_input_is_a_clean_error_and_the_service_stays_healthy(client, fashion_test, case):
    garment = encode(Image.fromarray(fashion_test.images[0]))
    status, code, kwargs = bad_requests(garment)[case]
    assert_error(client.post("/classify", **kwargs), status, code)
    assert client.get("/readyz").status_code == 200
    assert top1(client.post("/classify", files=[("images", ("a.png", garment))]))


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        (
            {"params": {"shape": "1,1,28,28", "dtype": "float32"}, "content": b"\0" * 12},
            "invalid_tensor",
        ),
        (
            {"params": {"shape": "1,1,28,28", "dtype": "float64"}, "content": b"\0" * 6272},
            "invalid_tensor",
        ),
        (
            {"params": {"shape": "1,3,28,28", "dtype": "uint8"}, "content": b"\0" * 2352},
            "invalid_tensor",
        ),
        (
            {
                "params": {"shape": "1,1,28,28", "dtype": "float32"},
                "content": np.full((1, 1, 28, 28), np.nan, np.float32).tobytes(),
            },
            "invalid_tensor",
        ),
        (
            {
                "params": {"shape": "1,1,28,28", "dtype": "float32"},
                "content": np.full((1, 1, 28, 28), -np.inf, np.float32).tobytes(),
            },
            "invalid_tensor",
        ),
        ({"content": b"\0" * 784}, "invalid_tensor"),
    ],
    ids=["short", "float64", "shape", "nan", "inf", "no shape"],
)
def test_bad_tensors_are_422(client, kwargs, code):
    resp = client.post(
        "/classify/tensor", headers={"content-type": "application/octet-stream"}, **kwargs
    )
    assert_error(resp, 422, code)


def test_urls_are_never_fetched(client):
    connections: list[object] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(listener.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}/garment.png"
        assert_error(client.post("/classify", data={"images": url}), 422, "invalid_request")
        assert_error(client.post("/classify", json={"images": [url]}), 422, "invalid_base64")
        assert_error(
            client.post("/classify", json={"images": [{"data": url}]}), 422, "invalid_base64"
        )
        stop.wait(0.5)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert connections == []
