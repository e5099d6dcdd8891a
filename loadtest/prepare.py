"""The benchmark's models, made before any server starts: its own model store (BENTOML_HOME
under the run's work folder) with every model the chosen scenarios use, and the files the
peers load (the ONNX file, its spec, a TorchScript for the PyTorch peers). Apart from running
the scenarios (loadtest/bench.py) and from writing their results (loadtest/report.py)."""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convserve.defaults import DEFAULT_TAG, LENET
from convserve.loadtest.scenarios import TASK_MODELS

if TYPE_CHECKING:
    from convserve.store import StoredModel


@dataclass(frozen=True)
class ModelFiles:
    tag: str  # in the run's own model store
    onnx: str
    spec: str
    torchscript: str | None = None  # for the PyTorch peers


def _stored(stored: StoredModel, torchscript: str | None = None) -> ModelFiles:
    return ModelFiles(
        stored.tag, str(stored.path), str(stored.path.parent / "spec.json"), torchscript
    )


def _torchscript(checkpoint: Path, out: Path) -> str:
    """The checkpoint traced to TorchScript, the file the PyTorch peers load without convserve."""
    import torch

    from convserve.models.checkpoint import load_checkpoint

    model, spec = load_checkpoint(checkpoint)
    traced = torch.jit.trace(model, torch.zeros(spec.input.shape(1)))
    traced.save(str(out))  # type: ignore[union-attr]
    return str(out)


def prepare_models(
    args: argparse.Namespace, work: Path, wanted: set[str], missing: dict[str, str]
) -> dict[str, ModelFiles]:
    """The run's own model store (BENTOML_HOME under `work`) with every model the scenarios use:
    the served LeNet-5 and the task models (detector, verifier, stylizer) copied from the
    user's store (a task model not there goes into `missing`, with what makes it); ResNet-20
    (FP32 and INT8) exported from a checkpoint (untrained unless given: throughput does not
    depend on the weights' values); EfficientNet-Lite0 with its ImageNet weights."""
    from convserve.export.onnx_export import ExportConfig, export_onnx
    from convserve.export.verify import known_pixels
    from convserve.store import load_model, save_model

    home = work / "bentoml"
    os.environ["BENTOML_HOME"] = str(home)
    user_store = Path(args.bentoml_home) / "models"
    models: dict[str, ModelFiles] = {}
    if wanted & {"lenet5", "resnet20", "resnet20-int8"}:
        shutil.copytree(user_store / LENET, home / "models" / LENET)
        lenet = load_model(DEFAULT_TAG)
        checkpoint = Path(args.checkpoint).resolve()
        models["lenet5"] = _stored(lenet, _torchscript(checkpoint, work / "lenet5.pt"))
    task_models: dict[str, ModelFiles] = {}
    for key, name in TASK_MODELS.items():
        if key not in wanted:
            continue
        if not (user_store / name).is_dir():
            missing[key] = f"{name} is not in {user_store}: `make models` prepares it"
            continue
        shutil.copytree(user_store / name, home / "models" / name)
        task_models[key] = _stored(load_model(f"{name}:latest"))
    if wanted & {"resnet20", "resnet20-int8"}:
        import torch

        from convserve.export.quantize import quantize_int8
        from convserve.models import create_model
        from convserve.preprocess import from_pixels
        from convserve.spec import ModelSpec

        ckpt = Path(args.resnet_checkpoint) if args.resnet_checkpoint else None
        if ckpt is None:
            torch.manual_seed(0)
            kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10}
            spec = lenet.spec.model_copy(
                update={"architecture": "resnet20", "kwargs": kwargs, "metrics": {}}
            )
            ckpt = work / "resnet20.pt"
            torch.save(
                {
                    "spec": ModelSpec.model_dump(spec, mode="json"),
                    "state_dict": create_model("resnet20", **kwargs).state_dict(),
                },
                ckpt,
            )
        path, spec = export_onnx(ExportConfig(str(ckpt), str(work / "resnet20.onnx")))
        inputs = known_pixels(spec)
        calibration = from_pixels(known_pixels(spec, count=256), spec.input)
        int8 = quantize_int8(path, work / "resnet20.int8.onnx", calibration)
        models["resnet20-int8"] = _stored(
            save_model(int8, spec, "bench-resnet20", inputs, precision="int8")
        )
        models["resnet20"] = _stored(save_model(path, spec, "bench-resnet20", inputs))
    if "efficientnet-lite0" in wanted:
        from convserve.export.publish import publish
        from convserve.models.pretrained import write_checkpoint

        lite0 = write_checkpoint("efficientnet_lite0", "imagenet", work / "lite0")
        published = publish(lite0, name="bench-lite0", parity_images=8, say=lambda _: None)
        script = _torchscript(lite0, work / "lite0.pt")  # TorchServe's, on the phone photos
        models["efficientnet-lite0"] = _stored(published.stored[-1], script)
    return {**models, **task_models}
