"""`convserve` command line: summary, train, export, report, serve.

Torch is imported only by the subcommands that need it, so `convserve serve` runs in a
serving-only install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

from convserve import __version__

DEFAULT_MODEL = "lenet5"
DEFAULT_TAG = "fashion-lenet5:latest"
# The BentoML service, by import path: found from any directory once convserve is installed.
SERVICE = "convserve.service.app:Classifier"


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
    from convserve import models
    from convserve.models.summary import format_table, summarize

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
    from convserve.models.train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["model_kwargs"] = _model_args(values["model_kwargs"])
    values["out_dir"] = values["out_dir"] or f"runs/{args.model}"
    result = train(TrainConfig(**values))
    m = result.metrics
    if not m:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    print(
        f"best test accuracy {100 * m['best_test_accuracy']:.2f}% (epoch {m['best_epoch']}) "
        f"in {m['train_time_s']:.0f} s; checkpoint {result.checkpoint}"
    )
    return 0


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, its default and help taken from the field: the
    defaults live in one place. Booleans get --x / --no-x."""
    from convserve.models.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta, kind = dict(f.metadata), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        options: dict[str, Any] = {"help": meta.pop("help"), "dest": f.name}
        flag = "--" + meta.pop("flag", f.name).replace("_", "-")
        if meta.pop("positional", False):
            p.add_argument(f.name, nargs="?", default=default, help=options["help"])
            continue
        if f.name == "model_kwargs":
            options.update(action="append", default=[], metavar="KEY=VALUE")
        elif kind is bool:
            options.update(action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(kind) is typing.Literal:
            options.update(choices=typing.get_args(kind), default=default)
        else:
            scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            options.update(type=scalar, default=None if f.name == "out_dir" else default)
        p.add_argument(flag, **options, **meta)


def _cmd_export(args: argparse.Namespace) -> int:
    from convserve.export.publish import ParityFailed, publish

    try:
        publish(
            args.checkpoint,
            output=args.output,
            name=args.name,
            parity_images=args.parity_images,
            data_dir=args.data_dir,
            store=not args.no_store,
            int8=args.int8,
        )
    except ParityFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from convserve.export.report import write_report

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
    from convserve.store import has_model

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


def _cmd_classify(args: argparse.Namespace) -> int:
    from convserve import client

    return client.main(args.images, args.url, args.top_k, args.model, args.json)


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
        SERVICE,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    os.execvpe(cmd[0], cmd, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    _add_train_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a checkpoint to ONNX, verify it, store it")
    p.add_argument("checkpoint")
    p.add_argument("--output", help="ONNX path (default: beside the checkpoint)")
    p.add_argument("--name", help="model store name (default DATASET-ARCHITECTURE)")
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

    p = sub.add_parser("classify", help="send images to a running server, print its answer")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, WebP, GIF)")
    p.add_argument("--url", default=os.environ.get("CONVSERVE_URL", "http://127.0.0.1:3000"))
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--model", help="model name (default: the server's default model)")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser(
        "bench",
        help="the benchmark harness: convserve against in-process ONNX Runtime and its peers "
        "(options: convserve bench --help)",
        add_help=False,  # listed here for --help; main() hands its arguments to the harness
    )

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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every option after `bench` is the harness's own
        from convserve.loadtest import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FileNotFoundError as exc:  # e.g. the dataset is missing: say how to get it
        print(f"error: {exc}", file=sys.stderr)
        return 2
