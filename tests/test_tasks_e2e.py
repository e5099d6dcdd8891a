"""Detection, verification and style transfer served by a real `bentoml serve`, beside a
classifier: each route answers as documented, agrees with in-process ONNX Runtime, refuses
what it must with the documented 4xx, and the server stays healthy."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from bad_inputs import assert_error, encode, png_with_header
from PIL import Image
from serving import free_port, start_server, stop_server

from convserve.models.data import load_scenes
from convserve.tasks.detect import select

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def server(
    default_stored,
    imagenet_stored,
    detector_stored,
    siamese_stored,
    stylizer_stored,
    bentoml_home,
    tmp_path_factory,
):
    """Every model the README serves, under the README's names, the default first."""
    log = tmp_path_factory.mktemp("tasks") / "server.log"
    models = ",".join(
        f"{stored.name}:latest"
        for stored in (
            default_stored,
            imagenet_stored,
            detector_stored,
            siamese_stored,
            stylizer_stored,
        )
    )
    proc, url = start_server(bentoml_home, log, models=models, grpc_port=str(GRPC_PORT))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def scenes():
    return load_scenes("test", 24)


def png(array: np.ndarray) -> bytes:
    return encode(Image.fromarray(array))


# --- what GET /models and the OIP say -------------------------------------------------------


def test_models_lists_each_task_and_its_routes(client):
    versions = {m["name"]: m["versions"][0] for m in client.get("/models").json()["models"]}
    assert versions["fashion-lenet5"]["task"] == "classify"
    assert versions["fashion-detector"]["task"] == "detect"
    assert versions["fashion-detector"]["routes"] == ["/detect"]
    assert versions["fashion-detector"]["detect"]["grid"] == 8
    assert versions["fashion-siamese"]["routes"] == ["/embed", "/verify"]
    assert 0 < versions["fashion-siamese"]["embed"]["threshold"] < 4
    assert versions["styletransfer-multistyle26"]["stylize"]["styles"] == 26
    assert versions["styletransfer-multistyle26"]["input"]["resize"] == "none"
    assert versions["imagenet-efficientnet-lite0"]["input"]["reduced_decode"] is True
    assert versions["imagenet-efficientnet-lite0"]["recipe"].endswith("reduced decode")


def test_the_open_inference_protocol_serves_the_detectors_raw_outputs(client, scenes):
    meta = client.get("/v2/models/fashion-detector").json()
    assert [o["name"] for o in meta["outputs"]] == ["boxes", "scores"]
    data = base64.b64encode(png(scenes.images[0])).decode()
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [data]}]}
    resp = client.post("/v2/models/fashion-detector/infer", json=body)
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o for o in resp.json()["outputs"]}
    assert outputs["boxes"]["shape"] == [1, 192, 4] and outputs["scores"]["shape"] == [1, 192, 10]
    refused = client.post("/v2/models/styletransfer-multistyle26/infer", json=body)
    assert refused.status_code == 400 and "style_weights" in refused.json()["error"]


def test_every_task_answers_over_grpc_as_over_http(client, server, scenes, fashion_test, photos):
    """Each model's encoded-image view over gRPC (tritonclient.grpc), its metadata filled as
    listed; the outputs equal the same request over HTTP."""
    import tritonclient.grpc as tgrpc

    garment = png(fashion_test.images[0])
    cases = {
        "fashion-lenet5": garment,
        "imagenet-efficientnet-lite0": next(iter(photos.values())),
        "fashion-detector": png(scenes.images[0]),
        "fashion-siamese": garment,
        "styletransfer-multistyle26": garment,
    }
    with tgrpc.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}") as grpc_client:
        for name, image in cases.items():
            meta = grpc_client.get_model_metadata(name + ".image", as_json=True)
            inputs = []
            for listed in meta["inputs"]:  # as listed: the image, and a stylizer's weights
                shape = [1, *(int(d) for d in listed["shape"][1:])]
                tensor = tgrpc.InferInput(listed["name"], shape, listed["datatype"])
                if listed["datatype"] == "BYTES":
                    tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
                else:
                    weights = np.zeros(shape, np.float32)
                    weights[0, 3] = 1.0  # style 3
                    tensor.set_data_from_numpy(weights)
                inputs.append(tensor)
            result = grpc_client.infer(name + ".image", inputs)
            http = client.post(
                f"/v2/models/{name}.image/infer",
                json={"inputs": [
                    {"name": t.name(), "shape": list(t.shape()), "datatype": t.datatype(),
                     "data": ([base64.b64encode(image).decode()] if t.datatype() == "BYTES"
                              else np.eye(1, meta_styles(meta), 3).ravel().tolist())}
                    for t in inputs
                ]},
            )  # fmt: skip
            assert http.status_code == 200, (name, http.text)
            for output in http.json()["outputs"]:
                got = result.as_numpy(output["name"])
                assert list(got.shape) == output["shape"], name
                np.testing.assert_allclose(got.ravel(), output["data"], atol=1e-5, err_msg=name)


def meta_styles(meta: dict) -> int:
    """The number of styles a stylizer's metadata lists (1 for any other model)."""
    return next((int(i["shape"][1]) for i in meta["inputs"] if i["datatype"] == "FP32"), 1)


# --- detection --------------------------------------------------------------------------------


def _detect(client, images: list[bytes], **params) -> list[dict]:
    files = [("images", (f"{i}.png", data)) for i, data in enumerate(images)]
    resp = client.post("/detect", files=files, params=params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"].startswith("fashion-detector:")
    return body["results"]


def test_detections_equal_in_process_onnxruntime_with_the_same_thresholds(
    client, scenes, detector_stored
):
    session = ort.InferenceSession(str(detector_stored.path), providers=["CPUExecutionProvider"])
    spec = detector_stored.spec.input
    results = _detect(client, [png(s) for s in scenes.images[:8]], score_threshold=0.3)
    for image, result in zip(scenes.images[:8], results, strict=True):
        x = ((image.astype(np.float32) / 255 - spec.mean[0]) / spec.std[0])[None, None]
        boxes, scores = session.run(None, {"input": x})
        expected = select(
            boxes[0], scores[0], score_threshold=0.3, iou_threshold=0.45, max_detections=100
        )
        got = result["detections"]
        assert (result["width"], result["height"]) == (128, 128)
        assert [d["index"] for d in got] == expected.classes.tolist()
        assert np.allclose([d["score"] for d in got], expected.scores, atol=1e-5)
        flat = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in got])
        want = np.clip(expected.boxes, 0, 128).reshape(-1, 4)  # an empty scene: 0 x 4
        assert np.allclose(flat.reshape(-1, 4), want, atol=0.01)
        assert all(a["score"] >= b["score"] for a, b in zip(got, got[1:], strict=False))


def test_an_empty_canvas_has_no_detection_above_one_half(client):
    (result,) = _detect(client, [png(np.zeros((128, 128), np.uint8))], score_threshold=0.5)
    assert result["detections"] == []


def test_boxes_are_in_the_uploads_own_pixels_for_a_non_square_upload(client, scenes):
    """A scene padded to 128 x 192 (black below) is letterboxed back into the model's square:
    scaled by 2/3 and centred. Every box must come back in the padded upload's pixels: the same
    as the in-process letterbox computed here, mapped back by hand."""
    scene = scenes.images[3]
    tall = np.zeros((192, 128), np.uint8)
    tall[:128] = scene
    (result,) = _detect(client, [png(tall)], score_threshold=0.3)
    assert (result["width"], result["height"]) == (128, 192)
    small = Image.fromarray(tall).resize((85, 128), Image.Resampling.BILINEAR)  # 128 x 2/3
    square = Image.new("L", (128, 128))
    square.paste(small, ((128 - 85) // 2, 0))
    again = _detect(client, [encode(square)], score_threshold=0.3)[0]["detections"]
    assert [d["index"] for d in result["detections"]] == [d["index"] for d in again]
    for d, e in zip(result["detections"], again, strict=True):
        back_x = [(e["box"][k] - (128 - 85) // 2) * 128 / 85 for k in ("x1", "x2")]
        back_y = [e["box"][k] * 192 / 128 for k in ("y1", "y2")]
        got = [d["box"]["x1"], d["box"]["x2"], d["box"]["y1"], d["box"]["y2"]]
        expected = [max(0, back_x[0]), min(128, back_x[1]), max(0, back_y[0]), back_y[1]]
        assert np.allclose(got, expected, atol=0.05), (got, expected)
        assert d["box"]["y2"] <= 128 * 1.01 + 1  # inside the scene's part of the upload


def test_a_large_jpeg_scene_is_decoded_reduced_and_its_boxes_land_on_the_upload(client, scenes):
    """The scene 16 times larger (2048 px JPEG): decoded at 1/8, its boxes still come back in
    the upload's own pixels, 16 times the 128 px scene's."""
    scene = scenes.images[3]
    big = Image.fromarray(scene).resize((2048, 2048), Image.Resampling.NEAREST)
    (small,) = _detect(client, [png(scene)], score_threshold=0.5)
    (large,) = _detect(client, [encode(big, "JPEG", quality=95)], score_threshold=0.5)
    assert (large["width"], large["height"]) == (2048, 2048)
    assert sorted(d["index"] for d in large["detections"]) == sorted(
        d["index"] for d in small["detections"]
    )
    for d in large["detections"]:
        e = min(
            (e for e in small["detections"] if e["index"] == d["index"]),
            key=lambda e: abs(e["box"]["x1"] * 16 - d["box"]["x1"]),
        )
        got = [d["box"][k] for k in ("x1", "y1", "x2", "y2")]
        assert np.allclose(got, [e["box"][k] * 16 for k in ("x1", "y1", "x2", "y2")], atol=48)


def test_a_48_mp_phone_photo_is_classified(client, imagenet_stored):
    """8000 x 6000, about 8 MB: within the body limit, decoded at 1/8, the answer a full
    decode gives in-process."""
    from convserve.models.data import phone_photos
    from convserve.preprocess import ImageLimits, from_bytes

    (data,) = phone_photos((8000, 6000), ("coffee.png",))
    files = [("images", ("phone.jpg", data, "image/jpeg"))]
    resp = client.post(
        "/classify", params={"model": "imagenet-efficientnet-lite0", "top_k": 1}, files=files
    )
    assert resp.status_code == 200, resp.text
    (prediction,) = resp.json()["results"][0]["predictions"]
    full = imagenet_stored.spec.input.model_copy(update={"reduced_decode": False})
    session = ort.InferenceSession(str(imagenet_stored.path), providers=["CPUExecutionProvider"])
    x = from_bytes(data, full, ImageLimits(max_pixels=50_000_000))  # in full: 48 M pixels
    logits = session.run(None, {session.get_inputs()[0].name: x[None]})[0]
    assert prediction["index"] == int(logits.argmax()) == 967  # espresso
    assert client.get("/readyz").status_code == 200


def test_detect_takes_raw_bodies_and_json_and_refuses_bad_thresholds(client, scenes):
    data = png(scenes.images[1])
    multipart = _detect(client, [data], score_threshold=0.3)[0]["detections"]
    raw = client.post(
        "/detect?score_threshold=0.3", content=data, headers={"content-type": "image/png"}
    )
    body = {"images": [base64.b64encode(data).decode()], "score_threshold": 0.3}
    as_json = client.post("/detect", json=body)
    assert raw.json()["results"][0]["detections"] == multipart
    assert as_json.json()["results"][0]["detections"] == multipart
    one = {"files": [("images", ("a.png", data))]}
    for params in (
        {"score_threshold": 2},
        {"score_threshold": -0.1},
        {"iou_threshold": 1.5},
        {"max_detections": 0},
        {"max_detections": 1001},
        {"score_threshold": "x"},
        {"iou_threshold": "nan"},
    ):
        assert_error(client.post("/detect", params=params, **one), 422, "invalid_request")
    conflict = {**body, "score_threshold": 0.5}
    assert_error(
        client.post("/detect?score_threshold=0.3", json=conflict), 422, "conflicting_parameters"
    )
    assert_error(client.post("/detect?model=fashion-lenet5", **one), 422, "wrong_task")
    assert_error(client.post("/classify?model=fashion-detector", **one), 422, "wrong_task")


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("not an image", 415, "unsupported_image"),
        ("truncated", 400, "invalid_image"),
        ("pixel bomb", 413, "image_too_large"),
        ("too many", 422, "too_many_images"),
    ],
)
def test_bad_images_get_their_documented_error_and_the_server_stays_ready(
    client, server, scenes, case, status, code
):
    data = png(scenes.images[0])
    files = {
        "not an image": [("images", ("a.png", b"hello"))],
        "truncated": [("images", ("a.png", data[: len(data) // 2]))],
        "pixel bomb": [("images", ("a.png", png_with_header(50_000, 50_000)))],
        "too many": [("images", (f"{i}.png", data)) for i in range(65)],
    }[case]
    assert_error(client.post("/detect", files=files), status, code)
    assert httpx.get(f"{server}/readyz").status_code == 200


def test_the_detect_command_prints_the_boxes(server, scenes, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "scene.png"
    path.write_bytes(png(scenes.images[2]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "convserve",
            "detect",
            str(path),
            "--url",
            server,
            "--score-threshold",
            "0.3",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "128x128" in done.stdout and "detection(s)" in done.stdout


# --- embeddings and verification ----------------------------------------------------------------


def test_embeddings_are_unit_length_and_identical_images_have_distance_zero(
    client, fashion_test, siamese_stored
):
    files = [("images", (f"{i}.png", png(fashion_test.images[i]))) for i in range(3)]
    resp = client.post("/embed", files=files)
    assert resp.status_code == 200, resp.text
    vectors = np.array([r["embedding"] for r in resp.json()["results"]])
    assert vectors.shape == (3, siamese_stored.spec.embed.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    same = png(fashion_test.images[0])
    answer = client.post("/verify", files=[("a", ("a.png", same)), ("b", ("b.png", same))]).json()
    assert answer["distance"] == pytest.approx(0.0, abs=1e-9) and answer["same"] is True
    assert answer["model"].startswith("fashion-siamese:")


def test_verify_says_same_for_near_and_different_for_far_images(
    client, fashion_test, siamese_stored
):
    threshold = siamese_stored.spec.embed.threshold
    boot, bag = png(fashion_test.images[0]), png(fashion_test.images[3])  # classes 9 and 1
    answer = client.post("/verify", files=[("a", ("a.png", boot)), ("b", ("b.png", bag))]).json()
    assert answer["threshold"] == threshold
    assert answer["same"] == (answer["distance"] <= threshold)
    body = {"images": [base64.b64encode(boot).decode(), base64.b64encode(bag).decode()]}
    assert client.post("/verify", json=body).json()["distance"] == pytest.approx(answer["distance"])


def test_the_verify_command_prints_the_verdict(server, fashion_test, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(png(fashion_test.images[0]))
    b.write_bytes(png(fashion_test.images[0]))
    cmd = [sys.executable, "-m", "convserve", "verify", str(a), str(b), "--url", server]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\tsame\tdistance 0.0000\t" in done.stdout, done.stdout
    refused = subprocess.run([*cmd[:4], str(a), str(tmp_path / "missing.png")],
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "no such file" in refused.stderr


def test_the_served_evaluation_measures_each_kind_of_unseen_pair_and_draws_them(server, tmp_path):
    out = tmp_path / "served.json"
    cmd = [sys.executable, "-m", "convserve.loadtest.evaluate", "verify", "--url", server,
           "--pairs", "300", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["unseen"]["pairs"] == result["seen"]["pairs"] == 300
    # A short-trained verifier still tells most unseen pairs apart, bags from shoes best.
    assert result["unseen"]["roc_auc"] > 0.6 and result["seen"]["roc_auc"] > 0.6
    table = result["unseen"]["roc_auc_by_kind"]
    assert set(table) == {"Sneaker", "Bag", "Ankle boot"}
    kinds = {"Sneaker / Bag", "Sneaker / Ankle boot", "Bag / Ankle boot"}
    assert all(set(row) == kinds and all(0 <= v <= 1 for v in row.values())
               for row in table.values())  # fmt: skip
    assert table["Sneaker"]["Sneaker / Bag"] > 0.8
    assert (tmp_path / "distances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_refuses_anything_but_two_images(client, fashion_test):
    one = png(fashion_test.images[0])
    b64 = base64.b64encode(one).decode()
    for files in (
        [("a", ("a.png", one))],
        [("a", ("a.png", one)), ("a", ("c.png", one)), ("b", ("b.png", one))],
    ):
        assert_error(client.post("/verify", files=files), 422, "invalid_request")
    for images in ([b64], [b64, b64, b64]):
        assert_error(client.post("/verify", json={"images": images}), 422, "invalid_request")


@pytest.mark.parametrize(
    ("route", "fields"),
    [
        ("/classify", ("images",)),
        ("/detect", ("images",)),
        ("/embed", ("images",)),
        ("/verify", ("a", "b")),
        ("/stylize", ("images",)),
    ],
)
def test_every_route_refuses_a_part_it_does_not_take(client, fashion_test, route, fields):
    """A third image `c` beside `a` and `b`, or a parameter sent as a form field, would be
    dropped unseen: each is refused, naming the field."""
    one = png(fashion_test.images[0])
    files = [(name, (f"{name}.png", one)) for name in fields]
    for extra in ([("c", ("c.png", one))], [("top_k", (None, "3"))]):
        resp = client.post(route, files=files + extra)
        assert_error(resp, 422, "invalid_request")
        assert repr(extra[0][0]) in resp.json()["error"]["message"]
    assert client.post(route, files=files).status_code == 200


# --- style transfer ----------------------------------------------------------------------------


def test_a_stylized_png_has_the_uploads_size_differs_from_it_and_repeats_exactly(client, photos):
    photo = Image.open(io.BytesIO(photos["astronaut.png"])).convert("RGB").resize((150, 97))
    data = encode(photo, "JPEG", quality=92)
    first = client.post("/stylize?style=3", content=data, headers={"content-type": "image/jpeg"})
    assert first.status_code == 200, first.text
    assert (
        first.headers["content-type"] == "image/png" and "x-convserve-scaled" not in first.headers
    )
    out = Image.open(io.BytesIO(first.content))
    assert out.size == (150, 97) and out.mode == "RGB"
    assert np.abs(np.asarray(out, np.float32) - np.asarray(photo, np.float32)).mean() > 10
    again = client.post("/stylize?style=3", content=data, headers={"content-type": "image/jpeg"})
    assert again.content == first.content  # same image, same style: the same bytes
    blend = client.post(
        "/stylize", params={"style": "3:0.5,12:0.5"}, files=[("images", ("a.jpg", data))]
    )
    assert blend.status_code == 200 and blend.content != first.content


def test_a_large_upload_is_scaled_down_first_and_the_answer_says_so(client):
    big = encode(Image.new("RGB", (2000, 1000), (120, 80, 40)), "JPEG")
    resp = client.post("/stylize?style=1", content=big, headers={"content-type": "image/jpeg"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-convserve-scaled"] == "2000x1000->1024x512"
    assert Image.open(io.BytesIO(resp.content)).size == (1024, 512)


def test_stylize_refuses_styles_out_of_range_and_more_than_one_image(client):
    data = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG")
    for style in ("26", "-1", "3:0", "x", "3:0.5,40:0.5"):
        resp = client.post(
            "/stylize", params={"style": style}, content=data, headers={"content-type": "image/png"}
        )
        assert resp.status_code == 422, (style, resp.text)
        assert resp.json()["error"]["code"] in {"invalid_style", "invalid_request"}
    two = [("images", ("a.png", data)), ("images", ("b.png", data))]
    assert_error(client.post("/stylize", files=two), 422, "invalid_request")
    assert_error(
        client.post(
            "/stylize?model=fashion-lenet5", content=data, headers={"content-type": "image/png"}
        ),
        422,
        "wrong_task",
    )


def test_the_server_logged_no_unhandled_error(server, client):
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert 'convserve_rejected_requests_total{code="internal_error"}' not in metrics
    assert json.loads(client.get("/models").text)["default"].startswith("fashion-lenet5:")


# --- the README, as written --------------------------------------------------------------------


def _readme_commands() -> list[str]:
    """The README's shell examples that talk to a running server, one command each, in order
    (a later one may use a file an earlier one wrote)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines = [line.split("  # ")[0].strip() for line in joined.splitlines()]
        # Requests and the files they send; not set-up (`make serve`), load tests or synopses.
        lines = [line for line in lines if line.startswith(("curl ", ".venv/bin/"))]
        if "127.0.0.1:3000" in " ".join(lines) and "[--" not in block:
            commands += lines
    return commands


def test_every_readme_example_runs_as_written_against_a_running_server(server, tmp_path):
    commands = _readme_commands()
    assert len(commands) >= 15 and any("pixels.u8" in c for c in commands)
    for route in ("/classify", "/detect", "/embed", "/verify", "/stylize"):
        assert any(route in c for c in commands), route
    venv_bin = str(Path(sys.executable).parent) + "/"
    for command in commands:
        shell = command.replace(".venv/bin/", venv_bin).replace("http://127.0.0.1:3000", server)
        env = {**os.environ, "CONVSERVE_URL": server}  # the command line's default URL
        done = subprocess.run(["bash", "-c", "set -euo pipefail; " + shell], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
        assert done.returncode == 0, (command, done.stdout[-500:], done.stderr[-500:])
        if command.startswith("curl") and " -o " in command:  # an image written to a file
            written = tmp_path / command.split(" -o ")[1].split()[0]
            with Image.open(written) as img:
                assert img.format == "PNG", command
        elif command.startswith("curl"):
            answer = json.loads(done.stdout)
            assert "error" not in answer, (command, answer)
            assert {"results", "models", "distance"} & set(answer), (command, answer)
