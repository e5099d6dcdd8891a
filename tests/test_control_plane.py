"""Tokens and model control on a real `bentoml serve`: tritonclient lists, unloads and reloads
a served model with the admin token and is refused with the inference token; reloads under
load fail no request; a reload from a tampered store is refused while the served version keeps
answering; inference needs the inference token, never the admin one."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from bad_inputs import encode
from conftest import _store
from PIL import Image
from serving import free_port, start_server, stop_server

from convserve.errors import ConvserveError
from convserve.service.protocols.base import Access
from convserve.service.server import Tokens

API, ADMIN = "inference-7f3a0c11", "admin-91bc44-d2e7a9"
NAME = "ctl-lenet5"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def versions(quick_run, tmp_path_factory):
    """Two versions of a model of this module's own (the tests tamper with its files)."""
    out = tmp_path_factory.mktemp("ctl") / "ctl.onnx"
    return _store(quick_run.checkpoint, NAME, out), _store(quick_run.checkpoint, NAME, out)


@pytest.fixture(scope="module")
def grpc_address() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def server(bentoml_home, versions, quick_stored, tmp_path_factory, grpc_address):
    first, _ = versions
    log = tmp_path_factory.mktemp("ctl-server") / "server.log"
    models = f"{first.tag},{quick_stored[1].tag}"
    proc, url = start_server(
        bentoml_home, log, models=models, api_token=API, admin_token=ADMIN,
        grpc_port=grpc_address.rsplit(":", 1)[1],
    )  # fmt: skip
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def garment(fashion_test) -> bytes:
    return encode(Image.fromarray(fashion_test.images[0]))


def classify(url: str, png: bytes, headers: dict[str, str], **params: str) -> httpx.Response:
    files = {"images": ("g.png", png, "image/png")}
    return httpx.post(f"{url}/classify", params=params, files=files, headers=headers, timeout=30)


def triton(url: str, token: str):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    return client, bearer(token)


def test_inference_needs_the_inference_token_and_probes_stay_open(server, garment):
    for headers in ({}, bearer(ADMIN), bearer("wrong"), {"Authorization": API}):
        resp = classify(server, garment, headers)
        assert resp.status_code == 401, headers
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.json()["error"]["code"] == "unauthenticated"
        assert API not in resp.text and ADMIN not in resp.text
        assert httpx.get(f"{server}/models", headers=headers).status_code == 401
        assert httpx.get(f"{server}/v2/models/{NAME}", headers=headers).status_code == 401
    assert classify(server, garment, bearer(API)).status_code == 200
    assert httpx.get(f"{server}/models", headers=bearer(API)).status_code == 200
    for probe in ("/readyz", "/livez", "/v2/health/ready", "/v2/health/live"):
        assert httpx.get(f"{server}{probe}").status_code == 200, probe


def test_tritonclient_lists_unloads_and_reloads_with_the_admin_token_only(
    server, versions, garment
):
    from tritonclient.utils import InferenceServerException

    first, second = versions
    client, admin = triton(server, ADMIN)
    _, api = triton(server, API)
    with pytest.raises(InferenceServerException):
        client.get_model_repository_index(headers=api)
    with pytest.raises(InferenceServerException):
        client.unload_model(NAME, headers=api)
    index = client.get_model_repository_index(headers=admin)
    states = {(m["name"], m["version"]): m["state"] for m in index}
    assert states[(NAME, first.version)] == "READY"
    assert states[(NAME, second.version)] == "UNAVAILABLE"

    client.unload_model(NAME, headers=admin)
    gone = classify(server, garment, bearer(API), model=NAME)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert classify(server, garment, bearer(API)).status_code == 200  # the other model

    client.load_model(NAME, headers=admin)  # its latest version
    answer = classify(server, garment, bearer(API), model=NAME)
    assert answer.status_code == 200 and answer.json()["model"] == second.tag
    states = {(m["name"], m["version"]): m["state"]
              for m in client.get_model_repository_index(headers=admin)}  # fmt: skip
    assert states[(NAME, second.version)] == "READY"
    assert states[(NAME, first.version)] == "UNAVAILABLE"


def test_over_grpc_the_same_tokens_guard_inference_and_the_repository(
    server, grpc_address, versions, garment
):
    import grpc
    import numpy as np
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    _, second = versions
    api, admin = {"authorization": f"Bearer {API}"}, {"authorization": f"Bearer {ADMIN}"}
    image = tgrpc.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[garment]], dtype=np.object_))
    with tgrpc.InferenceServerClient(grpc_address) as client:
        assert client.is_server_live() and client.is_server_ready()  # probes: open
        for headers in ({}, admin, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as refused:
                client.infer(NAME + ".image", [image], headers=headers)
            assert refused.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
            assert API not in str(refused.value) and ADMIN not in str(refused.value)
        answer = client.infer(NAME + ".image", [image], headers=api)
        assert answer.as_numpy("probabilities").shape == (1, 10)
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_repository_index(headers=api)
        assert refused.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
        index = client.get_model_repository_index(headers=admin, as_json=True)["models"]
        assert [m["state"] for m in index if m["name"] == NAME].count("READY") == 1
        client.unload_model(NAME, headers=admin)
        with pytest.raises(InferenceServerException) as gone:
            client.infer(NAME + ".image", [image], headers=api)
        assert gone.value.status() == str(grpc.StatusCode.NOT_FOUND)
        client.load_model(NAME, headers=admin)  # its latest version again
        assert (
            client.infer(NAME + ".image", [image], headers=api).get_response().model_version
            == second.version
        )


def _load(url: str, version: str) -> httpx.Response:
    body = {"parameters": {"version": version}}
    return httpx.post(f"{url}/v2/repository/models/{NAME}/load", json=body,
                      headers=bearer(ADMIN), timeout=60)  # fmt: skip


def test_three_reloads_while_8_clients_classify_fail_no_request(server, versions, garment):
    first, second = versions
    statuses: list[int] = []
    tags: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                files = {"images": ("g.png", garment, "image/png")}
                resp = http.post(f"{server}/classify", params={"model": NAME}, files=files,
                                 headers=bearer(API))  # fmt: skip
                statuses.append(resp.status_code)
                if resp.status_code == 200:
                    tags.add(resp.json()["model"])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for version in (first.version, second.version, first.version):
            assert _load(server, version).status_code == 200
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) > 50 and set(statuses) == {200}, set(statuses)
    assert tags == {first.tag, second.tag}


def test_a_reload_from_a_tampered_store_is_refused_and_the_served_version_answers(
    server, versions, garment
):
    first, second = versions
    assert _load(server, first.version).status_code == 200
    original = second.path.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    second.path.write_bytes(bytes(tampered))
    try:
        refused = _load(server, second.version)
        assert refused.status_code == 400, refused.text
        assert "sha256" in refused.json()["error"] or "checksum" in refused.json()["error"]
        served = classify(server, garment, bearer(API), model=NAME)
        assert served.status_code == 200 and served.json()["model"] == first.tag
        missing = _load(server, "nosuchversion")
        assert missing.status_code == 400 and "not in the model store" in missing.json()["error"]
    finally:
        second.path.write_bytes(original)


def test_uploads_and_urls_are_never_loaded(server):
    for parameters in ({"config": "{}"}, {"file:1/model.onnx": "AAAA"}):
        resp = httpx.post(f"{server}/v2/repository/models/{NAME}/load", headers=bearer(ADMIN),
                          json={"parameters": parameters})  # fmt: skip
        assert resp.status_code == 400 and "local store" in resp.json()["error"]


@pytest.mark.parametrize(
    ("tokens", "scope", "sent", "code"),
    [
        (Tokens.of(None, None), Access.INFERENCE, None, None),
        (Tokens.of("tok-a", None), Access.INFERENCE, b"Bearer tok-a", None),
        (Tokens.of("tok-a", None), Access.INFERENCE, b"bearer  tok-a ", None),
        (Tokens.of("tok-a", None), Access.INFERENCE, None, "unauthenticated"),
        (Tokens.of("tok-a", None), Access.INFERENCE, b"Basic dG9rLWE=", "unauthenticated"),
        (Tokens.of("tok-a", "tok-b"), Access.INFERENCE, b"Bearer tok-b", "unauthenticated"),
        (Tokens.of("tok-a", "tok-b"), Access.ADMIN, b"Bearer tok-a", "unauthenticated"),
        (Tokens.of("tok-a", "tok-b"), Access.ADMIN, b"Bearer tok-b", None),
        (Tokens.of("tok-a", None), Access.ADMIN, b"Bearer tok-a", "forbidden"),
        (Tokens.of("tok-a", "tok-b"), Access.OPEN, None, None),
    ],
)
def test_the_token_rules(tokens, scope, sent, code):
    if code is None:
        tokens.check(scope, sent)
    else:
        with pytest.raises(ConvserveError) as err:
            tokens.check(scope, sent)
        assert err.value.code == code
    assert "tok-" not in repr(tokens)  # never in a log line


@pytest.fixture(scope="module")
def two_workers(bentoml_home, versions, quick_stored, tmp_path_factory):
    first, _ = versions
    log = tmp_path_factory.mktemp("ctl-workers") / "server.log"
    models = f"{first.tag},{quick_stored[1].tag}"
    proc, url = start_server(bentoml_home, log, models=models, workers="2", admin_token=ADMIN)
    yield url, log
    stop_server(proc)


def _agreed(url: str, path: str, status: int, timeout: float = 10.0) -> float:
    """Seconds until 30 answers in a row, each on a new connection (so spread over the
    workers), have `status`."""
    started = time.monotonic()
    streak = 0
    while streak < 30:
        assert time.monotonic() - started < timeout, f"workers did not agree on {status}"
        streak = streak + 1 if httpx.get(url + path).status_code == status else 0
    return time.monotonic() - started


def test_every_worker_applies_a_load_and_an_unload(two_workers, versions):
    url, log = two_workers
    first, second = versions
    path = f"/v2/models/{NAME}/versions/{{}}/ready"
    client, admin = triton(url, ADMIN)
    client.unload_model(NAME, headers=admin)
    unloaded = _agreed(url, path.format(first.version), 404)
    assert _load(url, second.version).status_code == 200
    loaded = _agreed(url, path.format(second.version), 200)
    print(f"two workers agreed {unloaded:.2f} s after an unload, {loaded:.2f} s after a load")
    text = log.read_text()
    assert text.count(f"loaded {second.tag}") == 2 and text.count(f"unloaded {NAME}") == 2


def test_tokens_are_read_when_the_worker_starts_not_at_import(quick_stored):
    """The service module is imported before the token is set (LitServe's key, read at import,
    left auth silently off): the worker built afterwards still asks for it. Without an admin
    token, model control answers 403 saying how to turn it on."""
    from starlette.testclient import TestClient

    from convserve.service.app import Classifier  # imported first, no token in sight

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVSERVE_MODELS", quick_stored[1].tag)
        mp.setenv("CONVSERVE_WARMUP_REQUESTS", "1")
        mp.setenv("CONVSERVE_API_TOKEN", API)
        mp.setenv("CONVSERVE_GRPC_PORT", "0")  # in this process: HTTP only
        with TestClient(Classifier.to_asgi()) as client:
            assert client.get("/models").status_code == 401
            assert client.get("/models", headers=bearer(API)).status_code == 200
            off = client.post("/v2/repository/index", headers=bearer(API))
            assert off.status_code == 403 and "CONVSERVE_ADMIN_TOKEN" in off.json()["error"]
