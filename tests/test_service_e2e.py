"""A real `bentoml serve` process serving the trained default model, checked over HTTP."""

from __future__ import annotations

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from bad_inputs import assert_error, bad_requests
from PIL import Image
from serving import start_server, stop_server

from convserve.preprocess import from_pixels
from convserve.runtime import softmax
from convserve.service.tasks.classify import top_k

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(default_stored, bentoml_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, url = start_server(bentoml_home, log, models="fashion-lenet5:latest")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(default_stored):
    """In-process ONNX Runtime on the same stored file: what every HTTP answer must equal."""
    session = ort.InferenceSession(str(default_stored.path), providers=["CPUExecutionProvider"])
    spec = default_stored.spec

    def predict(images: np.ndarray, k: int = 5):
        x = from_pixels(images, spec.input)
        (logits,) = session.run(None, {session.get_inputs()[0].name: x})
        return top_k(softmax(logits), k)

    return predict


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def classify(client: httpx.Client, images: np.ndarray, top_k: int | None = None) -> dict:
    files = [("images", (f"test-{i}.png", png(img), "image/png")) for i, img in enumerate(images)]
    params = {} if top_k is None else {"top_k": top_k}
    resp = client.post("/classify", files=files, params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def assert_matches(results: list[dict], expected: tuple[np.ndarray, np.ndarray]) -> None:
    indices, probs = expected
    assert len(results) == len(indices)
    for result, row_i, row_p in zip(results, indices, probs, strict=True):
        got = result["predictions"]
        assert [p["index"] for p in got] == row_i.tolist()
        np.testing.assert_allclose([p["probability"] for p in got], row_p, rtol=0, atol=1e-5)


def test_single_image_requests_equal_in_process_onnxruntime(
    client, fashion_test, reference, default_stored
):
    for i in range(20):
        body = classify(client, fashion_test.images[i : i + 1])
        assert body["model"] == default_stored.tag
        (result,) = body["results"]
        assert len(result["predictions"]) == 5  # default top_k
        labels = default_stored.spec.labels
        assert all(p["label"] == labels[p["index"]] for p in result["predictions"])
        assert_matches(body["results"], reference(fashion_test.images[i : i + 1]))


def test_multi_image_request_keeps_order_and_names(client, fashion_test, reference):
    images = fashion_test.images[100:116]
    body = classify(client, images, top_k=3)
    assert [r["filename"] for r in body["results"]] == [f"test-{i}.png" for i in range(16)]
    assert_matches(body["results"], reference(images, 3))


def test_accuracy_through_http_on_1000_test_images(client, fashion_test):
    correct = 0
    n = 1000
    for start in range(0, n, 50):
        body = classify(client, fashion_test.images[start : start + 50], top_k=1)
        predicted = [r["predictions"][0]["index"] for r in body["results"]]
        correct += int((np.array(predicted) == fashion_test.labels[start : start + 50]).sum())
    accuracy = correct / n
    print(f"accuracy through HTTP on {n} test images: {100 * accuracy:.2f}%")
    assert accuracy >= 0.89


def test_64_concurrent_clients_get_no_503_and_their_own_answers(server, fashion_test, reference):
    clients, per_client = 64, 4
    expected = reference(fashion_test.images[: clients * per_client], 1)[0][:, 0]

    def one_client(c: int) -> list[tuple[int, int, int]]:
        out = []
        with httpx.Client(base_url=server, timeout=60) as http:
            for r in range(per_client):
                i = c * per_client + r
                resp = http.post(
                    "/classify",
                    params={"top_k": 1},
                    files=[("images", ("x.png", png(fashion_test.images[i])))],
                )
                index = (
                    resp.json()["results"][0]["predictions"][0]["index"]
                    if resp.status_code == 200
                    else -1
                )
                out.append((i, resp.status_code, index))
        return out

    with ThreadPoolExecutor(clients) as pool:
        answers = [a for batch in pool.map(one_client, range(clients)) for a in batch]
    statuses = [s for _, s, _ in answers]
    assert statuses.count(200) == len(answers), {s: statuses.count(s) for s in set(statuses)}
    assert all(index == expected[i] for i, _, index in answers)


# The in-process tier runs every bad request; the real server gets a cross-section of them.
REAL_SERVER_CASES = [
    "not an image", "empty file", "truncated png", "url instead of file", "no images",
    "top_k zero", "top_k over classes", "top_k not a number", "too many images",
]  # fmt: skip


@pytest.mark.parametrize("case", REAL_SERVER_CASES)
def test_bad_input_is_a_clean_4xx_and_the_server_stays_healthy(client, fashion_test, case):
    status, code, kwargs = bad_requests(png(fashion_test.images[0]))[case]
    assert_error(client.post("/classify", **kwargs), status, code)
    assert client.get("/readyz").status_code == 200
    assert classify(client, fashion_test.images[:1])["results"][0]["predictions"]


def test_probes_and_openapi(client):
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200
    schema = client.get("/api/openapi.json").json()
    assert "/classify" in schema["paths"]
    post = schema["paths"]["/classify"]["post"]
    assert {"200", "415", "422"} <= set(post["responses"])


def test_an_image_as_the_body_as_curl_data_binary_sends_it(client, fashion_test, reference):
    image = fashion_test.images[42:43]
    resp = client.post("/classify", content=png(image[0]), headers={"Content-Type": "image/png"})
    assert resp.status_code == 200, resp.text
    assert_matches(resp.json()["results"], reference(image))


def test_unique_junk_paths_do_not_grow_metrics(server):
    """Request metrics are labelled by route template: 10,000 distinct unknown paths (and
    methods no route takes) add an `unmatched` series, not 10,000."""
    url = server
    before = len(httpx.get(f"{url}/metrics").content)

    async def flood():
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for start in range(0, 10_000, 100):
                answers = await asyncio.gather(
                    *(http.get(f"/junk/{i}/x{i * 7919}") for i in range(start, start + 100))
                )
                assert {r.status_code for r in answers} == {404}
            assert (await http.delete("/classify")).status_code == 405
            assert (await http.patch(f"/pot/{start}")).status_code in (404, 405)

    asyncio.run(flood())
    text = httpx.get(f"{url}/metrics").text
    print(f"/metrics grew by {len(text) - before} bytes after 10,000 unique junk paths")
    assert len(text) - before < 50_000, len(text) - before
    assert 'route="unmatched"' in text and "/junk/" not in text and "/pot/" not in text


def test_the_classify_command_prints_labels_and_exits_non_zero_on_refusal(
    server, fashion_test, tmp_path
):
    import subprocess
    import sys

    from convserve.spec import FASHION_MNIST_LABELS

    paths = []
    for i in range(3):
        path = tmp_path / f"test-{i}.png"
        path.write_bytes(png(fashion_test.images[i]))
        paths.append(str(path))
    cmd = [sys.executable, "-m", "convserve", "classify", *paths, "--url", server]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        path, label, probability = line.split("\t")
        assert path == paths[i] and label in FASHION_MNIST_LABELS and 0 < float(probability) <= 1
    # The first Fashion-MNIST test image is an ankle boot; the trained model says so.
    assert lines[0].split("\t")[1] == "Ankle boot"

    top3 = subprocess.run([*cmd[:5], "--top-k", "3", "--url", server, "--json"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    results = json.loads(top3.stdout)["results"]
    assert len(results) == 1 and len(results[0]["predictions"]) == 3

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png(fashion_test.images[0])[:50])
    bad = subprocess.run([*cmd[:4], str(corrupt), "--url", server],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1 and "400 invalid_image" in bad.stderr, bad.stderr
    gone = subprocess.run([*cmd[:5], "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert gone.returncode == 2 and "cannot reach" in gone.stderr


def test_every_answer_carries_a_request_id_and_errors_repeat_it(client, fashion_test):
    ok = client.post("/classify", files=[("images", ("a.png", png(fashion_test.images[0])))])
    generated = ok.headers["x-request-id"]
    assert ok.status_code == 200 and len(generated) == 32 and int(generated, 16) >= 0
    headers = {"X-Request-ID": "trace-42", "Content-Type": "image/png"}
    mine = client.post("/classify", content=b"junk", headers=headers)
    assert mine.headers["x-request-id"] == "trace-42"
    assert mine.status_code == 415 and mine.json()["error"]["request_id"] == "trace-42"
    oip = client.post(
        "/v2/models/fashion-lenet5/infer", content=b"{", headers={"X-Request-ID": "t-2"}
    )
    assert oip.status_code == 400 and oip.json()["request_id"] == "t-2"
    # A header that is not a sane token is replaced, never echoed.
    odd = client.get("/models", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert odd.headers["x-request-id"] != "a b\tc" and len(odd.headers["x-request-id"]) == 32


def test_the_grafana_dashboard_queries_only_metrics_the_service_exports(client, fashion_test):
    import re

    files = [("images", (f"{i}.png", png(img))) for i, img in enumerate(fashion_test.images[:4])]
    assert client.post("/classify", files=files).status_code == 200
    exported = client.get("/metrics").text
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "convserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = set(re.findall(r"convserve_[a-z_]+", " ".join(exprs)))
    assert len(names) >= 10
    declared = (ROOT / "service" / "metrics.py").read_text()
    for name in names:
        family = re.sub(r"_(bucket|sum|count)$", "", name)  # a histogram's series
        # Exported, or declared: in multiprocess mode a counter that has not counted yet
        # (no drops, no hang-ups) has no series until it does.
        assert f"# TYPE {family} " in exported or f'"{family}"' in declared, name
    # Every label the dashboard groups by is one the metrics carry (or declare).
    for label in set(re.findall(r"by \(([a-z_, ]+)\)", " ".join(exprs))):
        for key in (k.strip() for k in label.split(",")):
            assert key == "le" or f'{key}="' in exported or f'"{key}"' in declared, key
