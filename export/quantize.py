"""INT8 static quantization (QDQ) with ONNX Runtime, calibrated on training images, and the
side-by-side comparison with FP32 (accuracy on the test set, in-process latency)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm.auto import tqdm

from convserve.export.verify import labelled_test_set
from convserve.models.data import load_split
from convserve.preprocess import from_pixels
from convserve.runtime import SessionConfig, make_session
from convserve.spec import ModelSpec


class _Batches(CalibrationDataReader):
    """The calibration images in batches, with a progress bar (on a terminal)."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        batches = [
            {input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)
        ]
        self._batches = iter(tqdm(batches, desc="INT8 calibration", unit="batch", disable=None))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(
    fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray, batch_size: int = 64
) -> Path:
    """calibration: N x C x H x W float32, preprocessed training images (a few hundred).

    Weights int8 per channel, activations uint8 (the u8s8 pair ONNX Runtime's VNNI kernels
    run fastest on x86), MinMax calibration."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph folding first, as ONNX Runtime recommends before QDQ.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        input_name = make_session(prepared).get_inputs()[0].name
        quantize_static(
            str(prepared),
            str(out_path),
            _Batches(input_name, calibration, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return out_path


@dataclass(frozen=True)
class PrecisionReport:
    fp32_accuracy: float
    int8_accuracy: float
    fp32_ms_per_batch: float
    int8_ms_per_batch: float
    batch_size: int
    threads: int

    @property
    def accuracy_drop_points(self) -> float:
        return 100 * (self.fp32_accuracy - self.int8_accuracy)

    @property
    def speedup(self) -> float:
        return self.fp32_ms_per_batch / self.int8_ms_per_batch

    def as_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "accuracy_drop_points": self.accuracy_drop_points,
            "speedup": self.speedup,
        }


def _accuracy(session: Any, x: np.ndarray, y: np.ndarray, desc: str = "") -> float:
    name = session.get_inputs()[0].name
    starts = tqdm(range(0, len(x), 500), desc=f"accuracy ({desc})", unit="batch", disable=None)
    predicted = np.concatenate(
        [session.run(None, {name: x[i : i + 500]})[0].argmax(1) for i in starts]
    )
    return float((predicted == y).mean())


def _ms_per_batch(sessions: list[Any], batch: np.ndarray, repeats: int) -> list[float]:
    """Median milliseconds per run of each session, the sessions taking turns run by run so
    that a slow spell of the machine hits both alike and the ratio stays fair."""
    feeds = [{s.get_inputs()[0].name: batch} for s in sessions]
    for _ in range(3):
        for session, feed in zip(sessions, feeds, strict=True):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for session, feed, own in zip(sessions, feeds, times, strict=True):
            t0 = time.perf_counter()
            session.run(None, feed)
            own.append(time.perf_counter() - t0)
    return [1000 * float(np.median(own)) for own in times]


def compare_precisions(
    fp32_path: str | Path,
    int8_path: str | Path,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    batch_size: int = 64,
    threads: int = 1,
    repeats: int = 20,
) -> PrecisionReport:
    """Accuracy on (x_test, y_test) and median latency of one batch, measured alternately in
    one process with the same threads, so the ratio is fair."""
    config = SessionConfig(intra_op_threads=threads)
    fp32, int8 = make_session(fp32_path, config), make_session(int8_path, config)
    fp32_ms, int8_ms = _ms_per_batch([fp32, int8], x_test[:batch_size], repeats)
    return PrecisionReport(
        fp32_accuracy=_accuracy(fp32, x_test, y_test, "FP32"),
        int8_accuracy=_accuracy(int8, x_test, y_test, "INT8"),
        fp32_ms_per_batch=fp32_ms,
        int8_ms_per_batch=int8_ms,
        batch_size=batch_size,
        threads=threads,
    )


def quantize_with_report(
    fp32_path: str | Path,
    spec: ModelSpec,
    data_dir: str | None = None,
    calibration: int = 512,
    test_set: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Path, PrecisionReport]:
    """INT8 beside the FP32 file (`model.int8.onnx`), calibrated on the first `calibration`
    training images of the spec's dataset, and compared with FP32 on its whole test set.
    `test_set`: (inputs, labels) already preprocessed for `spec`, for a caller that has them."""
    fp32_path = Path(fp32_path)
    shape = {"channels": spec.input.channels, "size": spec.input.height}
    train = load_split(spec.dataset, "train", **shape, data_dir=data_dir)
    if test_set is None:
        test_set = labelled_test_set(spec, data_dir=data_dir)
    int8_path = quantize_int8(
        fp32_path,
        fp32_path.with_suffix(".int8.onnx"),
        from_pixels(train.images[:calibration], spec.input),
    )
    return int8_path, compare_precisions(fp32_path, int8_path, *test_set)
