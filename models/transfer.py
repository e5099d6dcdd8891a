"""The course's transfer-learning lesson, measured: a small labelled set (Fashion-MNIST, a few
images per class, upscaled and replicated to RGB), the same network and budget three ways.

    python -m convserve.models.transfer --out docs/zoo/transfer      (make transfer)

  frozen ImageNet backbone   EfficientNet-Lite0's ImageNet features kept, a new head trained
  fine-tuned from ImageNet   the same start, every layer trained
  from scratch               the same network, random weights

Each run: the same images, epochs, batch size, optimizer and schedule; accuracy on the full
test set (10,000 images). Writes results.json, transfer.md and accuracy.png.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from convserve.models.plots import plot_runs
from convserve.models.train import TrainConfig, train


@dataclass(frozen=True)
class Arm:
    name: str
    init_from: str | None
    freeze_backbone: bool


ARMS = (
    Arm("frozen ImageNet backbone, new head", "imagenet", True),
    Arm("fine-tuned from ImageNet", "imagenet", False),
    Arm("from scratch", None, False),
)


def run(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, arm in enumerate(ARMS):
        print(f"[{i + 1}/{len(ARMS)}] {arm.name}", flush=True)
        config = TrainConfig(
            model="efficientnet_lite0",
            model_kwargs={"input_size": args.size, "in_channels": 3},
            per_class=args.per_class,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            init_from=arm.init_from,
            freeze_backbone=arm.freeze_backbone,
            hflip=False,
            eval_every=args.eval_every,
            out_dir=f"{args.runs}/run-{i}",
            seed=args.seed,
        )
        m = train(config).metrics
        rows.append(
            {
                "arm": arm.name,
                "best_test_accuracy": m["best_test_accuracy"],
                "final_test_accuracy": m["history"][-1]["test_accuracy"],
                "train_time_s": m["train_time_s"],
                "train_images": m["train_images"],
                "test_images": m["test_images"],
                "history": m["history"],
            }
        )
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))
    plot_runs(
        {r["arm"]: r["history"] for r in rows},
        out / "accuracy.png",
        f"EfficientNet-Lite0, {args.per_class} Fashion-MNIST images per class",
    )
    (out / "transfer.md").write_text(table(rows, args))
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{rows[0]['train_images']} training images ({args.per_class} per class), "
        f"{args.size} px, {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} "
        f"(one-cycle); accuracy on all {rows[0]['test_images']:,} test images.",
        "",
        "| start | test accuracy, last epoch | best | wall time (2 cores) |",
        "|---|---|---|---|",
        *(
            f"| {r['arm']} | {100 * r['final_test_accuracy']:.2f} % | "
            f"{100 * r['best_test_accuracy']:.2f} % | {r['train_time_s']:.0f} s |"
            for r in rows
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--out", default="docs/zoo/transfer", help="the table and the plot")
    parser.add_argument("--runs", default="runs/transfer", help="the runs' checkpoints")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=112, help="input size (upscaled from 28)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    rows = run(parser.parse_args(argv))
    for r in rows:
        print(f"{r['arm']}: {100 * r['final_test_accuracy']:.2f} % in {r['train_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
