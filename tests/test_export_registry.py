"""Every architecture in the registry exports to ONNX and agrees with PyTorch."""

from __future__ import annotations

import pytest
import torch

from convserve import models
from convserve.export.onnx_export import ExportConfig, export_onnx
from convserve.export.verify import check_parity
from convserve.models._registry import task_of
from convserve.spec import FASHION_MNIST_LABELS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, ModelSpec


@pytest.mark.parametrize("name", [n for n in models.list_models() if task_of(n) == "classify"])
def test_every_architecture_exports_with_parity(name: str, tmp_path):
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10}
    model = models.create_model(name, **kwargs).eval()
    spec = ModelSpec(
        architecture=name,
        kwargs=kwargs,
        input={
            "channels": 1,
            "height": 28,
            "width": 28,
            "mean": FASHION_MNIST_MEAN,
            "std": FASHION_MNIST_STD,
        },
        labels=FASHION_MNIST_LABELS,
    )
    checkpoint = tmp_path / "model.pt"
    torch.save({"spec": spec.model_dump(mode="json"), "state_dict": model.state_dict()}, checkpoint)
    path, exported = export_onnx(ExportConfig(str(checkpoint), str(tmp_path / "model.onnx")))
    assert exported == spec
    report = check_parity(checkpoint, path, images=64, batch_size=32)
    assert report.top1_agreement == 1.0
    assert report.passed, report


def _spec(name: str, kwargs: dict) -> ModelSpec:
    from convserve.models.data import SCENES
    from convserve.spec import DetectSpec, EmbedSpec

    if name == "yolo_fashion":
        return ModelSpec(
            architecture=name,
            dataset=SCENES,
            task="detect",
            kwargs=kwargs,
            input={
                "channels": 1,
                "height": 128,
                "width": 128,
                "mean": FASHION_MNIST_MEAN,
                "std": FASHION_MNIST_STD,
                "resize": "letterbox",
            },
            labels=FASHION_MNIST_LABELS,
            detect=DetectSpec(grid=8, anchors=((20, 20),) * 3),
        )
    return ModelSpec(
        architecture=name,
        task="embed",
        kwargs=kwargs,
        input={
            "channels": 1,
            "height": 28,
            "width": 28,
            "mean": FASHION_MNIST_MEAN,
            "std": FASHION_MNIST_STD,
        },
        embed=EmbedSpec(dim=64, threshold=1.0),
    )


@pytest.mark.parametrize("name", [n for n in models.list_models() if task_of(n) != "classify"])
def test_detectors_and_embedding_networks_export_what_they_serve(name: str, tmp_path):
    """A detector exports its decoding (boxes and scores), an embedding network its embedding;
    parity holds on every output, on the test scenes or test images."""
    import onnx

    torch.manual_seed(0)
    kwargs = {"input_size": 128} if name == "yolo_fashion" else {}
    model = models.create_model(name, **kwargs).eval()
    spec = _spec(name, kwargs)
    checkpoint = tmp_path / "model.pt"
    torch.save({"spec": spec.model_dump(mode="json"), "state_dict": model.state_dict()}, checkpoint)
    path, _ = export_onnx(ExportConfig(str(checkpoint), str(tmp_path / "model.onnx")))
    outputs = [o.name for o in onnx.load(str(path)).graph.output]
    assert outputs == (["boxes", "scores"] if name == "yolo_fashion" else ["embedding"])
    report = check_parity(checkpoint, path, images=64, batch_size=32)
    assert report.passed, report
