import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.onnx_export import OPSET, ExportConfig, export_onnx, read_spec
from export.store import (
    StoreError,
    has_model,
    list_versions,
    load_model,
    read_known_answer,
    save_model,
    verify_file,
)
from export.verify import MAX_ABS_LOGIT_DIFF, check_parity, known_inputs, normalize
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
    inputs = known_inputs(spec, count=4)
    first = save_model(path, spec, "fashion-test", inputs)
    second = save_model(path, spec, "fashion-test", inputs)
    assert first.tag != second.tag
    latest = load_model("fashion-test:latest")
    assert latest.tag == second.tag
    assert latest.spec == spec
    assert latest.sha256 == hashlib.sha256(latest.path.read_bytes()).hexdigest()
    assert load_model(first.tag).tag == first.tag
    assert str(bentoml_home) in str(latest.path)  # the test session's own store
    verify_file(latest)
    stored_inputs, logits = read_known_answer(latest)
    assert np.array_equal(stored_inputs, inputs) and logits.shape == (4, 10)
    assert [v.tag for v in list_versions("fashion-test")] == [second.tag, first.tag]


def test_known_inputs_are_the_service_preprocessing(exported, fashion_test):
    _, spec = exported
    expected = normalize(fashion_test.images[:8], spec.input.mean, spec.input.std)
    assert np.array_equal(known_inputs(spec, count=8), expected)


def test_a_damaged_store_file_is_a_clear_error(exported, tmp_path):
    path, spec = exported
    stored = save_model(path, spec, "fashion-damaged", known_inputs(spec, count=2))
    stored.path.write_bytes(stored.path.read_bytes()[:-1] + b"\0")
    with pytest.raises(StoreError, match="does not match"):
        verify_file(stored)
    stored.known_answer_path.unlink()
    with pytest.raises(StoreError, match="known-answer"):
        read_known_answer(stored)
    with pytest.raises(StoreError, match="not in the model store"):
        load_model("fashion-never-saved:latest")
