"""A real `bentoml serve` through its life: refusing bad models, bursts, metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from serving import ROOT, start_server, stop_server

pytestmark = pytest.mark.slow


def png(image: np.ndarray, scale: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.kron(image, np.ones((scale, scale), np.uint8))).save(buf, "PNG")
    return buf.getvalue()


def _copy_store(home: Path, target: Path, name: str) -> Path:
    """A private store holding only `name`'s versions, safe to damage."""
    shutil.copytree(home / "models" / name, target / "models" / name)
    return target


def _serve_and_expect_refusal(home: Path, **settings: str) -> str:
    env = {
        "BENTOML_HOME": str(home),
        "PATH": "/usr/bin:/bin",
        **{f"CONVSERVE_{k.upper()}": v for k, v in settings.items()},
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "convserve.service.app:Classifier",
            "--port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_missing_model_stops_start_up(bentoml_home, quick_stored):
    out = _serve_and_expect_refusal(bentoml_home, models="no-such-model:latest")
    assert "convserve cannot start: model 'no-such-model:latest' is not in the model store" in out


def test_a_grpc_port_taken_by_another_process_stops_start_up(bentoml_home, quick_stored):
    import socket

    with socket.socket() as taken:  # a listener that does not share its port (no SO_REUSEPORT)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _serve_and_expect_refusal(
            bentoml_home, models=f"{quick_stored[1].tag}", grpc_host="127.0.0.1",
            grpc_port=str(port),
        )  # fmt: skip
    assert f"convserve cannot start: cannot listen for gRPC on 127.0.0.1:{port}" in out
    assert "CONVSERVE_GRPC_PORT" in out


def test_corrupt_onnx_file_stops_start_up(bentoml_home, quick_stored, tmp_path):
    home = _copy_store(bentoml_home, tmp_path, "quick-lenet5")
    stored = quick_stored[1]
    onnx_file = home / "models" / "quick-lenet5" / stored.version / "model.onnx"
    _flip_byte(onnx_file, onnx_file.stat().st_size // 2)
    out = _serve_and_expect_refusal(home, models=stored.tag)
    assert "model.onnx checksum" in out and "does not match" in out and "corrupt" in out


def _resign(version_dir: Path, name: str) -> None:
    """Record a file's new sha256 in the store's metadata, as a careful tamperer would: the
    checksums then pass, and the deeper checks are what must catch the change."""
    yaml_file = version_dir / "model.yaml"
    text = yaml_file.read_text()
    old = re.search(rf"{re.escape(name)}: ([0-9a-f]{{64}})", text).group(1)
    new = hashlib.sha256((version_dir / name).read_bytes()).hexdigest()
    yaml_file.write_text(text.replace(old, new))


def _edit_spec(version_dir: Path, change) -> None:
    spec_file = version_dir / "spec.json"
    spec = json.loads(spec_file.read_text())
    change(spec)
    spec_file.write_text(json.dumps(spec, indent=2))


def _swap_labels(spec: dict) -> None:
    labels = spec["labels"]
    labels[7], labels[9] = labels[9], labels[7]  # Sneaker <-> Ankle boot


def _shift_mean(spec: dict) -> None:
    spec["input"]["mean"] = [spec["input"]["mean"][0] + 0.1]


def test_failed_known_answer_stops_start_up(bentoml_home, quick_stored, tmp_path):
    home = _copy_store(bentoml_home, tmp_path, "quick-lenet5")
    stored = quick_stored[1]
    folder = home / "models" / "quick-lenet5" / stored.version
    with np.load(folder / "known_answer.npz") as f:
        pixels, logits, labels = f["pixels"], f["output_0"], f["labels"]
    np.savez(folder / "known_answer.npz", pixels=pixels, output_0=logits + 0.5, labels=labels)
    _resign(folder, "known_answer.npz")
    out = _serve_and_expect_refusal(home, models=stored.tag)
    assert "self-test failed" in out


@pytest.mark.parametrize("change", [_swap_labels, _shift_mean], ids=["labels", "mean"])
def test_an_edited_spec_stops_start_up_naming_the_file(
    bentoml_home, quick_stored, tmp_path, change
):
    home = _copy_store(bentoml_home, tmp_path, "quick-lenet5")
    stored = quick_stored[1]
    folder = home / "models" / "quick-lenet5" / stored.version
    _edit_spec(folder, change)
    out = _serve_and_expect_refusal(home, models=stored.tag)
    reason = [line for line in out.splitlines() if "convserve cannot start" in line]
    assert reason and "spec.json" in reason[-1] and "does not match" in reason[-1], out[-2000:]
    # Re-signed, the edit passes the checksums; the spec inside model.onnx still disagrees.
    _resign(folder, "spec.json")
    out = _serve_and_expect_refusal(home, models=stored.tag)
    assert "spec.json differs from the spec inside model.onnx" in out


def test_a_file_export_did_not_write_stops_start_up(bentoml_home, quick_stored, tmp_path):
    home = _copy_store(bentoml_home, tmp_path, "quick-lenet5")
    stored = quick_stored[1]
    (home / "models" / "quick-lenet5" / stored.version / "model.onnx.data").write_bytes(b"\0" * 64)
    out = _serve_and_expect_refusal(home, models=stored.tag)
    assert "unexpected file model.onnx.data" in out and "external data" in out


def test_unavailable_provider_stops_start_up_unless_fallback_allowed(
    bentoml_home, quick_stored, tmp_path
):
    out = _serve_and_expect_refusal(
        bentoml_home, models="quick-lenet5:latest", providers="cuda,cpu"
    )
    assert "CUDAExecutionProvider requested" in out
    proc, url = start_server(
        bentoml_home,
        tmp_path / "fallback.log",
        models="quick-lenet5:latest",
        providers="cuda,cpu",
        allow_provider_fallback="true",
    )
    try:
        (model,) = httpx.get(f"{url}/models").json()["models"]
        assert model["versions"][0]["provider"] == "CPUExecutionProvider"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def tight_server(bentoml_home, quick_stored, tmp_path_factory):
    """A server whose admission limit is small, to be overrun on purpose."""
    log = tmp_path_factory.mktemp("tight") / "server.log"
    proc, url = start_server(bentoml_home, log, models="quick-lenet5:latest", max_in_flight="8")
    yield url
    stop_server(proc)


def test_burst_of_8x_the_admission_limit_is_shed_fast_and_answers_stay_correct(
    tight_server, fashion_test, quick_stored
):
    clients, per_request = 64, 4  # 64 simultaneous requests against max_in_flight=8
    images = fashion_test.images[: clients * per_request]
    url = tight_server

    async def burst():
        limits = httpx.Limits(max_connections=clients + 4)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            livez: list[int] = []
            stop = asyncio.Event()

            async def probe():
                while not stop.is_set():
                    livez.append((await http.get("/livez", timeout=2)).status_code)
                    await asyncio.sleep(0.02)

            async def one(c: int):
                files = [
                    ("images", (f"{c}-{i}.png", png(img, 4)))
                    for i, img in enumerate(images[c * per_request : (c + 1) * per_request])
                ]
                return await http.post("/classify", files=files, params={"top_k": 1})

            prober = asyncio.ensure_future(probe())
            t0 = time.perf_counter()
            answers = await asyncio.gather(*(one(c) for c in range(clients)))
            elapsed = time.perf_counter() - t0
            stop.set()
            await prober
            return answers, elapsed, livez

    answers, elapsed, livez = asyncio.run(burst())
    statuses = [r.status_code for r in answers]
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(
        f"burst of {clients} requests x {per_request} images, max_in_flight=8: {counts} "
        f"in {elapsed:.2f} s; /livez {len(livez)} probes all 200: {set(livez) == {200}}"
    )
    assert set(statuses) <= {200, 503}, counts
    assert counts.get(503, 0) > 0 and counts.get(200, 0) >= 8, counts
    assert set(livez) == {200}

    # Each answered request got its own images' predictions (no cross-talk in a batch).
    from convserve.preprocess import from_bytes
    from convserve.service.loading import open_model
    from convserve.service.settings import ServiceSettings

    _, classifier = open_model(quick_stored[1].tag, ServiceSettings(models=[quick_stored[1].tag]))
    for c, resp in enumerate(answers):
        if resp.status_code == 503:
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] in {"busy", "queue_full", "overloaded"}
            continue
        mine = images[c * per_request : (c + 1) * per_request]
        x = np.stack([from_bytes(png(img, 4), quick_stored[1].spec.input) for img in mine])
        expected = classifier.logits(x).argmax(1)
        got = [r["predictions"][0]["index"] for r in resp.json()["results"]]
        assert got == expected.tolist()
        assert [r["filename"] for r in resp.json()["results"]] == [
            f"{c}-{i}.png" for i in range(per_request)
        ]
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_metrics_show_batch_sizes_and_queue_wait(tight_server, fashion_test):
    files = [("images", (f"{i}.png", png(img))) for i, img in enumerate(fashion_test.images[:16])]
    assert httpx.post(f"{tight_server}/classify", files=files).status_code == 200
    text = httpx.get(f"{tight_server}/metrics").text
    assert "convserve_batch_size_images_bucket" in text
    assert "convserve_queue_wait_seconds_bucket" in text
    count = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("convserve_batch_size_images_count")
    ]
    assert count and sum(count) >= 1


def test_sigterm_drains_then_finishes_in_flight_requests_and_exits_0(
    bentoml_home, quick_stored, fashion_test, tmp_path
):
    drain_s = 2.0
    proc, url = start_server(
        bentoml_home, tmp_path / "drain.log", models="quick-lenet5:latest", drain_s=str(drain_s)
    )
    # Heavy enough (64 images of 448 px a request) that requests are still running at SIGTERM.
    files = [
        ("images", (f"{i}.png", png(img, 16))) for i, img in enumerate(fashion_test.images[:64])
    ]
    # Encoded once: 20 threads encoding 64 parts each contend for the GIL, and a body that
    # trickles out of a starved client is not what this test is about.
    encoded = httpx.Request("POST", f"{url}/classify", files=files)
    body, headers = encoded.read(), {"content-type": encoded.headers["content-type"]}
    done: list[tuple[int | str, float]] = []

    def client(delay: float = 0.0):
        time.sleep(delay)
        try:
            resp = httpx.post(f"{url}/classify", content=body, headers=headers, timeout=60)
            done.append((resp.status_code, time.monotonic()))
        except httpx.HTTPError as exc:
            done.append((type(exc).__name__, time.monotonic()))

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    signalled = time.monotonic()
    proc.send_signal(15)  # SIGTERM to the serving process, as an orchestrator does
    time.sleep(0.2)
    # Draining: not ready, so the balancer stops sending; what still comes is served.
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
    during = httpx.post(f"{url}/classify", files=files[:1], timeout=30)
    assert during.status_code == 200 and time.monotonic() < signalled + drain_s
    late = [threading.Thread(target=client, args=(0.5,)) for _ in range(4)]  # sent mid-drain
    for t in late:
        t.start()
    time.sleep(drain_s + 1.0)
    with pytest.raises(httpx.TransportError):  # after the drain: no longer accepting
        httpx.post(f"{url}/classify", files=files[:1], timeout=5)
    for t in threads + late:
        t.join()
    assert proc.wait(timeout=60) == 0
    assert [status for status, _ in done] == [200] * (len(threads) + len(late))
    assert any(at > signalled for _, at in done), "no request was in flight at SIGTERM"


def test_json_logs_have_one_line_per_request_and_per_error_with_the_request_id(
    bentoml_home, quick_stored, fashion_test, tmp_path
):
    import json

    log = tmp_path / "json.log"
    proc, url = start_server(
        bentoml_home, log, models="quick-lenet5:latest", log_format="json", access_log="true"
    )
    try:
        image = png(fashion_test.images[0])
        good = httpx.post(f"{url}/classify", files=[("images", ("a.png", image))],
                          headers={"X-Request-ID": "good-1"})  # fmt: skip
        bad = httpx.post(f"{url}/classify", files=[("images", ("b.png", b"not an image"))],
                         headers={"X-Request-ID": "bad-1"})  # fmt: skip
        assert good.status_code == 200 and bad.status_code == 415
    finally:
        assert stop_server(proc) == 0
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert records, log.read_text()[-2000:]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    access = {r["request_id"]: r for r in records if r["logger"] == "convserve.access"}
    assert access["good-1"]["status"] == 200 and access["good-1"]["path"] == "/classify"
    assert access["bad-1"]["status"] == 415 and access["good-1"]["ms"] > 0
    errors = [r for r in records if r["logger"] == "convserve.errors"]
    assert [(r["request_id"], r["code"]) for r in errors] == [("bad-1", "unsupported_image")]
    # The service's own start-up lines are JSON too.
    assert any("warm-up done" in r["message"] for r in records)


def test_workers_each_load_the_model_and_share_the_cores(bentoml_home, quick_stored, tmp_path):
    log = tmp_path / "workers.log"
    proc, url = start_server(bentoml_home, log, models="quick-lenet5:latest", workers="2")
    try:
        for _ in range(20):
            resp = httpx.post(
                f"{url}/classify",
                files=[("images", ("a.png", png(np.eye(28, dtype=np.uint8) * 255)))],
            )
            assert resp.status_code == 200, resp.text
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if any("worker.service" in part for part in p.cmdline())
        ]
        assert len(workers) == 2
        # Two cores, two workers: one ONNX Runtime thread each, never more threads than cores.
        lines = log.read_text().splitlines()
        serving = [line for line in lines if "serving quick-lenet5" in line]
        assert len(serving) == 2 and all("1 intra-op thread" in line for line in serving), serving
        ready = [line for line in lines if "warm-up done; ready" in line]
        assert len(ready) == 2 and all("uvloop" in r and "HTTP httptools" in r for r in ready)
    finally:
        assert stop_server(proc) == 0
