import hashlib
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from convserve.export.onnx_export import OPSET, ExportConfig, export_onnx, read_spec
from convserve.export.verify import MAX_ABS_LOGIT_DIFF, check_parity, known_pixels
from convserve.models.checkpoint import load_checkpoint
from convserve.preprocess import from_bytes, from_pixels
from convserve.store import (
    StoreError,
    has_model,
    list_versions,
    load_model,
    read_known_answer,
    save_model,
    verify_files,
)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


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
    pixels = known_pixels(spec, count=4)
    first = save_model(path, spec, "fashion-test", pixels)
    second = save_model(path, spec, "fashion-test", pixels)
    assert first.tag != second.tag
    latest = load_model("fashion-test:latest")
    assert latest.tag == second.tag
    assert latest.spec == spec
    assert latest.sha256 == hashlib.sha256(latest.path.read_bytes()).hexdigest()
    assert load_model(first.tag).tag == first.tag
    assert str(bentoml_home) in str(latest.path)  # the test session's own store
    verify_files(latest)
    assert set(latest.files) == {"model.onnx", "spec.json", "known_answer.npz"}
    known = read_known_answer(latest)
    stored_pixels, (logits,), labels = known.pixels, known.outputs, known.labels
    assert np.array_equal(stored_pixels, pixels) and logits.shape == (4, 10)
    assert labels == [spec.labels[i] for i in logits.argmax(1)]
    assert [v.tag for v in list_versions("fashion-test")] == [second.tag, first.tag]


def test_known_pixels_are_raw_test_images_preprocessed_as_served(exported, fashion_test):
    _, spec = exported
    # What the service makes of the same images uploaded as PNG.
    expected = np.stack([from_bytes(png(img), spec.input) for img in fashion_test.images[:8]])
    assert np.array_equal(known_pixels(spec, count=8)[..., 0], fashion_test.images[:8])
    assert np.array_equal(from_pixels(known_pixels(spec, count=8), spec.input), expected)


def test_a_damaged_store_file_is_a_clear_error(exported, tmp_path):
    path, spec = exported
    stored = save_model(path, spec, "fashion-damaged", known_pixels(spec, count=2))
    stored.path.write_bytes(stored.path.read_bytes()[:-1] + b"\0")
    with pytest.raises(StoreError, match="model.onnx checksum .* does not match"):
        verify_files(stored)
    stored.known_answer_path.unlink()
    with pytest.raises(StoreError, match="known-answer"):
        read_known_answer(stored)
    with pytest.raises(StoreError, match="not in the model store"):
        load_model("fashion-never-saved:latest")


def test_int8_is_stored_beside_fp32_with_its_metrics(quick_run, bentoml_home, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    out = str(tmp_path / "q.onnx")
    cmd = [sys.executable, "-m", "convserve", "export", str(quick_run.checkpoint), "--int8",
           "--name", "quant-lenet5", "--parity-images", "200", "--output", out]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    fp32, int8 = list_versions("quant-lenet5")  # newest first: FP32 stays `latest`
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert load_model("quant-lenet5:latest").tag == fp32.tag
    m = int8.spec.metrics
    assert {
        "fp32_test_accuracy",
        "ms_per_batch_64",
        "fp32_ms_per_batch_64",
        "speedup_vs_fp32",
    } <= set(m)
    assert abs(m["test_accuracy"] - m["fp32_test_accuracy"]) < 0.02  # a 2-epoch model
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    verify_files(int8)


def test_model_report_has_every_section(quick_run, tmp_path):
    from convserve.export.report import write_report

    report = write_report(quick_run.checkpoint.parent, tmp_path)
    text = report.read_text()
    for needle in ("parameters | 44,426", "FLOPs per image", "ONNX file, INT8",
                   "## Per-class accuracy", "| FP32 |", "| INT8 (static, QDQ) |"):  # fmt: skip
        assert needle in text, needle
    assert text.count("\n| ") >= 10 + 6  # ten classes plus the tables' rows
    for png in ("curves.png", "confusion.png"):
        assert f"]({png})" in text and (tmp_path / png).exists()
