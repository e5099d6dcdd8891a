"""`convserve import`: a classifier exported outside convserve, as many files are (plain
`torch.onnx.export`, NHWC with a transpose in front, batch fixed at 1, softmax inside), stored,
served by a real server, and answering real photos as ONNX Runtime does in-process with the
same recipe, written here independently of convserve's preprocessing. And every refusal:
nothing reaches the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from serving import start_server, stop_server

from convserve.export.importer import ImportOptions, ImportRefused, import_model

pytestmark = pytest.mark.slow
NAME = "outside-lite0"
FLAGS = ["--layout", "nhwc", "--resize", "256", "--crop", "224", "--mean", "0.5,0.5,0.5",
         "--std", "0.5,0.5,0.5", "--output", "probabilities"]  # fmt: skip


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> tuple[Path, Path]:
    """EfficientNet-Lite0 exported by plain torch.onnx.export, and its labels file."""
    import torch

    from convserve.models.pretrained import pretrained_model

    net, spec = pretrained_model("efficientnet_lite0", "imagenet")

    class Outside(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # N x H x W x C in
            return torch.softmax(self.net(x.permute(0, 3, 1, 2)), dim=1)

    folder = tmp_path_factory.mktemp("outside")
    example = (torch.zeros(1, 224, 224, 3),)  # the batch fixed at 1, as exported files often are
    torch.onnx.export(Outside().eval(), example, folder / "model.onnx", input_names=["images"],
                      output_names=["scores"], external_data=False)  # fmt: skip
    (folder / "labels.txt").write_text("\n".join(spec.labels) + "\n")
    return folder / "model.onnx", folder / "labels.txt"


def _convserve(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "convserve", *args], capture_output=True,
                          text=True, env=env, cwd=home, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def imported(outside, bentoml_home):
    model, labels = outside
    done = _convserve(bentoml_home, "import", str(model), "--name", NAME, "--labels", str(labels),
                      *FLAGS)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"stored {NAME}:" in done.stdout
    from convserve.store import load_model

    return load_model(f"{NAME}:latest")


@pytest.fixture(scope="module")
def server(imported, bentoml_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("import-server") / "server.log"
    proc, url = start_server(bentoml_home, log, models=f"{NAME}:latest")
    yield url
    stop_server(proc)


def reference(model: Path, data: bytes) -> np.ndarray:
    """In-process ONNX Runtime with torchvision's Resize(256) + CenterCrop(224), /255, mean and
    std 0.5, NHWC, one image per call (the file's batch is 1), written out here."""
    img = Image.open(__import__("io").BytesIO(data)).convert("RGB")
    w, h = img.size
    short, long = min(w, h), max(w, h)
    size = (256, int(256 * long / short)) if w <= h else (int(256 * long / short), 256)
    img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    x = ((x - 0.5) / 0.5)[None]  # 1 x 224 x 224 x 3
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0][0]


def test_the_graph_and_flags_become_a_recipe_shown_by_models(imported, server):
    spec = imported.spec
    assert (spec.task, spec.output, spec.dataset) == ("classify", "probabilities", "imported")
    assert spec.input.layout == "nhwc" and spec.input.resize == "crop"
    assert (spec.input.resize_to, spec.input.height, spec.input.width) == (256, 224, 224)
    assert spec.num_classes == 1000 and set(imported.files) == {
        "model.onnx", "spec.json", "known_answer.npz"
    }  # fmt: skip
    (version,) = next(m for m in httpx.get(f"{server}/models").json()["models"]
                      if m["name"] == NAME)["versions"]  # fmt: skip
    assert version["task"] == "classify" and version["routes"] == ["/classify"]
    assert version["recipe"].startswith("shorter side to 256, centre crop 224x224")
    assert version["input"]["layout"] == "nhwc" and version["output"] == "probabilities"
    # an import decodes large uploads reduced unless --full-decode says otherwise
    assert version["input"]["reduced_decode"] is True
    assert version["recipe"].endswith("reduced decode")


def test_served_answers_equal_in_process_onnxruntime_on_real_photos(outside, server, photos):
    model, _ = outside
    names = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]
    files = [("images", (n, photos[n])) for n in names]
    resp = httpx.post(f"{server}/classify", params={"top_k": 5, "model": NAME}, files=files,
                      timeout=60)  # fmt: skip
    assert resp.status_code == 200, resp.text
    for name, result in zip(names, resp.json()["results"], strict=True):
        expected = reference(model, photos[name])
        order = np.argsort(-expected, kind="stable")[:5]
        got = result["predictions"]
        assert got[0]["index"] == int(order[0]), name
        np.testing.assert_allclose([p["probability"] for p in got], expected[order], atol=1e-3)
    cat, coffee = resp.json()["results"][:2]
    assert "cat" in cat["predictions"][0]["label"] or cat["predictions"][0]["label"] == (
        "Egyptian Mau"
    )
    assert coffee["predictions"][0]["label"] == "espresso"


def _stored_tags() -> set[str]:
    import bentoml

    return {str(m.tag) for m in bentoml.models.list()}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_files_and_flags_are_refused_naming_the_problem_and_store_nothing(
    outside, tmp_path, bentoml_home
):
    model, labels = outside
    good = {"name": "refused", "labels": labels, "layout": "nhwc", "resize": 256, "crop": 224,
            "mean": (0.5,), "std": (0.5,), "output": "probabilities"}  # fmt: skip
    few = _write(tmp_path / "few.txt", b"cat\ndog\n")
    holes = _write(tmp_path / "holes.txt", b"cat\n\ndog\n")
    external = tmp_path / "external.onnx"
    import onnx

    proto = onnx.load(str(model))
    onnx.save_model(proto, str(external), save_as_external_data=True, location="w.bin")
    cases = {
        "not onnx": (_write(tmp_path / "a.onnx", b"hello, not a model"), {}, "not an ONNX"),
        "empty": (_write(tmp_path / "e.onnx", b""), {}, "is empty"),
        "truncated": (_write(tmp_path / "t.onnx", model.read_bytes()[:400_000]), {},
                      "truncated"),
        "external data": (external, {}, "external data"),
        "labels too few": (model, {"labels": few}, "2 labels but output 'scores' has 1000"),
        "empty label": (model, {"labels": holes}, "empty label on line 2"),
        "no labels": (model, {"labels": None}, "needs its labels"),
        "wrong layout": (model, {"layout": "nchw"}, "pass --layout nhwc"),
        "crop mismatch": (model, {"crop": 256}, "--crop 256, but the model's input is 224"),
        "resize too small": (model, {"resize": 100}, "--resize 100 is smaller"),
        "mean of two": (model, {"mean": (0.5, 0.5)}, "--mean has 2 values"),
        "softmax twice": (model, {"output": "logits"}, "are probabilities already"),
        "bad name": (model, {"name": "Not A Name"}, "--name"),
        "a detector": (model, {"task": "detect"}, "import takes classify"),
        "tau out of range": (model, {"task": "embed", "labels": None, "threshold": 5.0},
                             "--threshold 5: input should be less than or equal to 4"),
    }  # fmt: skip
    before = _stored_tags()
    for what, (path, changes, message) in cases.items():
        with pytest.raises(ImportRefused, match=message):
            import_model(path, ImportOptions(**{**good, **changes}))
        assert _stored_tags() == before, what
    # The command line says the same, exits 1, and stores nothing.
    done = _convserve(bentoml_home, "import", str(model), "--name", "refused", "--labels",
                      str(few), *FLAGS)  # fmt: skip
    assert done.returncode == 1 and "2 labels but output" in done.stderr
    assert "nothing was stored" in done.stderr and _stored_tags() == before
