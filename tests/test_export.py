import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.onnx_export import OPSET, ExportConfig, export_onnx, read_spec
from export.store import has_model, load_model, save_model
from export.verify import MAX_ABS_LOGIT_DIFF, check_parity
from models.train import load_checkpoint


@pytest.fixture(scope="module")
def exported(quick_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_onnx(ExportConfig(checkpoint=str(quick_run.checkpoint), output=str(out)))


def test_onnx_is_valid_with_pinned_opset_and_spec(exported, quick_run):
    path, spec = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    _, checkpoint_spec = load_checkpoint(quick_run.checkpoint)
    assert read_spec(path) == checkpoint_spec == spec


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dynamic_batch_axis(exported, batch):
    path, spec = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (dim0, *_rest) = session.get_inputs()[0].shape
    assert isinstance(dim0, str)  # symbolic, not a fixed size
    x = np.random.default_rng(0).standard_normal(spec.input.shape(batch)).astype(np.float32)
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    assert logits.shape == (batch, 10)


def test_parity_with_pytorch_on_1000_test_images(exported, quick_run):
    report = check_parity(quick_run.checkpoint, exported[0], images=1000)
    assert report.images == 1000
    assert report.top1_agreement == 1.0
    assert report.max_abs_diff <= MAX_ABS_LOGIT_DIFF
    assert report.passed


def test_store_versions_and_latest(exported, bentoml_home):
    path, spec = exported
    assert not has_model("fashion-test:latest")
    first = save_model(path, spec, "fashion-test")
    second = save_model(path, spec, "fashion-test")
    assert first.tag != second.tag
    latest = load_model("fashion-test:latest")
    assert latest.tag == second.tag
    assert latest.spec == spec
    assert latest.sha256 == hashlib.sha256(latest.path.read_bytes()).hexdigest()
    assert load_model(first.tag).tag == first.tag
    assert str(bentoml_home) in str(latest.path)  # the test session's own store
