"""Every architecture in the registry exports to ONNX and agrees with PyTorch."""

from __future__ import annotations

import pytest
import torch

from convserve import models
from convserve.export.onnx_export import ExportConfig, export_onnx
from convserve.export.verify import check_parity
from convserve.spec import FASHION_MNIST_LABELS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, ModelSpec


@pytest.mark.parametrize("name", models.list_models())
def test_every_architecture_exports_with_parity(name: str, tmp_path):
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10}
    model = models.create_model(name, **kwargs).eval()
    spec = ModelSpec(
        architecture=name,
        kwargs=kwargs,
        input={"channels": 1, "height": 28, "width": 28,
               "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD},
        labels=FASHION_MNIST_LABELS,
    )  # fmt: skip
    checkpoint = tmp_path / "model.pt"
    torch.save({"spec": spec.model_dump(mode="json"), "state_dict": model.state_dict()}, checkpoint)
    path, exported = export_onnx(ExportConfig(str(checkpoint), str(tmp_path / "model.onnx")))
    assert exported == spec
    report = check_parity(checkpoint, path, images=64, batch_size=32)
    assert report.top1_agreement == 1.0
    assert report.passed, report
