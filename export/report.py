"""One page about a trained model: curves, confusion matrix, per-class accuracy, parameters,
FLOPs, ONNX file size, and in-process latency FP32 against INT8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from convserve.export.onnx_export import ExportConfig, export_onnx
from convserve.export.quantize import quantize_with_report
from convserve.export.verify import labelled_test_set
from convserve.models.checkpoint import load_checkpoint


def write_report(
    run_dir: str | Path, out: str | Path | None = None, data_dir: str | None = None
) -> Path:
    """Write `report.md` (and its PNGs) into `out` (default: the run directory)."""
    run = Path(run_dir)
    out = Path(out) if out else run
    out.mkdir(parents=True, exist_ok=True)
    model, spec = load_checkpoint(run / "best.pt")
    metrics = json.loads((run / "metrics.json").read_text())

    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(spec.input.shape(1)))
    flops = counter.get_total_flops()  # multiply-adds count 2

    onnx_path = out / "model.onnx"
    export_onnx(ExportConfig(str(run / "best.pt"), str(onnx_path)))
    x_test, y_test = labelled_test_set(spec, data_dir=data_dir)  # N x C x H x W, as served
    int8_path, precision = quantize_with_report(
        onnx_path, spec, data_dir, test_set=(x_test, y_test)
    )

    with torch.no_grad():
        predicted = np.concatenate(
            [model(torch.from_numpy(x_test[i : i + 500])).argmax(1).numpy()
             for i in tqdm(range(0, len(x_test), 500), desc="report: test set", unit="batch",
                           disable=None)]
        )  # fmt: skip
    per_class = [
        (label, float((predicted[y_test == c] == c).mean())) for c, label in enumerate(spec.labels)
    ]
    for png in ("curves.png", "confusion.png"):
        if (run / png).exists() and out != run:
            shutil.copyfile(run / png, out / png)

    best = metrics["best_test_accuracy"]
    lines = [
        f"# {spec.architecture} on {spec.dataset}",
        "",
        f"Best test accuracy **{100 * best:.2f} %** (epoch {metrics['best_epoch']} of "
        f"{len(metrics['history'])}), trained in {metrics['train_time_s']:.0f} s.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture arguments | `{json.dumps(spec.kwargs)}` |",
        f"| input | {spec.input.channels} x {spec.input.height} x {spec.input.width} |",
        f"| parameters | {params:,} |",
        f"| FLOPs per image | {flops / 1e6:,.1f} M |",
        f"| ONNX file, FP32 | {onnx_path.stat().st_size / 1e6:.2f} MB |",
        f"| ONNX file, INT8 | {int8_path.stat().st_size / 1e6:.2f} MB |",
        "",
        "## Training",
        "",
        "![loss and accuracy per epoch](curves.png)",
        "",
        "![confusion matrix of the best epoch](confusion.png)",
        "",
        "## Per-class accuracy (test set)",
        "",
        "| class | accuracy |",
        "|---|---|",
        *(f"| {label} | {100 * acc:.1f} % |" for label, acc in per_class),
        "",
        "## FP32 against INT8 (ONNX Runtime, in-process)",
        "",
        f"Batch of {precision.batch_size}, {precision.threads} thread(s), median of 20 runs, "
        "measured alternately in one process.",
        "",
        "| | test accuracy | ms per batch |",
        "|---|---|---|",
        f"| FP32 | {100 * precision.fp32_accuracy:.2f} % | {precision.fp32_ms_per_batch:.2f} |",
        f"| INT8 (static, QDQ) | {100 * precision.int8_accuracy:.2f} % | "
        f"{precision.int8_ms_per_batch:.2f} |",
        "",
        f"INT8 is {precision.speedup:.2f}x the speed of FP32 and loses "
        f"{precision.accuracy_drop_points:.2f} accuracy points.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
