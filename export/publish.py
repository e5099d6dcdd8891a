"""Checkpoint -> verified ONNX -> model store: what `convserve export` does, in order.

A model reaches the store only if the ONNX file passes the checker and agrees with PyTorch on
real test images; with `int8`, a statically quantized version is stored first, so that the
FP32 version stays `latest`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from convserve.export.onnx_export import ExportConfig, export_onnx
from convserve.export.quantize import quantize_with_report
from convserve.export.verify import (
    MAX_ABS_BOX_DIFF,
    MAX_ABS_LOGIT_DIFF,
    ParityReport,
    check_parity,
    known_pixels,
)
from convserve.spec import ModelSpec
from convserve.store import StoredModel, save_model


class ParityFailed(Exception):
    """PyTorch and ONNX Runtime disagree; nothing was stored."""


@dataclass(frozen=True)
class Published:
    onnx: Path
    spec: ModelSpec
    parity: ParityReport
    stored: list[StoredModel]  # INT8 first when asked for, FP32 (`latest`) last


def publish(
    checkpoint: str | Path,
    *,
    output: str | Path | None = None,
    name: str | None = None,
    parity_images: int = 1000,
    data_dir: str | None = None,
    store: bool = True,
    int8: bool = False,
    say: Callable[[str], None] = print,
) -> Published:
    checkpoint = Path(checkpoint)
    output = Path(output) if output else checkpoint.with_suffix(".onnx")
    path, spec = export_onnx(ExportConfig(checkpoint=str(checkpoint), output=str(output)))
    report = check_parity(checkpoint, path, images=parity_images, data_dir=data_dir)
    boxes = f", boxes {report.max_box_diff:.2e} px (limit {MAX_ABS_BOX_DIFF:.0e})"
    say(
        f"parity on {report.images} test images: top-1 agreement "
        f"{100 * report.top1_agreement:.2f}%, max |output diff| {report.max_abs_diff:.2e} "
        f"(limit {MAX_ABS_LOGIT_DIFF:.0e}){boxes if spec.task == 'detect' else ''}"
    )
    if not report.passed:
        raise ParityFailed("parity check failed; the model was not stored")
    stored: list[StoredModel] = []
    if not store:
        return Published(path, spec, report, stored)
    inputs = known_pixels(spec, data_dir=data_dir)
    name = name or spec.store_name()
    if int8:
        int8_path, precision = quantize_with_report(path, spec, data_dir)
        say(
            f"int8: test accuracy {100 * precision.int8_accuracy:.2f}% (fp32 "
            f"{100 * precision.fp32_accuracy:.2f}%), {precision.int8_ms_per_batch:.2f} ms vs "
            f"{precision.fp32_ms_per_batch:.2f} ms per batch of {precision.batch_size} on "
            f"{precision.threads} thread(s): {precision.speedup:.2f}x"
        )
        metrics = {
            **spec.metrics,
            "test_accuracy": precision.int8_accuracy,
            "fp32_test_accuracy": precision.fp32_accuracy,
            "ms_per_batch_64": precision.int8_ms_per_batch,
            "fp32_ms_per_batch_64": precision.fp32_ms_per_batch,
            "speedup_vs_fp32": precision.speedup,
        }
        int8_spec = spec.model_copy(update={"metrics": metrics})
        stored.append(save_model(int8_path, int8_spec, name, inputs, precision="int8"))
        say(f"stored {stored[-1].tag} (int8)")
    stored.append(save_model(path, spec, name, inputs))
    say(f"stored {stored[-1].tag} (sha256 {stored[-1].sha256[:12]}…)")
    return Published(path, spec, report, stored)
