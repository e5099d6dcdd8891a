"""`convserve` command line: train, export, summary, serve.

Torch is imported only by the subcommands that need it, so `convserve serve` runs in a
serving-only install.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "lenet5"
DEFAULT_TAG = "fashion-lenet5:latest"


def _model_args(pairs: list[str]) -> dict[str, Any]:
    """`--arg filters=[8,16] --arg num_classes=10` -> {"filters": [8, 16], "num_classes": 10}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--arg expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_summary(args: argparse.Namespace) -> int:
    import models
    from models.summary import format_table, summarize

    kwargs = {
        "in_channels": args.in_channels,
        "input_size": args.input_size,
        "num_classes": args.num_classes,
        **_model_args(args.arg),
    }
    model = models.create_model(args.model, **kwargs)
    rows = summarize(model, kwargs["in_channels"], kwargs["input_size"])
    print(f"{args.model} {kwargs}")
    print(format_table(rows, sum(p.numel() for p in model.parameters())))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, train

    config = TrainConfig(
        model=args.model,
        model_kwargs=_model_args(args.arg),
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        augment=not args.no_augment,
        hflip=not args.no_hflip,
        random_erasing=args.random_erasing,
        data_dir=args.data_dir,
        out_dir=args.out or f"runs/{args.model}",
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        threads=args.threads,
        amp=not args.no_amp,
        channels_last=not args.no_channels_last,
        resume=args.resume,
        stop_after=args.stop_after,
        init_from=args.init_from,
        freeze_backbone=args.freeze_backbone,
    )
    result = train(config)
    m = result.metrics
    if not m:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    print(
        f"best test accuracy {100 * m['best_test_accuracy']:.2f}% (epoch {m['best_epoch']}) "
        f"in {m['train_time_s']:.0f} s; checkpoint {result.checkpoint}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import ExportConfig, export_onnx
    from export.store import save_model, store_name
    from export.verify import MAX_ABS_LOGIT_DIFF, check_parity, known_inputs

    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint.with_suffix(".onnx")
    path, spec = export_onnx(ExportConfig(checkpoint=str(checkpoint), output=str(output)))
    report = check_parity(checkpoint, path, images=args.parity_images, data_dir=args.data_dir)
    print(
        f"parity on {report.images} test images: top-1 agreement "
        f"{100 * report.top1_agreement:.2f}%, max |logit diff| {report.max_abs_diff:.2e} "
        f"(limit {MAX_ABS_LOGIT_DIFF:.0e})"
    )
    if not report.passed:
        print("parity check failed; the model was not stored", file=sys.stderr)
        return 1
    if args.no_store:
        return 0
    inputs = known_inputs(spec, data_dir=args.data_dir)
    name = args.name or store_name(spec)
    if args.int8:  # stored first, so that `latest` stays the FP32 version
        _store_int8(path, spec, name, inputs, args)
    stored = save_model(path, spec, name, inputs)
    print(f"stored {stored.tag} (sha256 {stored.sha256[:12]}…)")
    return 0


def _store_int8(path: Path, spec: Any, name: str, inputs: Any, args: argparse.Namespace) -> None:
    """INT8 (QDQ, calibrated on training images) as a newer version of the same model."""
    from export.quantize import quantize_with_report
    from export.store import save_model

    int8_path, report = quantize_with_report(path, spec, args.data_dir)
    print(
        f"int8: test accuracy {100 * report.int8_accuracy:.2f}% (fp32 "
        f"{100 * report.fp32_accuracy:.2f}%), {report.int8_ms_per_batch:.2f} ms vs "
        f"{report.fp32_ms_per_batch:.2f} ms per batch of {report.batch_size} on "
        f"{report.threads} thread(s): {report.speedup:.2f}x"
    )
    metrics = {
        **spec.metrics,
        "test_accuracy": report.int8_accuracy,
        "fp32_test_accuracy": report.fp32_accuracy,
        "ms_per_batch_64": report.int8_ms_per_batch,
        "fp32_ms_per_batch_64": report.fp32_ms_per_batch,
        "speedup_vs_fp32": report.speedup,
    }
    stored = save_model(
        int8_path, spec.model_copy(update={"metrics": metrics}), name, inputs, precision="int8"
    )
    print(f"stored {stored.tag} (int8)")


def _cmd_report(args: argparse.Namespace) -> int:
    from export.report import write_report

    run = Path(args.run)
    if not run.is_dir():
        run = Path("runs") / args.run
    if not (run / "best.pt").exists():
        print(f"error: no best.pt in {run}; pass a training run directory", file=sys.stderr)
        return 2
    print(f"report written to {write_report(run, args.out, args.data_dir)}")
    return 0


def _ensure_default_model(tag: str, data_dir: str | None) -> None:
    """Train and export the default model if the store lacks it (`make serve`, new machine)."""
    from export.store import has_model

    if has_model(tag):
        return
    print(f"{tag} is not in the model store: training the default {DEFAULT_MODEL} (a few minutes)")
    out = "runs/default"
    data = ["--data-dir", data_dir] if data_dir else []
    parser = build_parser()
    _cmd_train(parser.parse_args(["train", DEFAULT_MODEL, "--out", out, *data]))
    status = _cmd_export(
        parser.parse_args(["export", f"{out}/best.pt", "--name", tag.partition(":")[0], *data])
    )
    if status:
        raise SystemExit(status)


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.train_if_missing:
        for tag in args.models.split(","):
            if tag.strip().partition(":")[0] == DEFAULT_TAG.partition(":")[0]:
                _ensure_default_model(tag.strip(), args.data_dir)
    env = {**os.environ, "CONVSERVE_MODELS": args.models}
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service.service:Classifier",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    # The service is found by import path, from the project root whether installed or not.
    os.chdir(Path(__file__).resolve().parent.parent)
    os.execvpe(cmd[0], cmd, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="per-layer activation shapes, sizes and parameters")
    p.add_argument("model")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--input-size", type=int, default=28)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="builder argument, JSON value (e.g. filters=[8,16])",
    )
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser(
        "train",
        help="train a registered model (under torchrun: distributed data parallel)",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="fashion-mnist, digits (scikit-learn's), or a folder-per-class root "
        "(ROOT/train/CLASS/*.png, ROOT/test/CLASS/*.png)",
    )
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--random-erasing", type=float, default=0.0, metavar="P")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--no-hflip", action="store_true", help="random crop without flips")
    p.add_argument("--no-amp", action="store_true", help="full precision on a GPU too")
    p.add_argument(
        "--no-channels-last", action="store_true", help="NCHW activations (default: NHWC)"
    )
    p.add_argument("--resume", metavar="LAST_PT", help="continue a run from its last.pt")
    p.add_argument("--stop-after", type=int, metavar="EPOCH", help="end after that epoch")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="transfer learning: start from it")
    p.add_argument("--freeze-backbone", action="store_true", help="with --init-from")
    p.add_argument("--data-dir", help="directory with the four Fashion-MNIST IDX .gz files")
    p.add_argument("--out", help="run directory (default runs/MODEL)")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, help="use only the first N test images")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a checkpoint to ONNX, verify it, store it")
    p.add_argument("checkpoint")
    p.add_argument("--output", help="ONNX path (default: beside the checkpoint)")
    p.add_argument("--name", help="model store name (default fashion-ARCHITECTURE)")
    p.add_argument("--parity-images", type=int, default=1000)
    p.add_argument("--data-dir")
    p.add_argument("--no-store", action="store_true", help="export and verify only")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also store an INT8 (static, QDQ) version, with its accuracy and speed vs FP32",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="one page about a trained model (Markdown + PNGs)")
    p.add_argument("run", help="a training run directory, or a model name for runs/MODEL")
    p.add_argument("--out", help="directory for report.md (default: the run directory)")
    p.add_argument("--data-dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("serve", help="serve a stored model over HTTP (bentoml serve)")
    p.add_argument(
        "--models",
        default=os.environ.get("CONVSERVE_MODELS", DEFAULT_TAG),
        help=f"store tags, comma-separated, the first the default (default {DEFAULT_TAG})",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument(
        "--train-if-missing",
        action="store_true",
        help="train and export the default model first if the store lacks it",
    )
    p.add_argument("--data-dir")
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FileNotFoundError as exc:  # e.g. the dataset is missing: say how to get it
        print(f"error: {exc}", file=sys.stderr)
        return 2
